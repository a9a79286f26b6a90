/* wire/convert: protobuf-c messages <-> engine structs, without a network. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "wire/convert.h"

TestSuite(convert, .timeout = 10);

static char err[256];

static Kasmina__V1__Tensor mk_tensor(int dtype, const int64_t *shape, size_t n, void *data,
                                     size_t len)
{
    Kasmina__V1__Tensor t = KASMINA__V1__TENSOR__INIT;
    t.dtype = (Kasmina__V1__DType)dtype;
    t.shape = (int64_t *)shape;
    t.n_shape = n;
    t.data.data = data;
    t.data.len = len;
    return t;
}

/* ---- Tensor ---- */

Test(convert, tensor_accepts_a_consistent_f32_tensor)
{
    float v[6] = {1, 2, 3, 4, 5, 6};
    int64_t shape[] = {2, 3};
    Kasmina__V1__Tensor pb = mk_tensor(KASMINA__V1__DTYPE__DTYPE_F32, shape, 2, v, sizeof v);
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    ksm_tensor t;
    cr_assert_eq(ksm_wire_tensor_from_pb(&pb, "input", &a, &t, err, sizeof err), 0, "%s", err);
    cr_expect_eq(t.dtype, KSM_DTYPE_F32);
    cr_expect_eq(t.ndim, 2);
    cr_expect_eq(t.shape[0], 2);
    cr_expect_eq(t.shape[1], 3);
    cr_expect_eq(t.stride[0], 3);
    cr_expect_eq(t.stride[1], 1);
    cr_expect_eq(t.data, (void *)v, "aligned data is not copied");
    cr_expect_null(t.dev);
    ksm_pb_arena_fini(&a);
}

Test(convert, tensor_copies_unaligned_data)
{
    _Alignas(16) unsigned char buf[4 * 8 + 1];
    int64_t vals[4] = {1, -2, 3, 1LL << 40};
    memcpy(buf + 1, vals, sizeof vals);
    int64_t shape[] = {4};
    Kasmina__V1__Tensor pb =
        mk_tensor(KASMINA__V1__DTYPE__DTYPE_I64, shape, 1, buf + 1, sizeof vals);
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    ksm_tensor t;
    cr_assert_eq(ksm_wire_tensor_from_pb(&pb, "input", &a, &t, err, sizeof err), 0, "%s", err);
    cr_expect_neq(t.data, (void *)(buf + 1));
    cr_expect_eq((uintptr_t)t.data % 8, 0);
    cr_expect_eq(memcmp(t.data, vals, sizeof vals), 0);
    ksm_pb_arena_fini(&a);
}

