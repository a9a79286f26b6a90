/*
 * kasmina error codes.
 *
 * Every fallible function returns an int: 0 on success or a negative KSM_E* code. OS failures
 * pass through as -errno (KSM_EINVAL == -EINVAL, ...); kasmina's own conditions live in the
 * reserved range -4000..-4099. One X-macro list generates the enum, ksm_strerror(),
 * ksm_err_name() and, in daemon/wire/status.c only, the mapping to gRPC status codes.
 *
 * Rule (after libuv): if a function that takes a callback returns an error, the callback is
 * never called. Exactly one of the two happens.
 */
#pragma once

#include <stddef.h>

#include <errno.h>

#ifdef __cplusplus
extern "C" {
#endif

/* XX(name, value, message). The third column is the one-sentence default message. */
#define KSM_ERRNO_MAP(XX)                                                                          \
    XX(EPERM, -EPERM, "operation not permitted")                                                   \
    XX(ENOENT, -ENOENT, "no such file or directory")                                               \
    XX(EIO, -EIO, "input/output error")                                                            \
    XX(ENOMEM, -ENOMEM, "out of host memory")                                                      \
    XX(EACCES, -EACCES, "permission denied")                                                       \
    XX(EBUSY, -EBUSY, "resource busy")                                                             \
    XX(EEXIST, -EEXIST, "already exists")                                                          \
    XX(EINVAL, -EINVAL, "invalid argument")                                                        \
    XX(ENOSPC, -ENOSPC, "no space left on device")                                                 \
    XX(ERANGE, -ERANGE, "value out of range")                                                      \
    XX(ENOSYS, -ENOSYS, "function not implemented")                                                \
    XX(EOVERFLOW, -EOVERFLOW, "value too large")                                                   \
    XX(ECANCELED, -ECANCELED, "operation canceled")                                                \
    XX(ETIMEDOUT, -ETIMEDOUT, "timed out")                                                         \
    XX(EAGAIN, -EAGAIN, "resource temporarily unavailable")                                        \
    XX(EBADMSG, -EBADMSG, "data corrupted in transit (checksum mismatch)")                         \
    XX(EDEVMEM, -4000, "device out of memory")                                                     \
    XX(ENOMODEL, -4001, "no such model")                                                           \
    XX(ENOSLOT, -4002, "no such slot")                                                             \
    XX(ENOSEED, -4003, "slot has no seed")                                                         \
    XX(ESTAGE, -4004, "illegal stage transition")                                                  \
    XX(EGATE, -4005, "quality gate not passed")                                                    \
    XX(ENOBLUEPRINT, -4006, "no such blueprint")                                                   \
    XX(EUNSUPPORTED, -4007, "operation not supported by this backend")                             \
    XX(EDEVICE, -4008, "device failed")                                                            \
    XX(ESHUTDOWN, -4009, "shutting down")                                                          \
    XX(EFORMAT, -4010, "malformed data")                                                           \
    XX(ESHAPE, -4011, "shape mismatch")                                                            \
    XX(EDTYPE, -4012, "dtype mismatch")                                                            \
    XX(ELIMIT, -4013, "limit exceeded")                                                            \
    XX(ENODEVICE, -4014, "no such device")                                                         \
    XX(ENOTREADY, -4015, "not ready")                                                              \
    XX(ENOPLUGIN, -4016, "backend plugin unavailable")                                             \
    XX(EINTERNAL, -4017, "internal error")                                                         \
    XX(EAUTH, -4018, "authentication required")                                                    \
    XX(EMAXMODELS, -4019, "the engine holds its maximum number of models")                         \
    XX(EMAXSEEDS, -4020, "the model holds its maximum number of live seeds")

/* clang-format off */
enum ksm_errno {
#define KSM_XX_ENUM(name, val, msg) KSM_##name = (val),
    KSM_ERRNO_MAP(KSM_XX_ENUM)
#undef KSM_XX_ENUM
    KSM_OK = 0
};
/* clang-format on */

/* Writes one sentence (a printf format) into err[errlen] -- nothing when err is NULL or errlen is
 * 0 -- and returns code, so that a check reads
 *     if (x < 0) return ksm_errf(err, errlen, KSM_EINVAL, "x must be >= 0, got %d", x);
 * (code 0 where the caller sets its code apart). The one way errors are worded in kasmina. */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
int ksm_errf(char *err, size_t errlen, int code, const char *fmt, ...);

/* Returns from the calling function with expr's value when it is an error (negative). */
#define KSM_TRY(expr)                                                                              \
    do {                                                                                           \
        int ksm_try_rc_ = (expr);                                                                  \
        if (ksm_try_rc_ < 0) return ksm_try_rc_;                                                   \
    } while (0)

/* A static one-sentence description of err (0 gives "success"). Never NULL. Thread-safe. */
const char *ksm_strerror(int err);

/* The symbolic name of err, e.g. "KSM_EDEVMEM" (0 gives "KSM_OK"). Unknown codes give
 * "KSM_EUNKNOWN". Never NULL. Thread-safe. */
const char *ksm_err_name(int err);

/* Parses a name produced by ksm_err_name() back into a code (used by the client to map a
 * server's status details back). Returns 0 and sets *err on success, KSM_EINVAL otherwise. */
int ksm_err_from_name(const char *name, int *err);

#ifdef __cplusplus
}
#endif
