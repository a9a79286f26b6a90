/*
 * kasminactl without a server: value parsers, target resolution, exit codes, tables and JSON.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "kasmina/client.h"

TestSuite(ctl, .timeout = 10);

Test(ctl, integers_are_range_checked_and_name_the_option)
{
    char e[256];
    uint32_t u;
    uint64_t v;
    cr_expect_eq(ctl_parse_u32("--steps", "12", &u, e, sizeof e), 0);
    cr_expect_eq(u, 12);
    cr_expect_eq(ctl_parse_u32("--steps", "0x10", &u, e, sizeof e), 0);
    cr_expect_eq(u, 16);
    cr_expect_eq(ctl_parse_u32("--steps", "4294967296", &u, e, sizeof e), KSM_EINVAL);
    cr_expect(strstr(e, "--steps") != NULL, "%s", e);
    cr_expect_eq(ctl_parse_u32("--steps", "-1", &u, e, sizeof e), KSM_EINVAL);
    cr_expect_eq(ctl_parse_u32("--steps", "", &u, e, sizeof e), KSM_EINVAL);
    cr_expect_eq(ctl_parse_u32("--steps", "3x", &u, e, sizeof e), KSM_EINVAL);
    cr_expect_eq(ctl_parse_u64("--after", "18446744073709551615", &v, e, sizeof e), 0);
    cr_expect_eq(v, UINT64_MAX);
    cr_expect_eq(ctl_parse_u64("--after", "18446744073709551616", &v, e, sizeof e), KSM_EINVAL);
}

Test(ctl, doubles_must_be_finite)
{
    char e[256];
    double d;
    cr_expect_eq(ctl_parse_double("ALPHA", "0.25", &d, e, sizeof e), 0);
    cr_expect_float_eq(d, 0.25, 1e-12);
    cr_expect_eq(ctl_parse_double("ALPHA", "-1e-3", &d, e, sizeof e), 0);
    cr_expect_eq(ctl_parse_double("ALPHA", "nan", &d, e, sizeof e), KSM_EINVAL);
    cr_expect(strstr(e, "ALPHA must be a finite number") != NULL, "%s", e);
    cr_expect_eq(ctl_parse_double("ALPHA", "inf", &d, e, sizeof e), KSM_EINVAL);
    cr_expect_eq(ctl_parse_double("ALPHA", "1e999", &d, e, sizeof e), KSM_EINVAL);
    cr_expect_eq(ctl_parse_double("ALPHA", "0.5 ", &d, e, sizeof e), KSM_EINVAL);
}

Test(ctl, booleans)
{
    bool b;
    cr_expect_eq(ctl_parse_bool("--vanishing", "Yes", &b, NULL, 0), 0);
    cr_expect(b);
    cr_expect_eq(ctl_parse_bool("--vanishing", "off", &b, NULL, 0), 0);
    cr_expect(!b);
    cr_expect_eq(ctl_parse_bool("--vanishing", "maybe", &b, NULL, 0), KSM_EINVAL);
}

Test(ctl, stages_by_name_number_or_next)
{
    enum ksm_stage s;
    cr_expect_eq(ctl_parse_stage("--to", "training", &s, NULL, 0), 0);
    cr_expect_eq(s, KSM_STAGE_TRAINING);
    cr_expect_eq(ctl_parse_stage("--to", "STAGE_HOLDING", &s, NULL, 0), 0);
    cr_expect_eq(s, KSM_STAGE_HOLDING);
    cr_expect_eq(ctl_parse_stage("--to", "7", &s, NULL, 0), 0);
    cr_expect_eq(s, KSM_STAGE_FOSSILIZED);
    cr_expect_eq(ctl_parse_stage("--to", "next", &s, NULL, 0), 0);
    cr_expect_eq(s, KSM_STAGE_UNKNOWN);
    cr_expect_eq(ctl_parse_stage("--to", "5", &s, NULL, 0), KSM_EINVAL, "stage 5 is retired");
    cr_expect_eq(ctl_parse_stage("--to", "shadowing", &s, NULL, 0), KSM_EINVAL);
}

Test(ctl, enums_curves_algorithms_dtypes_gates)
{
    enum ksm_alpha_curve c;
    enum ksm_alpha_algorithm a;
    enum ksm_dtype d;
    unsigned g;
    cr_expect_eq(ctl_parse_curve("--curve", "Cosine", &c, NULL, 0), 0);
    cr_expect_eq(c, KSM_CURVE_COSINE);
    cr_expect_eq(ctl_parse_curve("--curve", "step", &c, NULL, 0), KSM_EINVAL);
    cr_expect_eq(ctl_parse_algorithm("--alpha-algorithm", "gate", &a, NULL, 0), 0);
    cr_expect_eq(a, KSM_ALGO_GATE);
    cr_expect_eq(ctl_parse_dtype("--dtype", "bf16", &d, NULL, 0), 0);
    cr_expect_eq(d, KSM_DTYPE_BF16);
    cr_expect_eq(ctl_parse_dtype("--dtype", "f64", &d, NULL, 0), KSM_EINVAL);
    cr_expect_eq(ctl_parse_gates("--auto-forward", "G1,g3", &g, NULL, 0), 0);
    cr_expect_eq(g, (1u << KSM_GATE_G1) | (1u << KSM_GATE_G3));
    cr_expect_eq(ctl_parse_gates("--auto-forward", "G1,,G2", &g, NULL, 0), KSM_EINVAL);
    cr_expect_eq(ctl_parse_gates("--auto-forward", "G5", &g, NULL, 0), KSM_EINVAL);
}

Test(ctl, alpha_configs_and_overrides)
{
    char e[256];
    struct ksm_alpha_config c;
    cr_assert_eq(ctl_parse_alpha_config("--config", "solo:r0c1=1,r0c2=0", &c, e, sizeof e), 0, "%s",
                 e);
    cr_expect_str_eq(c.name, "solo");
    cr_assert_eq(c.n, 2);
    cr_expect_str_eq(c.slot_ids[0], "r0c1");
    cr_expect_str_eq(c.slot_ids[1], "r0c2");
    cr_expect_float_eq(c.alpha[0], 1.0f, 0);
    cr_expect_float_eq(c.alpha[1], 0.0f, 0);
    ctl_alpha_config_free(&c);
    cr_expect_eq(ctl_parse_alpha_config("--config", "main", &c, e, sizeof e), 0);
    cr_expect_str_eq(c.name, "main");
    cr_expect_eq(c.n, 0);
    ctl_alpha_config_free(&c);
    cr_expect_eq(ctl_parse_alpha_config("--config", "x:r0c1", &c, e, sizeof e), KSM_EINVAL);
    cr_expect_eq(ctl_parse_alpha_config("--config", "x:=1", &c, e, sizeof e), KSM_EINVAL);
    cr_expect_eq(ctl_parse_alpha_config("--config", "x:r0c1=nan", &c, e, sizeof e), KSM_EINVAL);
    cr_expect_eq(ctl_parse_alpha_config("--config", ":r0c1=1", &c, e, sizeof e), KSM_EINVAL);

    struct ksm_alpha_override o;
    cr_assert_eq(ctl_parse_override("--override", "r1c0=0,0.5,1", &o, e, sizeof e), 0);
    cr_expect_str_eq(o.slot_id, "r1c0");
    cr_assert_eq(o.n, 3);
    cr_expect_float_eq(o.alpha[1], 0.5f, 0);
    ctl_alpha_override_free(&o);
    cr_expect_eq(ctl_parse_override("--override", "r1c0", &o, e, sizeof e), KSM_EINVAL);
    cr_expect_eq(ctl_parse_override("--override", "r1c0=1,", &o, e, sizeof e), KSM_EINVAL);
}

Test(ctl, tensor_references)
{
    char *file;
    const char *t;
    cr_assert_eq(ctl_parse_tensor_ref("--input", "x.safetensors:input", &file, &t, NULL, 0), 0);
    cr_expect_str_eq(file, "x.safetensors");
    cr_expect_str_eq(t, "input");
    free(file);
    cr_assert_eq(ctl_parse_tensor_ref("--input", "/tmp/a:b/x.safetensors", &file, &t, NULL, 0), 0);
    cr_expect_str_eq(file, "/tmp/a:b/x.safetensors");
    cr_expect_null(t);
    free(file);
    cr_expect_eq(ctl_parse_tensor_ref("--input", ":x", &file, &t, NULL, 0), KSM_EINVAL);
}

Test(ctl, targets_from_socket_addr_env_and_default)
{
    char b[256];
    unsetenv("KASMINA_ADDR");
    cr_expect_str_eq(ctl_resolve_target("/tmp/k.sock", "ignored:1", b, sizeof b),
                     "unix:/tmp/k.sock");
    cr_expect_str_eq(ctl_resolve_target(NULL, "127.0.0.1:7000", b, sizeof b), "127.0.0.1:7000");
    cr_expect_str_eq(ctl_resolve_target(NULL, "/run/x.sock", b, sizeof b), "unix:/run/x.sock");
    cr_expect_str_eq(ctl_resolve_target(NULL, "unix:/run/y.sock", b, sizeof b), "unix:/run/y.sock");
    setenv("KASMINA_ADDR", "localhost:9", 1);
    cr_expect_str_eq(ctl_resolve_target(NULL, NULL, b, sizeof b), "localhost:9");
    unsetenv("KASMINA_ADDR");
    setenv("XDG_RUNTIME_DIR", "/run/user/1000", 1);
    char d[256];
    ksm_client_default_target(d, sizeof d);
    cr_expect_str_eq(ctl_resolve_target(NULL, NULL, b, sizeof b), d);
    cr_expect(!strcmp(d, "unix:/run/user/1000/kasmina/kasminad.sock") ||
                  !strcmp(d, "unix:/run/kasmina/kasminad.sock"),
              "%s", d);
}

Test(ctl, exit_codes_per_status_class)
{
    cr_expect_eq(ctl_exit_code(0), CTL_EXIT_OK);
    cr_expect_eq(ctl_exit_code(3), CTL_EXIT_INVALID);  /* INVALID_ARGUMENT */
    cr_expect_eq(ctl_exit_code(11), CTL_EXIT_INVALID); /* OUT_OF_RANGE */
    cr_expect_eq(ctl_exit_code(5), CTL_EXIT_NOT_FOUND);
    cr_expect_eq(ctl_exit_code(9), CTL_EXIT_PRECONDITION);
    cr_expect_eq(ctl_exit_code(6), CTL_EXIT_PRECONDITION); /* ALREADY_EXISTS */
    cr_expect_eq(ctl_exit_code(14), CTL_EXIT_UNAVAILABLE);
    cr_expect_eq(ctl_exit_code(4), CTL_EXIT_UNAVAILABLE); /* DEADLINE_EXCEEDED */
    cr_expect_eq(ctl_exit_code(8), CTL_EXIT_EXHAUSTED);
    cr_expect_eq(ctl_exit_code(16), CTL_EXIT_AUTH);
    cr_expect_eq(ctl_exit_code(7), CTL_EXIT_AUTH);
    cr_expect_eq(ctl_exit_code(13), CTL_EXIT_OTHER); /* INTERNAL */
    cr_expect_eq(ctl_exit_code(12), CTL_EXIT_OTHER); /* UNIMPLEMENTED */
    /* Every KSM_E* lands in the class of the status the server sends for it. */
    cr_expect_eq(ctl_exit_code(ksm_client_grpc_from_code(KSM_ENOSLOT)), CTL_EXIT_INVALID);
    cr_expect_eq(ctl_exit_code(ksm_client_grpc_from_code(KSM_ENOMODEL)), CTL_EXIT_NOT_FOUND);
    cr_expect_eq(ctl_exit_code(ksm_client_grpc_from_code(KSM_ESTAGE)), CTL_EXIT_PRECONDITION);
    cr_expect_eq(ctl_exit_code(ksm_client_grpc_from_code(KSM_EDEVMEM)), CTL_EXIT_EXHAUSTED);
    cr_expect_eq(ctl_exit_code(ksm_client_grpc_from_code(KSM_ESHUTDOWN)), CTL_EXIT_UNAVAILABLE);
    cr_expect_str_eq(ksm_client_grpc_status_name(9), "FAILED_PRECONDITION");
    cr_expect_str_eq(ksm_client_grpc_status_name(99), "UNKNOWN");
}

