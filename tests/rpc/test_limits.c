/*
 * Limits of a real kasminad: each one exceeded once gives RESOURCE_EXHAUSTED whose message names
 * the option and its value; a normal call right after succeeds and the daemon keeps serving.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "sec_daemon.h"

TestSuite(limits, .timeout = 180);

#define OK(call)                                                                                   \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        cr_assert_eq(rc_, 0, "%s: %s (%s)", #call, e.message, ksm_err_name(rc_));                  \
    } while (0)

/* rc must be code / RESOURCE_EXHAUSTED with want in the message. */
#define EXHAUSTED_AS(code, call, want)                                                             \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        cr_expect_eq(rc_, code, "%s: %s (%s)", #call, e.message, ksm_err_name(rc_));               \
        cr_expect_eq(e.grpc_status, 8 /* RESOURCE_EXHAUSTED */);                                   \
        cr_expect_not_null(strstr(e.message, want), "'%s' not in '%s'", want, e.message);          \
    } while (0)
/* The daemon's own limits answer KSM_ELIMIT; the engine's (models, seeds) have codes of theirs. */
#define EXHAUSTED(call, want) EXHAUSTED_AS(KSM_ELIMIT, call, want)

static struct ksm_model_spec small_cnn(bool permissive)
{
    struct ksm_model_spec s = {.topology = KSM_TOPOLOGY_CNN,
                               .cnn = {.num_classes = 10, .base_channels = 8, .pool_layers = -1},
                               .init_seed = 1,
                               .permissive_gates = permissive};
    return s;
}

static struct ksm_model_spec small_lm(void)
{
    struct ksm_model_spec s = {.topology = KSM_TOPOLOGY_TRANSFORMER,
                               .transformer = {.vocab_size = 64,
                                               .n_embd = 16,
                                               .n_head = 2,
                                               .n_layer = 2,
                                               .block_size = 32,
                                               .num_segments = 2},
                               .init_seed = 1};
    return s;
}

/* x [b,3,32,32] F32, y [b] I64 (malloc'd data). */
static void cnn_batch(int64_t b, ksm_tensor *x, ksm_tensor *y)
{
    int64_t xs[4] = {b, 3, 32, 32}, ys[1] = {b};
    size_t n = (size_t)(b * 3 * 32 * 32);
    float *xd = malloc(n * sizeof *xd);
    int64_t *yd = malloc((size_t)b * sizeof *yd);
    for (size_t i = 0; i < n; i++) xd[i] = (float)sin((double)i * 0.37) * 0.5f;
    for (int64_t i = 0; i < b; i++) yd[i] = i % 10;
    cr_assert_eq(ksm_tensor_init(x, NULL, xd, KSM_DTYPE_F32, 4, xs), 0);
    if (y)
        cr_assert_eq(ksm_tensor_init(y, NULL, yd, KSM_DTYPE_I64, 1, ys), 0);
    else
        free(yd);
}

static void tokens(int64_t b, int64_t t, ksm_tensor *x)
{
    int64_t s[2] = {b, t};
    int64_t *d = malloc((size_t)(b * t) * sizeof *d);
    for (int64_t i = 0; i < b * t; i++) d[i] = i % 64;
    cr_assert_eq(ksm_tensor_init(x, NULL, d, KSM_DTYPE_I64, 2, s), 0);
}

static int forward(ksm_client *c, const char *m, const ksm_tensor *x, const char *stream,
                   struct ksm_client_error *e)
{
    struct ksm_forward_args fa = {.input = x, .stream = stream};
    struct ksm_forward_result r;
    memset(&r, 0, sizeof r);
    int rc = ksm_client_forward(c, m, &fa, &r, e);
    if (rc == 0) ksm_host_tensor_free(&r.output);
    return rc;
}

static int evaluate(ksm_client *c, const char *m, const ksm_tensor *x, const ksm_tensor *y,
                    struct ksm_client_error *e)
{
    struct ksm_evaluate_args ea = {.input = x, .targets = y, .generate_standard = true};
    struct ksm_evaluate_result r;
    memset(&r, 0, sizeof r);
    int rc = ksm_client_evaluate(c, m, &ea, &r, e);
    if (rc == 0) ksm_evaluate_result_free(&r);
    return rc;
}

