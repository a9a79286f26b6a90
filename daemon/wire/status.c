/*
 * rpc/status: KSM_E* <-> grpc_status_code (see status.h).
 */
#include "wire/status.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "kasmina/errors.h"

/* Every KSM_ERRNO_MAP entry has a row (tests/unit/test_status.c checks it). */
static const struct {
    int err;
    grpc_status_code code;
} status_table[] = {
    {KSM_OK, GRPC_STATUS_OK},
    /* bad input */
    {KSM_EINVAL, GRPC_STATUS_INVALID_ARGUMENT},
    {KSM_ENOSLOT, GRPC_STATUS_INVALID_ARGUMENT},
    {KSM_ENOBLUEPRINT, GRPC_STATUS_INVALID_ARGUMENT},
    {KSM_ESHAPE, GRPC_STATUS_INVALID_ARGUMENT},
    {KSM_EDTYPE, GRPC_STATUS_INVALID_ARGUMENT},
    {KSM_EFORMAT, GRPC_STATUS_INVALID_ARGUMENT},
    {KSM_ERANGE, GRPC_STATUS_INVALID_ARGUMENT},
    {KSM_EOVERFLOW, GRPC_STATUS_INVALID_ARGUMENT},
    {KSM_ENODEVICE, GRPC_STATUS_INVALID_ARGUMENT}, /* a device name the request gave */
    /* lookups */
    {KSM_ENOMODEL, GRPC_STATUS_NOT_FOUND},
    {KSM_ENOENT, GRPC_STATUS_NOT_FOUND},
    /* lifecycle */
    {KSM_ESTAGE, GRPC_STATUS_FAILED_PRECONDITION},
    {KSM_ENOSEED, GRPC_STATUS_FAILED_PRECONDITION},
    {KSM_EGATE, GRPC_STATUS_FAILED_PRECONDITION},
    {KSM_EEXIST, GRPC_STATUS_ALREADY_EXISTS},
    /* resources */
    {KSM_EDEVMEM, GRPC_STATUS_RESOURCE_EXHAUSTED},
    {KSM_ELIMIT, GRPC_STATUS_RESOURCE_EXHAUSTED},
    {KSM_EMAXMODELS, GRPC_STATUS_RESOURCE_EXHAUSTED},
    {KSM_EMAXSEEDS, GRPC_STATUS_RESOURCE_EXHAUSTED},
    {KSM_ENOMEM, GRPC_STATUS_RESOURCE_EXHAUSTED},
    {KSM_ENOSPC, GRPC_STATUS_RESOURCE_EXHAUSTED},
    {KSM_EAGAIN, GRPC_STATUS_RESOURCE_EXHAUSTED}, /* queue full: back off */
    /* availability */
    {KSM_ESHUTDOWN, GRPC_STATUS_UNAVAILABLE},
    {KSM_EDEVICE, GRPC_STATUS_UNAVAILABLE},
    {KSM_ENOTREADY, GRPC_STATUS_UNAVAILABLE},
    {KSM_EBUSY, GRPC_STATUS_UNAVAILABLE},
    {KSM_ENOPLUGIN, GRPC_STATUS_UNAVAILABLE},
    /* capability */
    {KSM_EUNSUPPORTED, GRPC_STATUS_UNIMPLEMENTED},
    {KSM_ENOSYS, GRPC_STATUS_UNIMPLEMENTED},
    /* call control */
    {KSM_ETIMEDOUT, GRPC_STATUS_DEADLINE_EXCEEDED},
    {KSM_ECANCELED, GRPC_STATUS_CANCELLED},
    {KSM_EPERM, GRPC_STATUS_PERMISSION_DENIED},
    {KSM_EACCES, GRPC_STATUS_PERMISSION_DENIED},
    {KSM_EAUTH, GRPC_STATUS_UNAUTHENTICATED}, /* no or wrong bearer token */
    {KSM_EBADMSG, GRPC_STATUS_DATA_LOSS},     /* a weights chunk whose checksum does not match */
    /* ours */
    {KSM_EIO, GRPC_STATUS_INTERNAL},
    {KSM_EINTERNAL, GRPC_STATUS_INTERNAL},
};

#define N_ROWS (sizeof status_table / sizeof status_table[0])

grpc_status_code ksm_rpc_status_from_err(int err)
{
    for (size_t i = 0; i < N_ROWS; i++)
        if (status_table[i].err == err) return status_table[i].code;
    return GRPC_STATUS_INTERNAL;
}

int ksm_rpc_status_has_row(int err)
{
    for (size_t i = 0; i < N_ROWS; i++)
        if (status_table[i].err == err) return 1;
    return 0;
}

int ksm_rpc_err_from_status(grpc_status_code code)
{
    switch (code) {
    case GRPC_STATUS_OK: return 0;
    case GRPC_STATUS_CANCELLED: return KSM_ECANCELED;
    case GRPC_STATUS_INVALID_ARGUMENT: return KSM_EINVAL;
    case GRPC_STATUS_OUT_OF_RANGE: return KSM_ERANGE;
    case GRPC_STATUS_DEADLINE_EXCEEDED: return KSM_ETIMEDOUT;
    case GRPC_STATUS_NOT_FOUND: return KSM_ENOMODEL;
    case GRPC_STATUS_ALREADY_EXISTS: return KSM_EEXIST;
    case GRPC_STATUS_PERMISSION_DENIED: return KSM_EPERM;
    case GRPC_STATUS_UNAUTHENTICATED: return KSM_EAUTH;
    case GRPC_STATUS_RESOURCE_EXHAUSTED: return KSM_ELIMIT;
    case GRPC_STATUS_FAILED_PRECONDITION: return KSM_ESTAGE;
    case GRPC_STATUS_ABORTED: return KSM_EAGAIN;
    case GRPC_STATUS_UNIMPLEMENTED: return KSM_ENOSYS;
    case GRPC_STATUS_UNAVAILABLE: return KSM_ENOTREADY;
    case GRPC_STATUS_DATA_LOSS: return KSM_EBADMSG;
    case GRPC_STATUS_UNKNOWN:
    case GRPC_STATUS_INTERNAL:
    default: return KSM_EINTERNAL;
    }
}

const char *ksm_rpc_status_message(int err, const char *errbuf, char *out, size_t outlen)
{
    if (outlen == 0) return out;
    bool own = errbuf != NULL && errbuf[0] != '\0';
    const char *m = own ? errbuf : ksm_strerror(err);
    size_t n = strlen(m);
    if (n > 0 && m[n - 1] == '.')
        snprintf(out, outlen, "%s", m);
    else
        snprintf(out, outlen, "%s.", m);
    /* One sentence: capitalise the first letter of the default messages (an engine message may
     * start with a field name, which keeps its case). */
    if (!own && out[0] >= 'a' && out[0] <= 'z') out[0] = (char)(out[0] - 'a' + 'A');
    return out;
}
