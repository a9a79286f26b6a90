/* metrics renderers: Prometheus text format 0.0.4 (escaping, values, HELP/TYPE grouping) and
 * the status JSON, from a synthetic snapshot and from a real engine's snapshot. No socket. */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "metrics/metrics_impl.h"

TestSuite(prom, .timeout = 30);

static char *escaped(const char *v)
{
    struct ksm_sbuf b = {0};
    ksm_prom_escape_label(&b, v);
    return b.p ? b.p : strdup("");
}

Test(prom, escapes_backslash_quote_and_newline_in_label_values)
{
    char *s = escaped("a\\b\"c\nd");
    cr_expect_str_eq(s, "a\\\\b\\\"c\\nd");
    free(s);
    s = escaped("plain-id_1.2");
    cr_expect_str_eq(s, "plain-id_1.2");
    free(s);
    s = escaped("");
    cr_expect_str_eq(s, "");
    free(s);
}

Test(prom, writes_values_exactly)
{
    struct ksm_sbuf b = {0};
    double v[] = {0, 1, 25274793984.0, 0.375, -2.5, NAN, INFINITY, -INFINITY, 1e-9};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        ksm_prom_value(&b, v[i]);
        ksm_sbuf_puts(&b, " ");
    }
    cr_expect_str_eq(b.p, "0 1 25274793984 0.375 -2.5 NaN +Inf -Inf 1e-09 ");
    ksm_sbuf_free(&b);
}

/* One device, one model ("m\"1" to exercise escaping) with two slots and two caches. */
static struct ksm_metrics_snapshot *synthetic(void)
{
    struct ksm_metrics_snapshot *s = calloc(1, sizeof *s);
    s->healthy = true;
    s->taken_unix_ns = 1700000000000000000;
    s->n_devices = 1;
    s->devices = calloc(1, sizeof *s->devices);
    strcpy(s->devices[0].name, "cpu:0");
    s->devices[0].kind = "cpu";
    s->devices[0].total_bytes = 1000;
    s->devices[0].have_alloc = true;
    s->devices[0].st.pool[KSM_POOL_ALL].allocated_bytes.current = 512;
    s->devices[0].st.pool[KSM_POOL_ALL].allocated_bytes.peak = 1024;
    s->devices[0].st.num_ooms = 3;
    s->devices[0].st.deferred_frees = 4;
    s->n_models = 1;
    s->models = calloc(1, sizeof *s->models);
    struct ksm_metrics_model *m = &s->models[0];
    strcpy(m->info.model_id, "m\"1");
    strcpy(m->info.device, "cpu:0");
    m->info.topology = KSM_TOPOLOGY_CNN;
    m->info.generation = 7;
    m->n_slots = 2;
    m->slots = calloc(2, sizeof *m->slots);
    strcpy(m->slots[0].slot_id, "r0c0");
    m->slots[0].occupied = true;
    m->slots[0].stage = KSM_STAGE_BLENDING;
    m->slots[0].controller.alpha = 0.375;
    strcpy(m->slots[0].blueprint_id, "conv_light");
    strcpy(m->slots[1].slot_id, "r0c1");
    m->n_caches = 2;
    m->caches = calloc(2, sizeof *m->caches);
    strcpy(m->caches[0].cache, "plan");
    m->caches[0].hits = 11;
    strcpy(m->caches[1].cache, "alpha_scalar");
    strcpy(m->caches[1].slot_id, "r0c0");
    m->caches[1].misses = 2;
    /* run: slot r0c0 measured accuracy and epochs (no contribution); one failed G2; compute */
    m->slots[0].metrics.current_val_accuracy = 62.5;
    m->slots[0].metrics.epochs_in_current_stage = 3;
    m->run.gate_evaluations[KSM_GATE_G2][0] = 1;
    m->run.gate_evaluations[KSM_GATE_G1][1] = 2;
    m->run.compute_ns[KSM_COMPUTE_FORWARD] = 1500000000;
    m->n_gates = 1;
    m->gates = calloc(1, sizeof *m->gates);
    strcpy(m->gates[0].slot_id, "r0c0");
    m->gates[0].target_stage = KSM_STAGE_BLENDING;
    m->gates[0].result.gate = KSM_GATE_G2;
    m->gates[0].result.n_checks = 2;
    strcpy(m->gates[0].result.checks[0].name, "germinated");
    m->gates[0].result.checks[0].passed = true;
    strcpy(m->gates[0].result.checks[1].name, "seed_not_ready");
    strcpy(m->gates[0].result.checks[1].detail, "epochs_in_current_stage 3 < 10");
    return s;
}

static const struct ksm_metrics_build BI = {
    .version = "1.2.3", .commit = "abc", .start_unix_ns = 0};