Test(limits, request_shape_models_and_seeds)
{
    struct sec_daemon d;
    sec_dir(&d);
    const char *args[] = {"--max-batch-rows",
                          "8",
                          "--max-sequence-length",
                          "16",
                          "--max-models",
                          "2",
                          "--max-seeds-per-model",
                          "1",
                          NULL};
    sec_start(&d, args);
    ksm_client *c = sec_connect(d.target, NULL);
    struct ksm_client_error e;
    struct ksm_model_info mi;
    struct ksm_model_spec cnn = small_cnn(true), lm = small_lm();
    OK(ksm_client_model_create(c, "m1", &cnn, &mi, &e));
    OK(ksm_client_model_create(c, "t1", &lm, &mi, &e));

    /* max-batch-rows: Forward and Evaluate. */
    ksm_tensor x9, y9, x8, y8;
    cnn_batch(9, &x9, &y9);
    cnn_batch(8, &x8, &y8);
    EXHAUSTED(forward(c, "m1", &x9, NULL, &e), "input has 9 rows; max-batch-rows = 8.");
    OK(forward(c, "m1", &x8, NULL, &e));
    EXHAUSTED(evaluate(c, "m1", &x9, &y9, &e), "max-batch-rows = 8");
    OK(evaluate(c, "m1", &x8, &y8, &e));

    /* max-sequence-length (transformer token ids [B, T]). */
    ksm_tensor t17, t16;
    tokens(1, 17, &t17);
    tokens(1, 16, &t16);
    EXHAUSTED(forward(c, "t1", &t17, NULL, &e),
              "input has sequence length 17; max-sequence-length = 16.");
    OK(forward(c, "t1", &t16, NULL, &e));

    /* max-models. */
    EXHAUSTED_AS(KSM_EMAXMODELS, ksm_client_model_create(c, "m3", &cnn, &mi, &e), "max-models = 2");
    OK(ksm_client_model_delete(c, "t1", NULL, &e));
    OK(ksm_client_model_create(c, "m3", &cnn, &mi, &e));

    /* max-seeds-per-model: a second live seed is refused, the refusal changes nothing, and once
     * the first is pruned another may grow. */
    struct ksm_germinate_args ga = {.blueprint_id = "conv_light", .init_seed = 3};
    struct ksm_slot_report r;
    OK(ksm_client_model_get(c, "m1", &mi, &e));
    cr_assert_geq(mi.n_slots, 2);
    const char *s0 = mi.slots[0].slot_id, *s1 = mi.slots[1].slot_id;
    OK(ksm_client_germinate(c, "m1", s0, &ga, &r, &e));
    uint64_t gen = mi.generation;
    OK(ksm_client_model_get(c, "m1", &mi, &e));
    gen = mi.generation;
    EXHAUSTED_AS(KSM_EMAXSEEDS, ksm_client_germinate(c, "m1", s1, &ga, &r, &e),
                 "model 'm1' already has 1 live seeds; max-seeds-per-model = 1.");
    OK(ksm_client_slot_reports(c, "m1", s1, &r, 1, NULL, &e));
    cr_expect(!r.occupied, "the refused germination left a seed");
    OK(ksm_client_model_get(c, "m1", &mi, &e));
    cr_expect_eq(mi.generation, gen, "the refused germination changed the model");
    /* Another model has its own count. */
    OK(ksm_client_germinate(c, "m3", s1, &ga, &r, &e));
    bool accepted = false;
    OK(ksm_client_prune(c, "m1", s0, "test", "limits", &accepted, &r, &e));
    cr_expect(accepted);
    OK(ksm_client_germinate(c, "m1", s1, &ga, &r, &e));

    ksm_host_tensor_free(&x9), ksm_host_tensor_free(&y9), ksm_host_tensor_free(&x8);
    ksm_host_tensor_free(&y8), ksm_host_tensor_free(&t17), ksm_host_tensor_free(&t16);
    ksm_client_close(c);
    cr_expect_eq(sec_stop(&d), 0);
}

/* Several threads hammering one target; counts successes and limit refusals. */
struct storm {
    const char *target, *model, *stream, *want;
    const ksm_tensor *x;
    int rounds;
    atomic_int ok, limited, other;
    char other_msg[600];
};

static void *storm_thread(void *arg)
{
    struct storm *s = arg;
    struct ksm_client_options o = {.deadline_ms = 30000};
    ksm_client *c;
    struct ksm_client_error e;
    if (ksm_client_connect(s->target, &o, &c, &e) != 0) {
        atomic_fetch_add(&s->other, 1);
        return NULL;
    }
    for (int i = 0; i < s->rounds; i++) {
        int rc = forward(c, s->model, s->x, s->stream, &e);
        if (rc == 0)
            atomic_fetch_add(&s->ok, 1);
        else if (rc == KSM_ELIMIT && e.grpc_status == 8 && strstr(e.message, s->want))
            atomic_fetch_add(&s->limited, 1);
        else {
            snprintf(s->other_msg, sizeof s->other_msg, "%s: %s", ksm_err_name(rc), e.message);
            atomic_fetch_add(&s->other, 1);
        }
    }
    ksm_client_close(c);
    return NULL;
}

/* Runs bursts of 8 threads until one call was refused by the limit (at most 20 bursts). */
static void storm_until_limited(struct storm *s)
{
    for (int burst = 0; burst < 20 && atomic_load(&s->limited) == 0; burst++) {
        pthread_t t[8];
        for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, storm_thread, s);
        for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    }
    cr_expect_gt(atomic_load(&s->limited), 0, "the limit (%s) never refused a call", s->want);
    cr_expect_eq(atomic_load(&s->other), 0, "unexpected failure: %s", s->other_msg);
    cr_expect_gt(atomic_load(&s->ok), 0);
}