Test(convert, tensor_rejects_bad_headers_naming_the_field)
{
    float v[4] = {0};
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    ksm_tensor t;
    struct {
        int dtype;
        int64_t shape[8];
        size_t n;
        size_t len;
        const char *needle;
    } bad[] = {
        {KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED, {4}, 1, 16, "input.dtype"},
        {42, {4}, 1, 16, "input.dtype"},
        {KASMINA__V1__DTYPE__DTYPE_F32, {4}, 1, 15, "input.data"},
        {KASMINA__V1__DTYPE__DTYPE_F32, {5}, 1, 16, "input.data"},
        {KASMINA__V1__DTYPE__DTYPE_F16, {4}, 1, 16, "input.data"},
        {KASMINA__V1__DTYPE__DTYPE_F32, {-1, -4}, 2, 16, "input.shape[0]"},
        {KASMINA__V1__DTYPE__DTYPE_F32, {1, 1, 1, 1, 1, 1, 4}, 7, 16, "input.shape"},
        {KASMINA__V1__DTYPE__DTYPE_F32, {1LL << 40, 1LL << 40}, 2, 16, "overflow"},
        {KASMINA__V1__DTYPE__DTYPE_I64, {INT64_MAX}, 1, 16, "overflow"},
        {KASMINA__V1__DTYPE__DTYPE_F32, {1LL << 30, 1LL << 30, 0}, 3, 16, "input.data"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        Kasmina__V1__Tensor pb = mk_tensor(bad[i].dtype, bad[i].shape, bad[i].n, v, bad[i].len);
        err[0] = '\0';
        cr_expect_eq(ksm_wire_tensor_from_pb(&pb, "input", &a, &t, err, sizeof err), KSM_EINVAL,
                     "case %zu", i);
        cr_expect(strstr(err, bad[i].needle) != NULL, "case %zu: '%s' lacks '%s'", i, err,
                  bad[i].needle);
    }
    cr_expect_eq(ksm_wire_tensor_from_pb(NULL, "input", &a, &t, err, sizeof err), KSM_EINVAL);
    cr_expect_str_eq(err, "input must be set.");
    ksm_pb_arena_fini(&a);
}

Test(convert, tensor_allows_empty_and_scalar)
{
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    ksm_tensor t;
    int64_t shape[] = {0, 3};
    Kasmina__V1__Tensor pb = mk_tensor(KASMINA__V1__DTYPE__DTYPE_F32, shape, 2, NULL, 0);
    cr_expect_eq(ksm_wire_tensor_from_pb(&pb, "input", &a, &t, err, sizeof err), 0, "%s", err);
    cr_expect_not_null(t.data);
    float s = 2.5f;
    pb = mk_tensor(KASMINA__V1__DTYPE__DTYPE_F32, NULL, 0, &s, 4);
    cr_expect_eq(ksm_wire_tensor_from_pb(&pb, "input", &a, &t, err, sizeof err), 0, "%s", err);
    cr_expect_eq(t.ndim, 0);
    ksm_pb_arena_fini(&a);
}

Test(convert, tensor_round_trips_through_the_wire)
{
    float v[6] = {1, 2, 3, 4, 5, 6};
    ksm_tensor t = {
        .data = v, .dtype = KSM_DTYPE_F32, .ndim = 2, .shape = {3, 2}, .stride = {2, 1}};
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__Tensor pb;
    cr_assert_eq(ksm_wire_tensor_to_pb(&t, &a, &pb), 0);
    size_t n = kasmina__v1__tensor__get_packed_size(&pb);
    uint8_t *buf = malloc(n);
    kasmina__v1__tensor__pack(&pb, buf);
    Kasmina__V1__Tensor *u = kasmina__v1__tensor__unpack(NULL, n, buf);
    cr_assert_not_null(u);
    ksm_tensor back;
    cr_assert_eq(ksm_wire_tensor_from_pb_copy(u, "output", &back, err, sizeof err), 0, "%s", err);
    cr_expect_eq(back.ndim, 2);
    cr_expect_eq(back.shape[0], 3);
    cr_expect_eq(memcmp(back.data, v, sizeof v), 0);
    free(back.data);
    kasmina__v1__tensor__free_unpacked(u, NULL);
    free(buf);
    ksm_pb_arena_fini(&a);
}

Test(convert, tensor_output_in_half_precision_rounds_to_nearest_even)
{
    float v[8] = {1.0f, -2.0f, 0.0f, 65504.0f, 1e6f, 1.00048828125f /* halfway */, NAN, 3.0e-8f};
    ksm_tensor t = {.data = v, .dtype = KSM_DTYPE_F32, .ndim = 1, .shape = {8}, .stride = {1}};
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__Tensor pb;
    cr_assert_eq(ksm_wire_tensor_to_pb_as(&t, KASMINA__V1__DTYPE__DTYPE_F16, "output_dtype", &a,
                                          &pb, err, sizeof err),
                 0);
    cr_assert_eq(pb.data.len, 16);
    const uint16_t *h = (const uint16_t *)pb.data.data;
    cr_expect_eq(h[0], 0x3c00);
    cr_expect_eq(h[1], 0xc000);
    cr_expect_eq(h[2], 0x0000);
    cr_expect_eq(h[3], 0x7bff);
    cr_expect_eq(h[4], 0x7c00);
    cr_expect_eq(h[5], 0x3c00, "ties go to even: %#x", h[5]);
    cr_expect_eq(h[6] & 0x7c00, 0x7c00);
    cr_expect_neq(h[6] & 0x03ff, 0);
    cr_expect_eq(h[7], 0x0001, "3e-8 rounds to the smallest subnormal: %#x", h[7]);
    cr_assert_eq(ksm_wire_tensor_to_pb_as(&t, KASMINA__V1__DTYPE__DTYPE_BF16, "output_dtype", &a,
                                          &pb, err, sizeof err),
                 0);
    const uint16_t *b = (const uint16_t *)pb.data.data;
    cr_expect_eq(b[0], 0x3f80);
    cr_expect_eq(b[1], 0xc000);
    cr_expect_eq(ksm_wire_tensor_to_pb_as(&t, KASMINA__V1__DTYPE__DTYPE_I64, "output_dtype", &a,
                                          &pb, err, sizeof err),
                 KSM_EINVAL);
    ksm_pb_arena_fini(&a);
}

/* ---- Enums and ids ---- */

Test(convert, stage_five_and_unknown_enums_are_rejected)
{
    enum ksm_stage s;
    cr_expect_eq(ksm_wire_stage_from_pb(5, "target", &s, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "target") != NULL);
    cr_expect_eq(ksm_wire_stage_from_pb(11, "target", &s, err, sizeof err), KSM_EINVAL);
    cr_expect_eq(ksm_wire_stage_from_pb(-1, "target", &s, err, sizeof err), KSM_EINVAL);
    for (int v = 0; v <= 10; v++)
        if (v != 5) cr_expect_eq(ksm_wire_stage_from_pb(v, "target", &s, err, sizeof err), 0);
    enum ksm_alpha_curve c;
    cr_expect_eq(ksm_wire_curve_from_pb(4, "curve", &c, err, sizeof err), KSM_EINVAL);
    enum ksm_gate_level g;
    cr_expect_eq(ksm_wire_gate_level_from_pb(4, "gate", &g, err, sizeof err), KSM_EINVAL);
    cr_expect_eq(ksm_wire_gate_level_from_pb(5, "gate", &g, err, sizeof err), 0);
    enum ksm_dtype d;
    cr_expect_eq(ksm_wire_dtype_from_pb(0, "dtype", &d, err, sizeof err), KSM_EINVAL);
    cr_expect_eq(
        ksm_wire_dtype_from_pb(KASMINA__V1__DTYPE__DTYPE_BF16, "dtype", &d, err, sizeof err), 0);
    cr_expect_eq(d, KSM_DTYPE_BF16);
    cr_expect_eq(ksm_wire_dtype_to_pb(KSM_DTYPE_I32), KASMINA__V1__DTYPE__DTYPE_I32);
}

Test(convert, model_ids_follow_the_pattern)
{
    cr_expect_eq(ksm_wire_check_model_id("m-1.a_B", "model_id", true, err, sizeof err), 0);
    cr_expect_eq(ksm_wire_check_model_id("", "model_id", true, err, sizeof err), KSM_EINVAL);
    cr_expect_str_eq(err, "model_id must not be empty.");
    cr_expect_eq(ksm_wire_check_model_id("", "model_id", false, err, sizeof err), 0);
    cr_expect_eq(ksm_wire_check_model_id("a/b", "model_id", true, err, sizeof err), KSM_EINVAL);
    cr_expect_eq(ksm_wire_check_model_id("a b", "model_id", true, err, sizeof err), KSM_EINVAL);
    char longid[80];
    memset(longid, 'x', 65);
    longid[65] = '\0';
    cr_expect_eq(ksm_wire_check_model_id(longid, "model_id", true, err, sizeof err), KSM_EINVAL);
    longid[64] = '\0';
    cr_expect_eq(ksm_wire_check_model_id(longid, "model_id", true, err, sizeof err), 0);
    cr_expect_eq(ksm_wire_check_slot_id("r0c0", "slot_id", true, err, sizeof err), 0);
    cr_expect_eq(ksm_wire_check_slot_id("r0c0\n", "slot_id", true, err, sizeof err), KSM_EINVAL);
    cr_expect_eq(ksm_wire_check_slot_id("r000000000000000c1", "slot_id", true, err, sizeof err),
                 KSM_EINVAL);
}

/* ---- Requests ---- */

/* A transformer's dropout: unset stays unset (the engine defaults it to 0.1), 0 is a value, and
 * a float from the wire becomes the decimal the client wrote (0.1f -> 0.1). */
Test(convert, transformer_dropout)
{
    Kasmina__V1__CreateModelRequest pb = KASMINA__V1__CREATE_MODEL_REQUEST__INIT;
    Kasmina__V1__TransformerHostSpec tf = KASMINA__V1__TRANSFORMER_HOST_SPEC__INIT;
    pb.host_case = KASMINA__V1__CREATE_MODEL_REQUEST__HOST_TRANSFORMER;
    pb.transformer = &tf;
    struct ksm_model_spec spec;
    cr_assert_eq(ksm_wire_model_spec_from_pb(&pb, &spec, err, sizeof err), 0, "%s", err);
    cr_expect_not(spec.transformer.dropout_set);
    tf.opt_dropout_case = KASMINA__V1__TRANSFORMER_HOST_SPEC__OPT_DROPOUT_DROPOUT;
    const float in[4] = {0.0f, 0.1f, 0.25f, 0.3f};
    const double want[4] = {0.0, 0.1, 0.25, 0.3};
    for (int i = 0; i < 4; i++) {
        tf.dropout = in[i];
        cr_assert_eq(ksm_wire_model_spec_from_pb(&pb, &spec, err, sizeof err), 0, "%s", err);
        cr_expect(spec.transformer.dropout_set);
        cr_expect_eq(spec.transformer.dropout, want[i], "%.17g from %.9g", spec.transformer.dropout,
                     (double)in[i]);
        struct ksm_pb_arena a;
        ksm_pb_arena_init(&a);
        Kasmina__V1__CreateModelRequest out;
        cr_assert_eq(ksm_wire_model_spec_to_pb("m", &spec, &a, &out), 0);
        cr_expect_eq(out.transformer->opt_dropout_case,
                     KASMINA__V1__TRANSFORMER_HOST_SPEC__OPT_DROPOUT_DROPOUT);
        cr_expect_eq(out.transformer->dropout, in[i]);
        ksm_pb_arena_fini(&a);
    }
}

Test(convert, create_model_defaults_and_validates)
{
    Kasmina__V1__CreateModelRequest pb = KASMINA__V1__CREATE_MODEL_REQUEST__INIT;
    struct ksm_model_spec spec;
    cr_assert_eq(ksm_wire_model_spec_from_pb(&pb, &spec, err, sizeof err), 0, "%s", err);
    cr_expect_eq(spec.topology, KSM_TOPOLOGY_CNN);
    cr_expect_eq(spec.dtype, KSM_DTYPE_F32);
    cr_expect_eq(spec.n_slots, 0);
    cr_expect_not(spec.pool_layers_set);

    Kasmina__V1__CnnHostSpec cnn = KASMINA__V1__CNN_HOST_SPEC__INIT;
    cnn.num_classes = 7;
    cnn.opt_pool_layers_case = KASMINA__V1__CNN_HOST_SPEC__OPT_POOL_LAYERS_POOL_LAYERS;
    cnn.pool_layers = 0;
    char *slots[] = {"r0c0", "r0c2"};
    Kasmina__V1__GateLevel gates[] = {KASMINA__V1__GATE_LEVEL__GATE_G1,
                                      KASMINA__V1__GATE_LEVEL__GATE_G3};
    pb.model_id = "m1";
    pb.host_case = KASMINA__V1__CREATE_MODEL_REQUEST__HOST_CNN;
    pb.cnn = &cnn;
    pb.slots = slots;
    pb.n_slots = 2;
    pb.auto_forward_gates = gates;
    pb.n_auto_forward_gates = 2;
    pb.init_seed = 42;
    cr_assert_eq(ksm_wire_model_spec_from_pb(&pb, &spec, err, sizeof err), 0, "%s", err);
    cr_expect_eq(spec.cnn.num_classes, 7);
    cr_expect(spec.pool_layers_set);
    cr_expect_eq(spec.cnn.pool_layers, 0);
    cr_expect_eq(spec.n_slots, 2);
    cr_expect_str_eq(spec.slots[1], "r0c2");
    cr_expect_eq(spec.auto_forward_gates, (1u << 1) | (1u << 3));
    cr_expect_eq(spec.init_seed, 42);

    /* Round trip through the client direction and the wire. */
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__CreateModelRequest out;
    cr_assert_eq(ksm_wire_model_spec_to_pb("m1", &spec, &a, &out), 0);
    size_t n = kasmina__v1__create_model_request__get_packed_size(&out);
    uint8_t *buf = malloc(n);
    kasmina__v1__create_model_request__pack(&out, buf);
    Kasmina__V1__CreateModelRequest *u = kasmina__v1__create_model_request__unpack(NULL, n, buf);
    struct ksm_model_spec spec2;
    cr_assert_eq(ksm_wire_model_spec_from_pb(u, &spec2, err, sizeof err), 0, "%s", err);
    cr_expect_eq(spec2.cnn.num_classes, 7);
    cr_expect(spec2.pool_layers_set);
    cr_expect_eq(spec2.auto_forward_gates, spec.auto_forward_gates);
    cr_expect_str_eq(spec2.slots[0], "r0c0");
    kasmina__v1__create_model_request__free_unpacked(u, NULL);
    free(buf);
    ksm_pb_arena_fini(&a);

    gates[0] = KASMINA__V1__GATE_LEVEL__GATE_G0;
    cr_expect_eq(ksm_wire_model_spec_from_pb(&pb, &spec, err, sizeof err), KSM_EINVAL);
    gates[0] = KASMINA__V1__GATE_LEVEL__GATE_G1;
    slots[1] = "r0c0";
    cr_expect_eq(ksm_wire_model_spec_from_pb(&pb, &spec, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "slots[1]") != NULL, "%s", err);
    slots[1] = "r0c2";
    pb.dtype = KASMINA__V1__DTYPE__DTYPE_I64;
    cr_expect_eq(ksm_wire_model_spec_from_pb(&pb, &spec, err, sizeof err), KSM_EINVAL);
    pb.dtype = 0;
    pb.model_id = "bad id";
    cr_expect_eq(ksm_wire_model_spec_from_pb(&pb, &spec, err, sizeof err), KSM_EINVAL);
}

Test(convert, germinate_validates_and_round_trips)
{
    Kasmina__V1__GerminateRequest pb = KASMINA__V1__GERMINATE_REQUEST__INIT;
    struct ksm_germinate_args g;
    cr_expect_eq(ksm_wire_germinate_from_pb(&pb, &g, err, sizeof err), KSM_EINVAL);
    cr_expect_str_eq(err, "model_id must not be empty.");
    pb.model_id = "m";
    cr_expect_eq(ksm_wire_germinate_from_pb(&pb, &g, err, sizeof err), KSM_EINVAL);
    cr_expect_str_eq(err, "slot_id must not be empty.");
    pb.slot_id = "r0c1";
    cr_expect_eq(ksm_wire_germinate_from_pb(&pb, &g, err, sizeof err), KSM_EINVAL);
    cr_expect_str_eq(err, "blueprint_id must not be empty.");
    pb.blueprint_id = "conv_light";
    cr_assert_eq(ksm_wire_germinate_from_pb(&pb, &g, err, sizeof err), 0, "%s", err);
    cr_expect_not(g.has_alpha_target);
    pb.opt_alpha_target_case = KASMINA__V1__GERMINATE_REQUEST__OPT_ALPHA_TARGET_ALPHA_TARGET;
    pb.alpha_target = NAN;
    cr_expect_eq(ksm_wire_germinate_from_pb(&pb, &g, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "alpha_target") != NULL);
    pb.alpha_target = 0.0f;
    cr_expect_eq(ksm_wire_germinate_from_pb(&pb, &g, err, sizeof err), KSM_EINVAL);
    pb.alpha_target = 0.5f;
    pb.alpha_algorithm = 9;
    cr_expect_eq(ksm_wire_germinate_from_pb(&pb, &g, err, sizeof err), KSM_EINVAL);
    pb.alpha_algorithm = KASMINA__V1__ALPHA_ALGORITHM__ALPHA_ALGORITHM_GATE;
    pb.blend_tempo_epochs = 3;
    pb.init_seed = 7;
    cr_assert_eq(ksm_wire_germinate_from_pb(&pb, &g, err, sizeof err), 0, "%s", err);
    cr_expect(g.has_alpha_target);
    cr_expect_float_eq(g.alpha_target, 0.5, 1e-9);
    cr_expect_eq(g.alpha_algorithm, KSM_ALGO_GATE);

    Kasmina__V1__GerminateRequest back;
    cr_assert_eq(ksm_wire_germinate_to_pb("m", "r0c1", &g, NULL, &back), 0);
    cr_expect_str_eq(back.blueprint_id, "conv_light");
    cr_expect_eq(back.opt_alpha_target_case,
                 KASMINA__V1__GERMINATE_REQUEST__OPT_ALPHA_TARGET_ALPHA_TARGET);
    cr_expect_eq(back.blend_tempo_epochs, 3);
    cr_expect_eq(back.init_seed, 7);
}

Test(convert, lifecycle_scalars_are_checked)
{
    struct ksm_lifecycle_args l;
    Kasmina__V1__AdvanceStageRequest adv = KASMINA__V1__ADVANCE_STAGE_REQUEST__INIT;
    adv.model_id = "m";
    adv.slot_id = "r0c0";
    adv.target = 5;
    cr_expect_eq(ksm_wire_advance_from_pb(&adv, &l, err, sizeof err), KSM_EINVAL);
    adv.target = KASMINA__V1__STAGE__STAGE_TRAINING;
    cr_expect_eq(ksm_wire_advance_from_pb(&adv, &l, err, sizeof err), 0);
    cr_expect_eq(l.target, KSM_STAGE_TRAINING);

    Kasmina__V1__SetAlphaRequest sa = KASMINA__V1__SET_ALPHA_REQUEST__INIT;
    sa.model_id = "m";
    sa.slot_id = "r0c0";
    sa.alpha = NAN;
    cr_expect_eq(ksm_wire_set_alpha_from_pb(&sa, &l, err, sizeof err), KSM_EINVAL);
    cr_expect_str_eq(err, "alpha must not be NaN.");
    sa.alpha = 2.0f; /* clamped by the engine */
    cr_expect_eq(ksm_wire_set_alpha_from_pb(&sa, &l, err, sizeof err), 0);

    Kasmina__V1__SetAlphaTargetRequest st = KASMINA__V1__SET_ALPHA_TARGET_REQUEST__INIT;
    st.model_id = "m";
    st.slot_id = "r0c0";
    st.alpha_target = 1.5f;
    cr_expect_eq(ksm_wire_set_alpha_target_from_pb(&st, &l, err, sizeof err), KSM_EINVAL);
    st.alpha_target = 0.7f;
    st.opt_steepness_case = KASMINA__V1__SET_ALPHA_TARGET_REQUEST__OPT_STEEPNESS_STEEPNESS;
    st.steepness = INFINITY;
    cr_expect_eq(ksm_wire_set_alpha_target_from_pb(&st, &l, err, sizeof err), KSM_EINVAL);
    st.steepness = 6.0f;
    st.curve = KASMINA__V1__ALPHA_CURVE__ALPHA_CURVE_COSINE;
    st.steps = 4;
    cr_assert_eq(ksm_wire_set_alpha_target_from_pb(&st, &l, err, sizeof err), 0, "%s", err);
    cr_expect(l.has_steepness);
    cr_expect_eq(l.curve, KSM_CURVE_COSINE);
    Kasmina__V1__SetAlphaTargetRequest st2;
    ksm_wire_set_alpha_target_to_pb(&l, &st2);
    cr_expect_float_eq(st2.alpha_target, 0.7f, 1e-6);
    cr_expect_eq(st2.steps, 4);

    Kasmina__V1__SchedulePruneRequest sp = KASMINA__V1__SCHEDULE_PRUNE_REQUEST__INIT;
    sp.model_id = "m";
    sp.slot_id = "r0c0";
    sp.curve = 77;
    cr_expect_eq(ksm_wire_schedule_prune_from_pb(&sp, &l, err, sizeof err), KSM_EINVAL);
    sp.curve = 0;
    char reason[100];
    memset(reason, 'r', 99);
    reason[99] = '\0';
    sp.reason = reason;
    cr_expect_eq(ksm_wire_schedule_prune_from_pb(&sp, &l, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "reason") != NULL);

    Kasmina__V1__PruneRequest pr = KASMINA__V1__PRUNE_REQUEST__INIT;
    pr.model_id = "m";
    cr_expect_eq(ksm_wire_prune_from_pb(&pr, &l, err, sizeof err), KSM_EINVAL);
}

Test(convert, metrics_reject_nan_and_out_of_range)
{
    Kasmina__V1__RecordMetricsRequest pb = KASMINA__V1__RECORD_METRICS_REQUEST__INIT;
    pb.model_id = "m";
    pb.slot_id = "r0c0";
    struct ksm_metrics_update u;
    cr_expect_eq(ksm_wire_metrics_from_pb(&pb, &u, err, sizeof err), 0);
    cr_expect_not(u.has_val_accuracy);
    pb.opt_val_accuracy_case = KASMINA__V1__RECORD_METRICS_REQUEST__OPT_VAL_ACCURACY_VAL_ACCURACY;
    pb.val_accuracy = NAN;
    cr_expect_eq(ksm_wire_metrics_from_pb(&pb, &u, err, sizeof err), KSM_EINVAL);
    pb.val_accuracy = 101;
    cr_expect_eq(ksm_wire_metrics_from_pb(&pb, &u, err, sizeof err), KSM_EINVAL);
    pb.val_accuracy = 55.5;
    Kasmina__V1__GradientStats g = KASMINA__V1__GRADIENT_STATS__INIT;
    g.opt_gradient_health_case = KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_HEALTH_GRADIENT_HEALTH;
    g.gradient_health = 1.5;
    pb.gradients = &g;
    cr_expect_eq(ksm_wire_metrics_from_pb(&pb, &u, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "gradients.gradient_health") != NULL);
    g.gradient_health = 0.9;
    g.opt_has_exploding_case = KASMINA__V1__GRADIENT_STATS__OPT_HAS_EXPLODING_HAS_EXPLODING;
    g.has_exploding = 1;
    pb.opt_epoch_case = KASMINA__V1__RECORD_METRICS_REQUEST__OPT_EPOCH_EPOCH;
    pb.epoch = 3;
    cr_assert_eq(ksm_wire_metrics_from_pb(&pb, &u, err, sizeof err), 0, "%s", err);
    cr_expect(u.has_val_accuracy && u.has_gradient_health && u.has_exploding && u.exploding);
    cr_expect(u.has_epoch && u.epoch == 3 && !u.has_max_epochs);

    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__RecordMetricsRequest back;
    cr_assert_eq(ksm_wire_metrics_to_pb("m", "r0c0", &u, &a, &back), 0);
    struct ksm_metrics_update u2;
    cr_assert_eq(ksm_wire_metrics_from_pb(&back, &u2, err, sizeof err), 0, "%s", err);
    cr_expect_eq(memcmp(&u, &u2, sizeof u), 0);
    ksm_pb_arena_fini(&a);
}

Test(convert, fused_forward_checks_overrides)
{
    float x[2 * 3] = {0};
    int64_t shape[] = {2, 3};
    Kasmina__V1__Tensor in = mk_tensor(KASMINA__V1__DTYPE__DTYPE_F32, shape, 2, x, sizeof x);
    float al[2] = {0.5f, 1.0f};
    Kasmina__V1__AlphaOverride o1 = KASMINA__V1__ALPHA_OVERRIDE__INIT, o2 = o1;
    o1.slot_id = "r0c0";
    o1.alpha = al;
    o1.n_alpha = 2;
    o2 = o1;
    Kasmina__V1__AlphaOverride *ov[] = {&o1, &o2};
    Kasmina__V1__FusedForwardRequest pb = KASMINA__V1__FUSED_FORWARD_REQUEST__INIT;
    pb.model_id = "m";
    pb.input = &in;
    pb.overrides = ov;
    pb.n_overrides = 2;
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    struct ksm_forward_args fa;
    int od;
    cr_expect_eq(ksm_wire_fused_forward_from_pb(&pb, &a, &fa, &od, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "repeats") != NULL, "%s", err);
    o2.slot_id = "r0c1";
    o2.n_alpha = 1;
    cr_expect_eq(ksm_wire_fused_forward_from_pb(&pb, &a, &fa, &od, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "rows") != NULL, "%s", err);
    o2.n_alpha = 2;
    al[1] = NAN;
    cr_expect_eq(ksm_wire_fused_forward_from_pb(&pb, &a, &fa, &od, err, sizeof err), KSM_EINVAL);
    al[1] = 1.0f;
    pb.output_dtype = KASMINA__V1__DTYPE__DTYPE_I32;
    cr_expect_eq(ksm_wire_fused_forward_from_pb(&pb, &a, &fa, &od, err, sizeof err), KSM_EINVAL);
    pb.output_dtype = 0;
    cr_assert_eq(ksm_wire_fused_forward_from_pb(&pb, &a, &fa, &od, err, sizeof err), 0, "%s", err);
    cr_expect(fa.fused);
    cr_expect_eq(fa.n_overrides, 2);
    cr_expect_eq(fa.overrides[1].n, 2);
    cr_expect_eq(od, KASMINA__V1__DTYPE__DTYPE_F32);
    cr_expect_eq(fa.input->shape[0], 2);

    Kasmina__V1__FusedForwardRequest back;
    cr_assert_eq(ksm_wire_fused_forward_to_pb("m", &fa, od, &a, &back), 0);
    cr_expect_eq(back.n_overrides, 2);
    cr_expect_eq(back.input->data.len, sizeof x);
    ksm_pb_arena_fini(&a);
}

Test(convert, evaluate_request_needs_configs_and_integer_targets)
{
    float x[4] = {0};
    int64_t xs[] = {2, 2};
    int64_t y[2] = {1, 0};
    int64_t ys[] = {2};
    Kasmina__V1__Tensor in = mk_tensor(KASMINA__V1__DTYPE__DTYPE_F32, xs, 2, x, sizeof x);
    Kasmina__V1__Tensor tg = mk_tensor(KASMINA__V1__DTYPE__DTYPE_I64, ys, 1, y, sizeof y);
    Kasmina__V1__EvaluateRequest pb = KASMINA__V1__EVALUATE_REQUEST__INIT;
    pb.model_id = "m";
    pb.input = &in;
    pb.targets = &tg;
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    struct ksm_evaluate_args ea;
    cr_expect_eq(ksm_wire_evaluate_from_pb(&pb, &a, &ea, err, sizeof err), KSM_EINVAL);
    pb.generate_standard = 1;
    cr_assert_eq(ksm_wire_evaluate_from_pb(&pb, &a, &ea, err, sizeof err), 0, "%s", err);
    Kasmina__V1__AlphaConfig__AlphaEntry e1 = KASMINA__V1__ALPHA_CONFIG__ALPHA_ENTRY__INIT;
    e1.key = "r0c1";
    e1.value = 0.0f;
    Kasmina__V1__AlphaConfig__AlphaEntry *es[] = {&e1};
    Kasmina__V1__AlphaConfig c = KASMINA__V1__ALPHA_CONFIG__INIT;
    c.name = "solo:r0c1";
    c.alpha = es;
    c.n_alpha = 1;
    Kasmina__V1__AlphaConfig *cs[] = {&c, &c};
    pb.configs = cs;
    pb.n_configs = 2;
    cr_expect_eq(ksm_wire_evaluate_from_pb(&pb, &a, &ea, err, sizeof err), KSM_EINVAL);
    pb.n_configs = 1;
    cr_assert_eq(ksm_wire_evaluate_from_pb(&pb, &a, &ea, err, sizeof err), 0, "%s", err);
    cr_expect_eq(ea.n_configs, 1);
    cr_expect_str_eq(ea.configs[0].slot_ids[0], "r0c1");
    tg.dtype = KASMINA__V1__DTYPE__DTYPE_F32;
    tg.data.len = 8;
    cr_expect_eq(ksm_wire_evaluate_from_pb(&pb, &a, &ea, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "targets") != NULL);
    ksm_pb_arena_fini(&a);
}

Test(convert, evaluate_attribution_fields_and_estimates_round_trip)
{
    float x[4] = {0};
    int64_t xs[] = {2, 2};
    int64_t y[2] = {1, 0};
    int64_t ys[] = {2};
    Kasmina__V1__Tensor in = mk_tensor(KASMINA__V1__DTYPE__DTYPE_F32, xs, 2, x, sizeof x);
    Kasmina__V1__Tensor tg = mk_tensor(KASMINA__V1__DTYPE__DTYPE_I64, ys, 1, y, sizeof y);
    Kasmina__V1__EvaluateRequest pb = KASMINA__V1__EVALUATE_REQUEST__INIT;
    pb.model_id = "m";
    pb.input = &in;
    pb.targets = &tg;
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    struct ksm_evaluate_args ea;
    /* Attribution alone needs no configs. */
    pb.attribution = KASMINA__V1__ATTRIBUTION_MODE__ATTRIBUTION_PERMUTATION;
    pb.shapley_samples = 40;
    pb.attribution_seed = 0xfedcba9876543210ull;
    cr_assert_eq(ksm_wire_evaluate_from_pb(&pb, &a, &ea, err, sizeof err), 0, "%s", err);
    cr_expect_eq(ea.attribution, KSM_ATTRIBUTION_PERMUTATION);
    cr_expect_eq(ea.shapley_samples, 40);
    cr_expect_eq(ea.attribution_seed, 0xfedcba9876543210ull);
    Kasmina__V1__EvaluateRequest back;
    cr_assert_eq(ksm_wire_evaluate_to_pb("m", &ea, &a, &back), 0);
    cr_expect_eq(back.attribution, KASMINA__V1__ATTRIBUTION_MODE__ATTRIBUTION_PERMUTATION);
    cr_expect_eq(back.shapley_samples, 40);
    cr_expect_eq(back.attribution_seed, 0xfedcba9876543210ull);
    pb.shapley_samples = KSM_SHAPLEY_SAMPLES_MAX + 1;
    cr_expect_eq(ksm_wire_evaluate_from_pb(&pb, &a, &ea, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "shapley_samples") != NULL, "%s", err);
    pb.shapley_samples = 0;
    pb.attribution = (Kasmina__V1__AttributionMode)9;
    cr_expect_eq(ksm_wire_evaluate_from_pb(&pb, &a, &ea, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "attribution") != NULL, "%s", err);
    pb.attribution = KASMINA__V1__ATTRIBUTION_MODE__ATTRIBUTION_NONE;
    cr_expect_eq(ksm_wire_evaluate_from_pb(&pb, &a, &ea, err, sizeof err), KSM_EINVAL);
    /* The estimates out and back. */
    struct ksm_shapley_estimate sh[2] = {
        {.slot_id = "r0c1", .mean = 1.5, .std = 0.25, .n_samples = 17, .marginal = -3.0},
        {.slot_id = "r1c1", .mean = -2.0, .n_samples = 6, .marginal = 4.5}};
    strcpy(sh[0].algorithm, "permutation_antithetic");
    strcpy(sh[1].algorithm, "exact");
    struct ksm_interaction_term it = {.slot_a = "r0c1", .slot_b = "r1c1", .interaction = 6.25};
    struct ksm_evaluate_result r = {.model_generation = 3,
                                    .shapley = sh,
                                    .n_shapley = 2,
                                    .interactions = &it,
                                    .n_interactions = 1};
    Kasmina__V1__EvaluateResponse rep;
    cr_assert_eq(ksm_wire_evaluate_result_to_pb(&r, &a, &rep), 0);
    cr_assert_eq(rep.n_shapley, 2);
    cr_assert_eq(rep.n_interactions, 1);
    struct ksm_evaluate_result got;
    cr_assert_eq(ksm_wire_evaluate_result_from_pb(&rep, &got, err, sizeof err), 0, "%s", err);
    cr_assert_eq(got.n_shapley, 2);
    for (int i = 0; i < 2; i++) {
        cr_expect_str_eq(got.shapley[i].slot_id, sh[i].slot_id);
        cr_expect_eq(got.shapley[i].mean, sh[i].mean);
        cr_expect_eq(got.shapley[i].std, sh[i].std);
        cr_expect_eq(got.shapley[i].n_samples, sh[i].n_samples);
        cr_expect_str_eq(got.shapley[i].algorithm, sh[i].algorithm);
        cr_expect_eq(got.shapley[i].marginal, sh[i].marginal);
    }
    cr_assert_eq(got.n_interactions, 1);
    cr_expect_str_eq(got.interactions[0].slot_a, "r0c1");
    cr_expect_str_eq(got.interactions[0].slot_b, "r1c1");
    cr_expect_eq(got.interactions[0].interaction, 6.25);
    cr_expect_eq(got.n, 0);
    ksm_evaluate_result_free(&got);
    ksm_pb_arena_fini(&a);
}

/* ---- Replies ---- */

Test(convert, slot_report_round_trips_through_the_wire)
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
    r.controller.alpha_target = 1.0;
    r.controller.mode = KSM_ALPHA_UP;
    r.controller.curve = KSM_CURVE_LINEAR;
    r.controller.steepness = 12;
    r.controller.steps_total = 4;
    r.controller.steps_done = 1;
    r.blend_tempo_epochs = 5;
    r.metrics.epochs_total = 9;
    r.metrics.current_val_accuracy = 61.5;
    r.metrics.has_counterfactual = true;
    r.metrics.counterfactual_contribution = 1.25;
    r.total_improvement = 2.5;
    r.telemetry.has_gradient_norm = true;
    r.telemetry.gradient_norm = 0.5;
    r.is_healthy = true;
    r.seed_params = 1234;
    r.model_generation = 17;

    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__SlotReport pb;
    cr_assert_eq(ksm_wire_slot_report_to_pb("m1", &r, &a, &pb), 0);
    size_t n = kasmina__v1__slot_report__get_packed_size(&pb);
    uint8_t *buf = malloc(n);
    kasmina__v1__slot_report__pack(&pb, buf);
    ksm_pb_arena_fini(&a);
    Kasmina__V1__SlotReport *u = kasmina__v1__slot_report__unpack(NULL, n, buf);
    cr_assert_not_null(u);
    cr_expect_str_eq(u->model_id, "m1");
    struct ksm_slot_report b;
    cr_assert_eq(ksm_wire_slot_report_from_pb(u, &b, err, sizeof err), 0, "%s", err);
    cr_expect_str_eq(b.slot_id, "r0c1");
    cr_expect_str_eq(b.seed_id, "r0c1-conv_light");
    cr_expect_eq(b.stage, KSM_STAGE_BLENDING);
    cr_expect_eq(b.previous_stage, KSM_STAGE_TRAINING);
    cr_expect_float_eq(b.controller.alpha, 0.25, 1e-7);
    cr_expect_eq(b.controller.mode, KSM_ALPHA_UP);
    cr_expect_eq(b.controller.steps_done, 1);
    cr_expect_eq(b.metrics.epochs_total, 9);
    cr_expect(b.metrics.has_counterfactual);
    cr_expect_float_eq(b.metrics.counterfactual_contribution, 1.25, 1e-12);
    cr_expect_float_eq(b.total_improvement, 2.5, 1e-12);
    cr_expect(b.telemetry.has_gradient_norm);
    cr_expect_not(b.telemetry.has_gradient_health);
    cr_expect_eq(b.seed_params, 1234);
    cr_expect_eq(b.model_generation, 17);
    kasmina__v1__slot_report__free_unpacked(u, NULL);
    free(buf);
}

