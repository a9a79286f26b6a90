/* The error table: codes, names, messages and the name round trip the client relies on. */
#include <criterion/criterion.h>
#include <string.h>

#include "kasmina/errors.h"

TestSuite(errors, .timeout = 10);

Test(errors, os_codes_pass_through_as_negative_errno)
{
    cr_expect_eq(KSM_EINVAL, -EINVAL);
    cr_expect_eq(KSM_ENOMEM, -ENOMEM);
    cr_expect_eq(KSM_ETIMEDOUT, -ETIMEDOUT);
    cr_expect_eq(KSM_ECANCELED, -ECANCELED);
}

Test(errors, domain_codes_live_in_the_reserved_range)
{
    int codes[] = {KSM_EDEVMEM,   KSM_ENOMODEL, KSM_EUNSUPPORTED, KSM_EDEVICE,
                   KSM_ESHUTDOWN, KSM_EFORMAT,  KSM_ENOPLUGIN,    KSM_EINTERNAL};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        cr_expect(codes[i] <= -4000 && codes[i] > -4100, "code %d outside -4000..-4099", codes[i]);
    }
}

Test(errors, every_code_has_a_distinct_name_and_a_message_that_round_trips)
{
    int codes[] = {
#define XX(name, val, msg) KSM_##name,
        KSM_ERRNO_MAP(XX)
#undef XX
    };
    size_t n = sizeof codes / sizeof codes[0];
    for (size_t i = 0; i < n; i++) {
        const char *name = ksm_err_name(codes[i]);
        cr_expect(strncmp(name, "KSM_E", 5) == 0, "name %s", name);
        cr_expect_neq(strcmp(name, "KSM_EUNKNOWN"), 0);
        cr_expect_gt(strlen(ksm_strerror(codes[i])), 5);
        int back = 0;
        cr_expect_eq(ksm_err_from_name(name, &back), 0);
        cr_expect_eq(back, codes[i], "%s round-tripped to %d", name, back);
        for (size_t j = i + 1; j < n; j++) cr_expect_neq(codes[i], codes[j]);
    }
}

Test(errors, unknown_codes_and_names_are_handled)
{
    cr_expect_str_eq(ksm_err_name(0), "KSM_OK");
    cr_expect_str_eq(ksm_strerror(0), "success");
    cr_expect_str_eq(ksm_err_name(-3999), "KSM_EUNKNOWN");
    cr_expect_str_eq(ksm_strerror(12345), "unknown error");
    int e = 7;
    cr_expect_eq(ksm_err_from_name("KSM_NOPE", &e), KSM_EINVAL);
    cr_expect_eq(e, 7);
    cr_expect_eq(ksm_err_from_name(NULL, &e), KSM_EINVAL);
    cr_expect_str_eq(ksm_err_name(KSM_EDEVMEM), "KSM_EDEVMEM");
    cr_expect_str_eq(ksm_strerror(KSM_EDEVMEM), "device out of memory");
}
