/* rpc/status: the KSM_E* -> gRPC status table and its reverse. */
#include <criterion/criterion.h>
#include <string.h>

#include "kasmina/errors.h"
#include "wire/status.h"

TestSuite(status, .timeout = 10);

Test(status, every_error_code_has_its_own_row)
{
#define XX(name, val, msg)                                                                         \
    cr_expect(ksm_rpc_status_has_row(KSM_##name), "KSM_" #name " has no row");
    KSM_ERRNO_MAP(XX)
#undef XX
    cr_expect(ksm_rpc_status_has_row(0));
}

Test(status, maps_the_documented_classes)
{
    static const struct {
        int err;
        grpc_status_code code;
    } want[] = {
        {0, GRPC_STATUS_OK},
        {KSM_EINVAL, GRPC_STATUS_INVALID_ARGUMENT},
        {KSM_ENOSLOT, GRPC_STATUS_INVALID_ARGUMENT},
        {KSM_ENOBLUEPRINT, GRPC_STATUS_INVALID_ARGUMENT},
        {KSM_ESHAPE, GRPC_STATUS_INVALID_ARGUMENT},
        {KSM_EDTYPE, GRPC_STATUS_INVALID_ARGUMENT},
        {KSM_EFORMAT, GRPC_STATUS_INVALID_ARGUMENT},
        {KSM_ERANGE, GRPC_STATUS_INVALID_ARGUMENT},
        {KSM_ENOMODEL, GRPC_STATUS_NOT_FOUND},
        {KSM_ESTAGE, GRPC_STATUS_FAILED_PRECONDITION},
        {KSM_ENOSEED, GRPC_STATUS_FAILED_PRECONDITION},
        {KSM_EGATE, GRPC_STATUS_FAILED_PRECONDITION},
        {KSM_EEXIST, GRPC_STATUS_ALREADY_EXISTS},
        {KSM_EDEVMEM, GRPC_STATUS_RESOURCE_EXHAUSTED},
        {KSM_ELIMIT, GRPC_STATUS_RESOURCE_EXHAUSTED},
        {KSM_ENOMEM, GRPC_STATUS_RESOURCE_EXHAUSTED},
        {KSM_ESHUTDOWN, GRPC_STATUS_UNAVAILABLE},
        {KSM_EDEVICE, GRPC_STATUS_UNAVAILABLE},
        {KSM_ENOTREADY, GRPC_STATUS_UNAVAILABLE},
        {KSM_EUNSUPPORTED, GRPC_STATUS_UNIMPLEMENTED},
        {KSM_ENOSYS, GRPC_STATUS_UNIMPLEMENTED},
        {KSM_ETIMEDOUT, GRPC_STATUS_DEADLINE_EXCEEDED},
        {KSM_ECANCELED, GRPC_STATUS_CANCELLED},
        {KSM_EINTERNAL, GRPC_STATUS_INTERNAL},
        {KSM_EBADMSG, GRPC_STATUS_DATA_LOSS},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        cr_expect_eq(ksm_rpc_status_from_err(want[i].err), want[i].code, "%s -> %d, want %d",
                     ksm_err_name(want[i].err), ksm_rpc_status_from_err(want[i].err), want[i].code);
}

Test(status, unknown_codes_are_internal)
{
    cr_expect_eq(ksm_rpc_status_from_err(-3999), GRPC_STATUS_INTERNAL);
    cr_expect_eq(ksm_rpc_status_from_err(-99999), GRPC_STATUS_INTERNAL);
    cr_expect_eq(ksm_rpc_status_from_err(17), GRPC_STATUS_INTERNAL);
}

Test(status, reverse_maps_back_into_the_same_class)
{
#define XX(name, val, msg)                                                                         \
    {                                                                                              \
        grpc_status_code c = ksm_rpc_status_from_err(KSM_##name);                                  \
        cr_expect_eq(ksm_rpc_status_from_err(ksm_rpc_err_from_status(c)), c, "KSM_" #name);        \
    }
    KSM_ERRNO_MAP(XX)
#undef XX
    cr_expect_eq(ksm_rpc_err_from_status(GRPC_STATUS_OK), 0);
    cr_expect_eq(ksm_rpc_err_from_status(GRPC_STATUS_NOT_FOUND), KSM_ENOMODEL);
    cr_expect_eq(ksm_rpc_err_from_status(GRPC_STATUS_UNKNOWN), KSM_EINTERNAL);
    cr_expect_eq(ksm_rpc_err_from_status(GRPC_STATUS_DATA_LOSS), KSM_EBADMSG);
    cr_expect_eq(ksm_rpc_err_from_status((grpc_status_code)99), KSM_EINTERNAL);
}

Test(status, message_is_one_sentence)
{
    char out[128];
    cr_expect_str_eq(ksm_rpc_status_message(KSM_ENOMODEL, "", out, sizeof out), "No such model.");
    cr_expect_str_eq(ksm_rpc_status_message(KSM_ENOMODEL, NULL, out, sizeof out), "No such model.");
    cr_expect_str_eq(
        ksm_rpc_status_message(KSM_EINVAL, "slot_id must not be empty.", out, sizeof out),
        "slot_id must not be empty.");
    cr_expect_str_eq(ksm_rpc_status_message(KSM_EINVAL, "alpha is NaN", out, sizeof out),
                     "alpha is NaN.");
    char tiny[4];
    ksm_rpc_status_message(KSM_EINVAL, "a long message", tiny, sizeof tiny);
    cr_expect_eq(strlen(tiny), 3);
}