Test(convert, event_round_trips_with_gate_and_values)
{
    struct ksm_lifecycle_event ev;
    memset(&ev, 0, sizeof ev);
    ev.type = KSM_EV_SEED_GATE_EVALUATED;
    strcpy(ev.model_id, "m1");
    strcpy(ev.slot_id, "r0c0");
    strcpy(ev.seed_id, "s");
    ev.timestamp_ns = 1234567890123;
    ev.target_stage = KSM_STAGE_TRAINING;
    ev.gate.gate = KSM_GATE_G1;
    ev.gate.passed = true;
    ev.gate.n_passed = 2;
    strcpy(ev.gate.checks_passed[0], "a");
    strcpy(ev.gate.checks_passed[1], "b");
    strcpy(ev.gate.message, "ok");
    ev.n_values = 1;
    ev.values[0].key = "score";
    ev.values[0].value = 0.75;
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__LifecycleEvent pb;
    cr_assert_eq(ksm_wire_event_to_pb(99, &ev, &a, &pb), 0);
    cr_expect_str_eq(pb.event_type, "SEED_GATE_EVALUATED");
    size_t n = kasmina__v1__lifecycle_event__get_packed_size(&pb);
    uint8_t *buf = malloc(n);
    kasmina__v1__lifecycle_event__pack(&pb, buf);
    ksm_pb_arena_fini(&a);
    Kasmina__V1__LifecycleEvent *u = kasmina__v1__lifecycle_event__unpack(NULL, n, buf);
    uint64_t seq;
    struct ksm_lifecycle_event b;
    cr_assert_eq(ksm_wire_event_from_pb(u, &seq, &b, err, sizeof err), 0, "%s", err);
    cr_expect_eq(seq, 99);
    cr_expect_eq(b.type, KSM_EV_SEED_GATE_EVALUATED);
    cr_expect_eq(b.target_stage, KSM_STAGE_TRAINING);
    cr_expect_eq(b.gate.gate, KSM_GATE_G1);
    cr_expect_eq(b.gate.n_passed, 2);
    cr_expect_str_eq(b.gate.checks_passed[1], "b");
    cr_expect_eq(b.n_values, 1);
    cr_expect_str_eq(b.values[0].key, "score");
    cr_expect_eq(b.timestamp_ns, 1234567890123);
    kasmina__v1__lifecycle_event__free_unpacked(u, NULL);
    free(buf);
    enum ksm_lifecycle_type t;
    cr_expect_eq(ksm_wire_lifecycle_type_parse("SEED_PRUNED", &t), 0);
    cr_expect_eq(t, KSM_EV_SEED_PRUNED);
    cr_expect_eq(ksm_wire_lifecycle_type_parse("NOPE", &t), KSM_EINVAL);
}

