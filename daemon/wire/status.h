/*
 * rpc/status: the one table from KSM_E* codes to gRPC status codes, and back for the client.
 *
 * The server sends a failed call's status with one sentence (the engine's err buffer, or
 * ksm_strerror() when that is empty) as the details, and the symbolic name (ksm_err_name())
 * in the trailing metadata entry KSM_RPC_ERROR_MD, so that a client maps it back exactly with
 * ksm_err_from_name(); without that entry, ksm_rpc_err_from_status() gives the class's code.
 */
#pragma once

#include <stddef.h>

#include <grpc/status.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Trailing metadata key carrying ksm_err_name(code) of a failed call. */
#define KSM_RPC_ERROR_MD "kasmina-error"
/* Trailing metadata key of a successful call's warnings, one entry per sentence (a value that was
 * accepted but looks wrong, a default that was taken: docs/logging.md#warnings). Printable ASCII.
 */
#define KSM_RPC_WARNING_MD "kasmina-warning"

/* KSM_E* (or 0) -> grpc_status_code. Unknown codes give GRPC_STATUS_INTERNAL. */
grpc_status_code ksm_rpc_status_from_err(int err);
/* True when err has its own row in the table (every KSM_ERRNO_MAP entry does). */
int ksm_rpc_status_has_row(int err);
/* grpc_status_code -> a representative KSM_E* (0 for OK): INVALID_ARGUMENT -> KSM_EINVAL,
 * NOT_FOUND -> KSM_ENOMODEL, FAILED_PRECONDITION -> KSM_ESTAGE, ... */
int ksm_rpc_err_from_status(grpc_status_code code);
/* The status message of a failed call: errbuf when it holds a message, else ksm_strerror(err);
 * ends with a full stop. Returns out. */
const char *ksm_rpc_status_message(int err, const char *errbuf, char *out, size_t outlen);

#ifdef __cplusplus
}
#endif
