/* Fault injection from a spec string (faults.h). */
#include "faults.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_backend.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"

int ksm_test_faults_new(const char *spec, ksm_backend **cpu, ksm_backend **fake, char *err,
                        size_t errlen)
{
    uint64_t mem_limit = 0, fail_nth = 0, sticky_after = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", spec);
    for (char *save = NULL, *kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        char *end = NULL;
        unsigned long long v = eq ? strtoull(eq + 1, &end, 10) : 0;
        if (eq == NULL || end == eq + 1 || *end != '\0') {
            ksm_errf(err, errlen, 0, "fault-injection \"%s\": expected key=number", kv);
            return KSM_EINVAL;
        }
        *eq = '\0';
        if (strcmp(kv, "mem-limit") == 0)
            mem_limit = v;
        else if (strcmp(kv, "fail-malloc-nth") == 0)
            fail_nth = v;
        else if (strcmp(kv, "sticky-after-launches") == 0)
            sticky_after = v;
        else {
            ksm_errf(err, errlen, 0,
                     "fault-injection key \"%s\" is not one of mem-limit, fail-malloc-nth, "
                     "sticky-after-launches",
                     kv);
            return KSM_EINVAL;
        }
    }
    int rc = ksm_cpu_backend_new(1, cpu);
    if (rc < 0) return ksm_errf(err, errlen, rc, "fault-injection: no CPU backend to wrap");
    if ((rc = ksm_fake_backend_new(ksm_backend_device(*cpu, 0), fake)) < 0) {
        ksm_backend_free(*cpu);
        *cpu = NULL;
        return ksm_errf(err, errlen, rc, "fault-injection: the fake backend failed");
    }
    ksm_device *d = ksm_backend_device(*fake, 0);
    if (mem_limit) ksm_fake_set_mem_limit(d, (size_t)mem_limit);
    if (fail_nth) ksm_fake_fail_malloc_nth(d, fail_nth);
    if (sticky_after) ksm_fake_set_sticky_after_launches(d, sticky_after, KSM_EDEVICE);
    KSM_LOGW("engine", "fault injection on %s: %s", ksm_device_name(d), spec);
    return 0;
}