Test(ctl, table_output_is_exact)
{
    static const char *const h[] = {"NAME", "N", "NOTE"};
    struct ctl_table *t = ctl_table_new(3, h);
    ctl_table_right(t, 1);
    ctl_table_row(t);
    ctl_table_cell(t, "%s", "alpha");
    ctl_table_cell(t, "%d", 7);
    ctl_table_cell(t, "x");
    ctl_table_row(t);
    ctl_table_cell(t, "%s", "b");
    ctl_table_cell(t, "%d", 1234);
    ctl_table_cell(t, "longer note");
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ctl_table_print(t, f);
    fclose(f);
    ctl_table_free(t);
    cr_expect_str_eq(buf, "NAME   N     NOTE\n"
                          "alpha     7  x\n"
                          "b      1234  longer note\n");
    free(buf);
}

static struct ksm_slot_report sample_report(void)
{
    struct ksm_slot_report r;
    memset(&r, 0, sizeof r);
    strcpy(r.slot_id, "r0c1");
    r.occupied = true;
    strcpy(r.seed_id, "r0c1-conv_light");
    strcpy(r.blueprint_id, "conv_light");
    r.stage = KSM_STAGE_BLENDING;
    r.previous_stage = KSM_STAGE_TRAINING;
    r.alpha_algorithm = KSM_ALGO_ADD;
    r.controller.alpha = 0.25;
    r.controller.alpha_target = 1;
    r.controller.mode = KSM_ALPHA_UP;
    r.controller.curve = KSM_CURVE_LINEAR;
    r.controller.steepness = 12;
    r.metrics.epochs_total = 4;
    r.metrics.epochs_in_current_stage = 1;
    r.metrics.current_val_accuracy = 61.5;
    r.metrics.has_counterfactual = true;
    r.metrics.counterfactual_contribution = 2.5;
    r.is_healthy = true;
    r.seed_params = 1234;
    r.model_generation = 9;
    return r;
}

