/*
 * kasminad config: parsing kasminad's options more than once in one process (tests, a future
 * reload). Found by tests/fuzz/fuzz_config: a parse that returned early (--help given as "-hh")
 * left GNU getopt inside the "-hh" cluster, and the next ksm_config_load() read that stale
 * (by then possibly freed) argv word: here it saw "-h" again and printed the help instead of
 * parsing "--workers 3".
 */
#include <criterion/criterion.h>

#include "config.h"
#include "kasmina/errors.h"

Test(config, second_load_forgets_the_first_parse)
{
    struct ksm_config c;
    char *first[] = {"kasminad", "-hh", NULL};
    cr_assert_eq(ksm_config_load(&c, 2, first, "test"), 1); /* --help */
    ksm_config_fini(&c);
    char *second[] = {"kasminad", "--workers", "3", NULL};
    cr_assert_eq(ksm_config_load(&c, 3, second, "test"), 0);
    cr_assert_eq(c.workers, 3);
    ksm_config_fini(&c);
}

Test(config, second_load_after_a_bad_option)
{
    struct ksm_config c;
    char *first[] = {"kasminad", "-zq", NULL};
    cr_assert_eq(ksm_config_load(&c, 2, first, "test"), KSM_EINVAL);
    ksm_config_fini(&c);
    char *second[] = {"kasminad", "--cpu-devices", "2", NULL};
    cr_assert_eq(ksm_config_load(&c, 3, second, "test"), 0);
    cr_assert_eq(c.cpu_devices, 2);
    ksm_config_fini(&c);
}