Test(limits, queued_calls_per_stream)
{
    struct sec_daemon d;
    sec_dir(&d);
    const char *args[] = {"--max-queued-per-stream", "1", "--workers", "4", NULL};
    sec_start(&d, args);
    ksm_client *c = sec_connect(d.target, NULL);
    struct ksm_client_error e;
    struct ksm_model_info mi;
    struct ksm_model_spec cnn = small_cnn(true);
    OK(ksm_client_model_create(c, "m1", &cnn, &mi, &e));
    ksm_tensor x;
    cnn_batch(16, &x, NULL);
    struct storm s = {.target = d.target,
                      .model = "m1",
                      .stream = "s1",
                      .want = "model 'm1' stream 's1' already has 1 calls queued or running; "
                              "max-queued-per-stream = 1.",
                      .x = &x,
                      .rounds = 5};
    storm_until_limited(&s);
    /* Other streams and a calm call go through. */
    OK(forward(c, "m1", &x, "s2", &e));
    OK(forward(c, "m1", &x, "s1", &e));
    ksm_host_tensor_free(&x);
    ksm_client_close(c);
    cr_expect_eq(sec_stop(&d), 0);
}

Test(limits, concurrent_calls)
{
    struct sec_daemon d;
    sec_dir(&d);
    const char *args[] = {"--max-concurrent-calls", "1", "--workers", "1", NULL};
    sec_start(&d, args);
    ksm_client *c = sec_connect(d.target, NULL);
    struct ksm_client_error e;
    struct ksm_model_info mi;
    struct ksm_model_spec cnn = small_cnn(true);
    OK(ksm_client_model_create(c, "m1", &cnn, &mi, &e));
    ksm_tensor x;
    cnn_batch(16, &x, NULL);
    struct storm s = {.target = d.target,
                      .model = "m1",
                      .want = "Too many calls in flight: max-concurrent-calls = 1; retry later.",
                      .x = &x,
                      .rounds = 5};
    storm_until_limited(&s);
    OK(forward(c, "m1", &x, NULL, &e));
    ksm_host_tensor_free(&x);
    ksm_client_close(c);
    cr_expect_eq(sec_stop(&d), 0);
}

Test(limits, memory_cap)
{
    struct sec_daemon d;
    sec_dir(&d);
    const char *args[] = {"--memory-cap", "4M", NULL};
    sec_start(&d, args);
    ksm_client *c = sec_connect(d.target, NULL);
    struct ksm_client_error e;
    struct ksm_model_info mi;
    struct ksm_model_spec cnn = small_cnn(true);
    OK(ksm_client_model_create(c, "m1", &cnn, &mi, &e));
    /* The activations of 64 rows ([64, 8, 32, 32] floats each) do not fit in 4 MiB. */
    ksm_tensor big, one;
    cnn_batch(64, &big, NULL);
    cnn_batch(1, &one, NULL);
    int rc = forward(c, "m1", &big, NULL, &e);
    cr_expect_eq(rc, KSM_EDEVMEM, "%s (%s)", ksm_err_name(rc), e.message);
    cr_expect_eq(e.grpc_status, 8);
    cr_expect_not_null(strstr(e.message, "memory-cap = 4194304 bytes per device."), "%s",
                       e.message);
    OK(forward(c, "m1", &one, NULL, &e));
    ksm_host_tensor_free(&big), ksm_host_tensor_free(&one);
    ksm_client_close(c);
    cr_expect_eq(sec_stop(&d), 0);
}

Test(limits, message_size)
{
    struct sec_daemon d;
    sec_dir(&d);
    const char *args[] = {"--max-message-bytes", "64K", NULL};
    sec_start(&d, args);
    ksm_client *c = sec_connect(d.target, NULL);
    struct ksm_client_error e;
    struct ksm_model_info mi;
    struct ksm_model_spec cnn = small_cnn(true);
    OK(ksm_client_model_create(c, "m1", &cnn, &mi, &e));
    ksm_tensor one;
    cnn_batch(1, &one, NULL);
    /* max-message-bytes: gRPC refuses the message before it is decoded (its message gives the
     * size and the limit). */
    int rc;
    size_t n = 100000;
    char *blob = calloc(1, n);
    rc = ksm_client_load_weights(c, "m1", blob, n, false, NULL, &e);
    free(blob);
    cr_expect_eq(e.grpc_status, 8, "%s (%s)", ksm_err_name(rc), e.message);
    cr_expect_not_null(strstr(e.message, "65536"), "the limit's value is not named: %s", e.message);
    OK(forward(c, "m1", &one, NULL, &e));
    ksm_host_tensor_free(&one);
    ksm_client_close(c);
    cr_expect_eq(sec_stop(&d), 0);
}

/* subscriber-buffer is exercised by rpc_server (test_server.py, slow_subscriber): a stalled
 * subscriber needs HTTP/2 flow control to push back, which that test arranges deterministically
 * with a channel whose BDP probing is off; through the C client's default channel the window
 * can grow past what a bounded test produces. */
