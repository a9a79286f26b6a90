/*
 * Device faults through the engine (fault-injecting backend, tests/helpers/fake_backend.h): an
 * allocation failure is KSM_EDEVMEM and changes nothing, the next request succeeds; a sticky
 * device error fails compute with KSM_EDEVICE and marks the engine unhealthy.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "fake_backend.h"
#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kt.h"

static ksm_backend *cpu, *fake;
static ksm_engine *eng;
static ksm_device *fdev;
static char err[512];

static void setup(void)
{
    cr_assert_eq(ksm_cpu_backend_new(1, &cpu), 0);
    cr_assert_eq(ksm_fake_backend_new(ksm_backend_device(cpu, 0), &fake), 0);
    fdev = ksm_backend_device(fake, 0);
    struct ksm_engine_config cfg = {.cpu_devices = 1, .backend = fake};
    eng = kt_engine_new(&cfg);
    cr_assert_str_eq(ksm_device_name(ksm_engine_default_device(eng)), ksm_device_name(fdev));
}

static void teardown(void)
{
    ksm_fake_set_sticky_error(fdev, 0);
    ksm_engine_free(eng);
    ksm_backend_free(fake);
    ksm_backend_free(cpu);
}

TestSuite(faults, .init = setup, .fini = teardown);

static ksm_tensor batch(void)
{
    static float d[2 * 3 * 8 * 8];
    for (int i = 0; i < 2 * 3 * 64; i++) d[i] = (float)(i % 13) / 13.0f;
    ksm_tensor t;
    ksm_tensor_init(&t, NULL, d, KSM_DTYPE_F32, 4, (int64_t[]){2, 3, 8, 8});
    return t;
}

Test(faults, allocation_failure_changes_nothing_and_next_request_succeeds)
{
    /* r0c2 has 512 channels: a conv_heavy seed needs two 9 MiB weights, more than the cached
     * free space of the model's segments */
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN, .cnn = {.base_channels = 128}};
    ksm_model *m;
    cr_assert_eq(ksm_engine_model_create(eng, "m", &spec, &m, err, sizeof err), 0, "%s", err);
    /* make the device full */
    struct ksm_fake_counters fc;
    ksm_fake_get_counters(fdev, &fc);
    ksm_fake_set_mem_limit(fdev, fc.live_bytes);
    ksm_alloc_empty_cache(ksm_engine_allocator(eng, fdev)); /* nothing cached to fall back on */
    ksm_fake_get_counters(fdev, &fc);
    ksm_fake_set_mem_limit(fdev, fc.live_bytes);
    struct ksm_slot_report before, after;
    ksm_model_slot_reports(m, "r0c2", &before, 1, NULL, err, sizeof err);
    uint64_t gen = ksm_model_generation(m);
    struct ksm_germinate_args g = {.blueprint_id = "conv_heavy"};
    int rc = ksm_model_germinate(m, "r0c2", &g, NULL, err, sizeof err);
    cr_expect_eq(rc, KSM_EDEVMEM, "got %s: %s", ksm_err_name(rc), err);
    cr_expect_eq(ksm_model_generation(m), gen);
    ksm_model_slot_reports(m, "r0c2", &after, 1, NULL, err, sizeof err);
    cr_expect_eq(memcmp(&before, &after, sizeof before), 0);
    ksm_fake_set_mem_limit(fdev, 0);
    cr_expect_eq(ksm_model_germinate(m, "r0c2", &g, NULL, err, sizeof err), 0, "%s", err);
    cr_expect_eq(ksm_engine_health(eng, NULL, 0), 0);
    ksm_model_unref(m);
}

Test(faults, sticky_device_error_fails_compute_and_health)
{
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN, .cnn = {.base_channels = 8}};
    ksm_model *m;
    cr_assert_eq(ksm_engine_model_create(eng, "m", &spec, &m, err, sizeof err), 0, "%s", err);
    ksm_tensor x = batch();
    struct ksm_forward_result r;
    struct ksm_forward_args a = {.input = &x};
    cr_assert_eq(ksm_model_forward(m, &a, &r, err, sizeof err), 0, "%s", err);
    ksm_host_tensor_free(&r.output);
    cr_assert_eq(ksm_engine_health(eng, NULL, 0), 0);
    ksm_fake_set_sticky_error(fdev, KSM_EDEVICE);
    cr_expect_eq(ksm_model_forward(m, &a, &r, err, sizeof err), KSM_EDEVICE);
    char why[256];
    cr_expect_eq(ksm_engine_health(eng, why, sizeof why), KSM_EDEVICE);
    cr_expect(strlen(why) > 0);
    /* lifecycle state stays readable */
    struct ksm_slot_report rep;
    cr_expect_eq(ksm_model_slot_reports(m, "r0c0", &rep, 1, NULL, err, sizeof err), 0);
    ksm_model_unref(m);
}