Test(prom, renders_families_with_help_and_type_before_their_samples)
{
    struct ksm_metrics_snapshot *s = synthetic();
    struct ksm_sbuf b = {0};
    cr_assert_eq(ksm_metrics_render_prom(s, NULL, &BI, &b), 0);
    const char *want[] = {
        "kasmina_build_info{version=\"1.2.3\",commit=\"abc\"} 1\n",
        "kasmina_memory_allocated_bytes{device=\"cpu:0\"} 512\n",
        "kasmina_memory_allocated_peak_bytes{device=\"cpu:0\"} 1024\n",
        "kasmina_memory_ooms_total{device=\"cpu:0\"} 3\n",
        "kasmina_memory_deferred_frees_total{device=\"cpu:0\"} 4\n",
        "kasmina_device_memory_total_bytes{device=\"cpu:0\"} 1000\n",
        "kasmina_model_generation{model=\"m\\\"1\"} 7\n",
        "kasmina_slot_stage{model=\"m\\\"1\",slot=\"r0c0\"} 4\n",
        "kasmina_slot_alpha{model=\"m\\\"1\",slot=\"r0c0\"} 0.375\n",
        "kasmina_slot_stage{model=\"m\\\"1\",slot=\"r0c1\"} 0\n",
        "kasmina_slot_stage_info{model=\"m\\\"1\",slot=\"r0c0\",stage=\"BLENDING\","
        "blueprint=\"conv_light\"} 1\n",
        "kasmina_cache_hits_total{cache=\"plan\",model=\"m\\\"1\",slot=\"\"} 11\n",
        "kasmina_cache_misses_total{cache=\"alpha_scalar\",model=\"m\\\"1\",slot=\"r0c0\"} 2\n",
        "# TYPE kasmina_cache_hits_total counter\n",
        "# TYPE kasmina_slot_alpha gauge\n",
        "kasmina_slot_val_accuracy{model=\"m\\\"1\",slot=\"r0c0\"} 62.5\n",
        "kasmina_slot_epochs_in_stage{model=\"m\\\"1\",slot=\"r0c0\"} 3\n",
        "kasmina_slot_last_gate_passed{model=\"m\\\"1\",slot=\"r0c0\",gate=\"G2\"} 0\n",
        "kasmina_gate_evaluations_total{model=\"m\\\"1\",gate=\"G2\",outcome=\"failed\"} 1\n",
        "kasmina_gate_evaluations_total{model=\"m\\\"1\",gate=\"G1\",outcome=\"passed\"} 2\n",
        "kasmina_gate_evaluations_total{model=\"m\\\"1\",gate=\"G5\",outcome=\"passed\"} 0\n",
        "kasmina_model_compute_seconds_total{model=\"m\\\"1\",kind=\"forward\"} 1.5\n",
        "kasmina_model_compute_seconds_total{model=\"m\\\"1\",kind=\"train\"} 0\n",
        "# TYPE kasmina_gate_evaluations_total counter\n",
        "# TYPE kasmina_slot_contribution gauge\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        cr_expect(strstr(b.p, want[i]) != NULL, "missing: %s", want[i]);
    /* Unmeasured quantities and empty slots have no series (absent, never 0). */
    const char *absent[] = {"kasmina_slot_contribution{", "kasmina_slot_gradient_health{",
                            "kasmina_slot_val_accuracy{model=\"m\\\"1\",slot=\"r0c1\"}",
                            "gate=\"G4\""};
    for (size_t i = 0; i < sizeof absent / sizeof absent[0]; i++)
        cr_expect(strstr(b.p, absent[i]) == NULL, "unexpected: %s", absent[i]);

    /* Every sample's family was announced by TYPE (and HELP) before it, and no family twice. */
    char *copy = strdup(b.p), *save = NULL;
    char typed[128][96];
    int n_typed = 0;
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "# TYPE ", 7) == 0) {
            char name[96];
            sscanf(line + 7, "%95s", name);
            for (int i = 0; i < n_typed; i++)
                cr_expect(strcmp(typed[i], name) != 0, "family %s typed twice", name);
            cr_assert_lt(n_typed, 128);
            strcpy(typed[n_typed++], name);
            continue;
        }
        if (line[0] == '#') continue;
        size_t len = strcspn(line, "{ ");
        cr_assert_gt(n_typed, 0);
        const char *fam = typed[n_typed - 1];
        bool ok = strncmp(line, fam, strlen(fam)) == 0 &&
                  (len == strlen(fam) || strncmp(line + strlen(fam), "_bucket", 7) == 0 ||
                   strncmp(line + strlen(fam), "_sum", 4) == 0 ||
                   strncmp(line + strlen(fam), "_count", 6) == 0);
        cr_expect(ok, "sample outside its family %s: %s", fam, line);
    }
    free(copy);
    ksm_sbuf_free(&b);
    ksm_metrics_snapshot_free(s);
}