Test(convert, gate_checks_round_trip_with_and_without_a_value)
{
    struct ksm_gate_result g;
    memset(&g, 0, sizeof g);
    g.gate = KSM_GATE_G2;
    g.n_failed = 2;
    strcpy(g.checks_failed[0], "seed_not_ready");
    strcpy(g.checks_failed[1], "gradient_stats_never_measured");
    g.n_checks = 2;
    g.checks[0] = (struct ksm_gate_check){.name = "seed_not_ready",
                                          .quantity = "epochs_in_current_stage",
                                          .op = ">=",
                                          .threshold = 10,
                                          .has_value = true,
                                          .value = 0, /* a measured 0 stays present */
                                          .detail = "epochs_in_current_stage 0 < 10"};
    g.checks[1] = (struct ksm_gate_check){.name = "gradient_stats_never_measured",
                                          .quantity = "seed_gradient_norm_ratio",
                                          .op = ">=",
                                          .threshold = 0.1,
                                          .detail = "never measured"};
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__GateResult pb;
    cr_assert_eq(ksm_wire_gate_to_pb(&g, &a, &pb), 0);
    cr_assert_eq(pb.n_checks, 2);
    cr_expect_eq(pb.checks[0]->opt_value_case, KASMINA__V1__GATE_CHECK__OPT_VALUE_VALUE);
    cr_expect_eq(pb.checks[1]->opt_value_case, KASMINA__V1__GATE_CHECK__OPT_VALUE__NOT_SET);
    size_t n = kasmina__v1__gate_result__get_packed_size(&pb);
    uint8_t *buf = malloc(n);
    kasmina__v1__gate_result__pack(&pb, buf);
    ksm_pb_arena_fini(&a);
    Kasmina__V1__GateResult *u = kasmina__v1__gate_result__unpack(NULL, n, buf);
    cr_assert_not_null(u);
    struct ksm_gate_result b;
    cr_assert_eq(ksm_wire_gate_from_pb(u, &b, err, sizeof err), 0, "%s", err);
    cr_expect_eq(b.n_checks, 2);
    cr_expect_str_eq(b.checks[0].name, "seed_not_ready");
    cr_expect_not(b.checks[0].passed);
    cr_expect_str_eq(b.checks[0].quantity, "epochs_in_current_stage");
    cr_expect_str_eq(b.checks[0].op, ">=");
    cr_expect_eq(b.checks[0].threshold, 10);
    cr_expect(b.checks[0].has_value);
    cr_expect_eq(b.checks[0].value, 0);
    cr_expect_str_eq(b.checks[0].detail, "epochs_in_current_stage 0 < 10");
    cr_expect_not(b.checks[1].has_value);
    cr_expect_eq(b.checks[1].threshold, 0.1);
    cr_expect_str_eq(b.checks_failed[1], "gradient_stats_never_measured");
    kasmina__v1__gate_result__free_unpacked(u, NULL);
    free(buf);
}