Test(ctl, slot_report_table_row)
{
    struct ksm_slot_report r[2] = {sample_report()};
    strcpy(r[1].slot_id, "r0c2");
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ctl_print_slot_reports(r, 2, f);
    fclose(f);
    cr_expect(strstr(buf, "SLOT") == buf, "%s", buf);
    cr_expect(strstr(buf, "r0c1  r0c1-conv_light  conv_light  BLENDING") != NULL, "%s", buf);
    cr_expect(strstr(buf, "0.2500") != NULL, "%s", buf);
    cr_expect(strstr(buf, "1/4") != NULL, "%s", buf);
    cr_expect(strstr(buf, "61.50") != NULL, "%s", buf);
    cr_expect(strstr(buf, "r0c2  -                -           EMPTY\n") != NULL, "%s", buf);
    free(buf);
}

Test(ctl, slot_report_json_uses_proto_names)
{
    struct ksm_slot_report r = sample_report();
    json_t *j = ctl_json_slot_report(&r);
    cr_assert_not_null(j);
    cr_expect_str_eq(json_string_value(json_object_get(j, "stage")), "BLENDING");
    cr_expect_str_eq(json_string_value(json_object_get(j, "previous_stage")), "TRAINING");
    cr_expect_eq(json_integer_value(json_object_get(j, "model_generation")), 9);
    json_t *c = json_object_get(j, "controller");
    cr_expect_float_eq(json_real_value(json_object_get(c, "alpha")), 0.25, 1e-12);
    cr_expect_str_eq(json_string_value(json_object_get(c, "mode")), "UP");
    json_t *m = json_object_get(j, "metrics");
    cr_expect_float_eq(json_real_value(json_object_get(m, "counterfactual_contribution")), 2.5,
                       1e-12);
    cr_expect(json_is_null(json_object_get(m, "seed_gradient_norm_ratio")));
    json_decref(j);

    r.metrics.current_val_accuracy = NAN;
    j = ctl_json_slot_report(&r);
    cr_expect(json_is_null(json_object_get(json_object_get(j, "metrics"), "current_val_accuracy")),
              "NaN must become null: JSON has no NaN");
    json_decref(j);
    memset(&r, 0, sizeof r);
    strcpy(r.slot_id, "r1c1");
    j = ctl_json_slot_report(&r);
    cr_expect(json_is_false(json_object_get(j, "occupied")));
    cr_expect_null(json_object_get(j, "stage"));
    json_decref(j);
}