Test(prom, status_json_carries_devices_models_slots_and_caches)
{
    struct ksm_metrics_snapshot *s = synthetic();
    struct ksm_sbuf b = {0};
    cr_assert_eq(ksm_metrics_render_status(s, NULL, &BI, &b), 0);
    json_error_t je;
    json_t *doc = json_loads(b.p, 0, &je);
    cr_assert_not_null(doc, "%s", je.text);
    cr_expect_str_eq(json_string_value(json_object_get(doc, "version")), "1.2.3");
    json_t *dev = json_array_get(json_object_get(doc, "devices"), 0);
    cr_expect_eq(json_integer_value(json_object_get(dev, "allocated_peak_bytes")), 1024);
    json_t *m = json_array_get(json_object_get(doc, "models"), 0);
    cr_expect_str_eq(json_string_value(json_object_get(m, "id")), "m\"1");
    json_t *sl = json_array_get(json_object_get(m, "slots"), 0);
    cr_expect_str_eq(json_string_value(json_object_get(sl, "stage_name")), "BLENDING");
    cr_expect_float_eq(json_real_value(json_object_get(sl, "alpha")), 0.375, 1e-12);
    sl = json_array_get(json_object_get(m, "slots"), 1);
    cr_expect_str_eq(json_string_value(json_object_get(sl, "stage_name")), "EMPTY");
    cr_expect_eq(json_array_size(json_object_get(doc, "caches")), 2);
    json_t *g = json_array_get(json_object_get(m, "last_gates"), 0);
    cr_expect_str_eq(json_string_value(json_object_get(g, "gate")), "G2");
    cr_expect_str_eq(json_string_value(json_object_get(g, "target_stage")), "BLENDING");
    cr_expect(json_is_false(json_object_get(g, "passed")));
    json_t *fc = json_object_get(g, "failed_checks");
    cr_expect_eq(json_array_size(fc), 1); /* the passed check is not listed */
    cr_expect_str_eq(json_string_value(json_object_get(json_array_get(fc, 0), "detail")),
                     "epochs_in_current_stage 3 < 10");
    json_decref(doc);
    ksm_sbuf_free(&b);
    ksm_metrics_snapshot_free(s);
}

Test(prom, samples_a_real_engine)
{
    struct ksm_engine_config ec = {.cpu_devices = 2};
    ksm_engine *e;
    char err[256];
    cr_assert_eq(ksm_engine_new(&ec, &e, err, sizeof err), 0, "%s", err);
    static const char *const slots[] = {"r0c0", "r0c1"};
    struct ksm_model_spec spec = {
        .topology = KSM_TOPOLOGY_CNN, .slots = slots, .n_slots = 2, .device = "cpu:1"};
    spec.cnn = (struct ksm_cnn_spec){
        .num_classes = 4, .n_blocks = 2, .base_channels = 8, .pool_layers = -1};
    ksm_model *m;
    cr_assert_eq(ksm_engine_model_create(e, "snap-model", &spec, &m, err, sizeof err), 0, "%s",
                 err);
    struct ksm_metrics_snapshot *s;
    cr_assert_eq(ksm_metrics_snapshot_take(e, &s), 0);
    cr_expect_eq(s->n_devices, 2);
    cr_assert_eq(s->n_models, 1);
    cr_expect_str_eq(s->models[0].info.model_id, "snap-model");
    cr_expect_eq(s->models[0].n_slots, 2);
    cr_expect_gt(s->models[0].n_caches, 0);
    struct ksm_mem_stats st;
    ksm_alloc_get_stats(ksm_engine_allocator(e, ksm_engine_find_device(e, "cpu:1")), &st);
    cr_expect_eq(s->devices[1].st.pool[KSM_POOL_ALL].allocated_bytes.current,
                 st.pool[KSM_POOL_ALL].allocated_bytes.current);
    cr_expect_gt(st.pool[KSM_POOL_ALL].allocated_bytes.current, 0);
    struct ksm_sbuf b = {0};
    cr_assert_eq(ksm_metrics_render_prom(s, NULL, &BI, &b), 0);
    cr_expect(strstr(b.p, "kasmina_slot_occupied{model=\"snap-model\",slot=\"r0c1\"} 0\n") != NULL);
    ksm_sbuf_free(&b);
    ksm_metrics_snapshot_free(s);
    ksm_model_unref(m);
    ksm_engine_free(e);
}