Test(convert, model_info_round_trips)
{
    struct ksm_model_info info;
    memset(&info, 0, sizeof info);
    strcpy(info.model_id, "demo");
    info.topology = KSM_TOPOLOGY_CNN;
    info.cnn = (struct ksm_cnn_spec){10, 3, 32, 3, 3, 3};
    strcpy(info.device, "cpu:0");
    info.n_slots = 2;
    strcpy(info.slots[0].slot_id, "r0c0");
    info.slots[0].surface = "block_end";
    info.slots[0].channels = 32;
    strcpy(info.slots[1].slot_id, "r0c2");
    info.slots[1].order = 1;
    info.slots[1].surface = "post_pool";
    info.host_params = 1000;
    info.generation = 5;
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__Model pb;
    cr_assert_eq(ksm_wire_model_to_pb(&info, &a, &pb), 0);
    struct ksm_model_info b;
    cr_assert_eq(ksm_wire_model_from_pb(&pb, &b, err, sizeof err), 0, "%s", err);
    cr_expect_str_eq(b.model_id, "demo");
    cr_expect_eq(b.cnn.n_blocks, 3);
    cr_expect_eq(b.n_slots, 2);
    cr_expect_eq(b.slots[1].col, 2);
    cr_expect_str_eq(b.slots[1].surface, "post_pool");
    cr_expect_eq(b.host_params, 1000);
    cr_expect_eq(b.generation, 5);
    ksm_pb_arena_fini(&a);
}