Test(ctl, gate_checks_print_with_their_numbers)
{
    struct ksm_gate_result g;
    memset(&g, 0, sizeof g);
    g.gate = KSM_GATE_G2;
    g.n_passed = 1;
    g.n_failed = 1;
    strcpy(g.checks_passed[0], "seed_gradient_active_0.50");
    strcpy(g.checks_failed[0], "seed_not_ready");
    char *buf = NULL;
    size_t len = 0;
    /* A server without details: esper's strings alone. */
    FILE *f = open_memstream(&buf, &len);
    ctl_print_gate(&g, f);
    fclose(f);
    cr_expect(strstr(buf, "gate G2: FAILED") && strstr(buf, "  + seed_gradient_active_0.50\n") &&
                  strstr(buf, "  - seed_not_ready\n"),
              "%s", buf);
    free(buf);
    g.n_checks = 2;
    g.checks[0] = (struct ksm_gate_check){.name = "seed_not_ready",
                                          .quantity = "epochs_in_current_stage",
                                          .op = ">=",
                                          .threshold = 10,
                                          .has_value = true,
                                          .value = 3,
                                          .detail = "epochs_in_current_stage 3 < 10"};
    g.checks[1] = (struct ksm_gate_check){.name = "seed_gradient_active_0.50",
                                          .passed = true,
                                          .quantity = "seed_gradient_norm_ratio",
                                          .op = ">=",
                                          .threshold = 0.1,
                                          .detail = "never"};
    f = open_memstream(&buf, &len);
    ctl_print_gate(&g, f);
    fclose(f);
    /* In the gate's order, each with its detail. */
    const char *a = strstr(buf, "  - seed_not_ready: epochs_in_current_stage 3 < 10\n");
    const char *b = strstr(buf, "  + seed_gradient_active_0.50: never\n");
    cr_expect(a != NULL && b != NULL && a < b, "%s", buf);
    free(buf);
    json_t *j = ctl_json_gate(&g);
    json_t *c0 = json_array_get(json_object_get(j, "checks"), 0);
    cr_expect_str_eq(json_string_value(json_object_get(c0, "detail")),
                     "epochs_in_current_stage 3 < 10");
    cr_expect_float_eq(json_real_value(json_object_get(c0, "value")), 3.0, 0);
    cr_expect_float_eq(json_real_value(json_object_get(c0, "threshold")), 10.0, 0);
    cr_expect_null(json_object_get(json_array_get(json_object_get(j, "checks"), 1), "value"));
    json_decref(j);

    struct ksm_lifecycle_event e;
    memset(&e, 0, sizeof e);
    e.type = KSM_EV_SEED_GATE_EVALUATED;
    e.gate = g;
    f = open_memstream(&buf, &len);
    ctl_print_event(7, &e, f);
    fclose(f);
    cr_expect(strstr(buf, "G2 failed") &&
                  strstr(buf, "\n        - seed_not_ready: epochs_in_current_stage 3 < 10\n"),
              "%s", buf);
    free(buf);
}