Test(convert, stats_round_trip)
{
    struct ksm_mem_stats s;
    memset(&s, 0, sizeof s);
    s.pool[KSM_POOL_ALL].allocated_bytes = (struct ksm_stat){100, 200, 300, 200};
    s.pool[KSM_POOL_LARGE].segment.current = 2;
    s.num_ooms = 1;
    s.memory_cap_bytes = 1 << 20;
    const char *ids[] = {"a", "b"};
    uint64_t bytes[] = {10, 20};
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__DeviceMemoryStats pb;
    cr_assert_eq(ksm_wire_mem_stats_to_pb("cpu:0", &s, ids, bytes, 2, &a, &pb), 0);
    cr_expect_eq(pb.n_per_model_bytes, 2);
    char dev[16];
    struct ksm_mem_stats b;
    ksm_wire_mem_stats_from_pb(&pb, dev, sizeof dev, &b);
    cr_expect_str_eq(dev, "cpu:0");
    cr_expect_eq(memcmp(&s, &b, sizeof s), 0);

    struct ksm_cache_counters c = {.cache = "plan", .hits = 3, .misses = 1, .capacity = 8};
    Kasmina__V1__CacheCounters cpb;
    cr_assert_eq(ksm_wire_cache_counters_to_pb("m", &c, &a, &cpb), 0);
    char mid[KSM_ID_MAX + 1];
    struct ksm_cache_counters cb;
    ksm_wire_cache_counters_from_pb(&cpb, mid, &cb);
    cr_expect_str_eq(mid, "m");
    cr_expect_str_eq(cb.cache, "plan");
    cr_expect_eq(cb.hits, 3);
    cr_expect_eq(cb.capacity, 8);
    ksm_pb_arena_fini(&a);
}

Test(convert, arena_handles_many_and_large_allocations)
{
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    for (int i = 0; i < 1000; i++) {
        unsigned char *p = ksm_pb_arena_alloc(&a, (size_t)(i % 100));
        cr_assert_not_null(p);
        cr_assert_eq((uintptr_t)p % 16, 0);
        memset(p, 0xab, (size_t)(i % 100));
    }
    unsigned char *big = ksm_pb_arena_alloc(&a, 1 << 20);
    cr_assert_not_null(big);
    big[(1 << 20) - 1] = 1;
    cr_expect_null(ksm_pb_arena_alloc(&a, SIZE_MAX - 4));
    cr_expect_str_eq(ksm_pb_arena_strdup(&a, "abc"), "abc");
    ksm_pb_arena_fini(&a);
    ksm_pb_arena_fini(&a);
}