Test(ctl, gate_event_and_tensor_json)
{
    struct ksm_gate_result g;
    memset(&g, 0, sizeof g);
    g.gate = KSM_GATE_G2;
    g.passed = false;
    g.score = 0.5;
    g.n_failed = 1;
    strcpy(g.checks_failed[0], "improvement_below_threshold");
    json_t *j = ctl_json_gate(&g);
    cr_expect_str_eq(json_string_value(json_object_get(j, "gate")), "G2");
    cr_expect_str_eq(json_string_value(json_array_get(json_object_get(j, "checks_failed"), 0)),
                     "improvement_below_threshold");
    json_decref(j);

    struct ksm_lifecycle_event e;
    memset(&e, 0, sizeof e);
    e.type = KSM_EV_SEED_STAGE_CHANGED;
    strcpy(e.model_id, "m1");
    strcpy(e.slot_id, "r0c1");
    e.from_stage = KSM_STAGE_GERMINATED;
    e.to_stage = KSM_STAGE_TRAINING;
    e.n_values = 1;
    e.values[0].key = "epochs_in_stage";
    e.values[0].value = 3;
    j = ctl_json_event(42, &e);
    cr_expect_eq(json_integer_value(json_object_get(j, "sequence")), 42);
    cr_expect_str_eq(json_string_value(json_object_get(j, "event_type")), "SEED_STAGE_CHANGED");
    cr_expect_str_eq(json_string_value(json_object_get(j, "to_stage")), "TRAINING");
    cr_expect_float_eq(
        json_real_value(json_object_get(json_object_get(j, "values"), "epochs_in_stage")), 3.0, 0);
    json_decref(j);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ctl_print_event(42, &e, f);
    fclose(f);
    cr_expect(strstr(buf, "SEED_STAGE_CHANGED") && strstr(buf, "m1/r0c1") &&
                  strstr(buf, "GERMINATED -> TRAINING") && strstr(buf, "epochs_in_stage=3"),
              "%s", buf);
    free(buf);

    float data[4] = {1, -2, 0.5f, 3};
    ksm_tensor t;
    int64_t shape[2] = {2, 2};
    cr_assert_eq(ksm_tensor_init(&t, NULL, data, KSM_DTYPE_F32, 2, shape), 0);
    j = ctl_json_tensor(&t);
    cr_expect_str_eq(json_string_value(json_object_get(j, "dtype")), "F32");
    cr_expect_eq(json_array_size(json_object_get(j, "data")), 4);
    cr_expect_float_eq(json_real_value(json_array_get(json_object_get(j, "data"), 1)), -2.0, 0);
    json_decref(j);
    uint16_t h[2] = {0x3c00, 0xc000}; /* F16 1, -2 */
    int64_t s1 = 2;
    cr_assert_eq(ksm_tensor_init(&t, NULL, h, KSM_DTYPE_F16, 1, &s1), 0);
    cr_expect_float_eq(ctl_tensor_get(&t, 0), 1.0, 0);
    cr_expect_float_eq(ctl_tensor_get(&t, 1), -2.0, 0);
    uint16_t bf[1] = {0x3fc0}; /* BF16 1.5 */
    s1 = 1;
    cr_assert_eq(ksm_tensor_init(&t, NULL, bf, KSM_DTYPE_BF16, 1, &s1), 0);
    cr_expect_float_eq(ctl_tensor_get(&t, 0), 1.5, 0);
}

Test(ctl, bytes_are_human_readable)
{
    char b[32];
    cr_expect_str_eq(ctl_bytes(512, b, sizeof b), "512 B");
    cr_expect_str_eq(ctl_bytes(1536, b, sizeof b), "1.5 KiB");
    cr_expect_str_eq(ctl_bytes(20u << 20, b, sizeof b), "20.0 MiB");
}
