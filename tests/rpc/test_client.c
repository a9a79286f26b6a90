/*
 * libkasmina-client against a real kasminad on a temporary Unix socket: every RPC's happy path,
 * errors mapped back to KSM_E* with the server's sentence, the event stream.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kasmina/client.h"
#include "kasmina/safetensors.h"
#include "rpc_daemon.h"

TestSuite(client, .timeout = 240);

#define OK(call)                                                                                   \
    do {                                                                                           \
        struct ksm_client_error *e_ = &e;                                                          \
        int rc_ = (call);                                                                          \
        cr_assert_eq(rc_, 0, "%s: %s (%s)", #call, e_->message, ksm_err_name(rc_));                \
    } while (0)

static struct ksm_model_spec small_cnn(void)
{
    struct ksm_model_spec s = {.topology = KSM_TOPOLOGY_CNN,
                               .cnn = {.num_classes = 10, .base_channels = 8, .pool_layers = -1},
                               .init_seed = 1,
                               .permissive_gates = true};
    return s;
}

/* x [B,3,32,32] and targets [B] with a fixed pattern. */
static void make_batch(int64_t b, ksm_tensor *x, ksm_tensor *y)
{
    int64_t xs[4] = {b, 3, 32, 32}, ys[1] = {b};
    size_t n = (size_t)(b * 3 * 32 * 32);
    float *xd = malloc(n * sizeof *xd);
    int64_t *yd = malloc((size_t)b * sizeof *yd);
    for (size_t i = 0; i < n; i++) xd[i] = (float)sin((double)i * 0.37) * 0.5f;
    for (int64_t i = 0; i < b; i++) yd[i] = i % 10;
    cr_assert_eq(ksm_tensor_init(x, NULL, xd, KSM_DTYPE_F32, 4, xs), 0);
    cr_assert_eq(ksm_tensor_init(y, NULL, yd, KSM_DTYPE_I64, 1, ys), 0);
}

static void expect_gate(const struct ksm_gate_result *g, const struct ksm_slot_report *r,
                        enum ksm_stage stage)
{
    cr_assert(g->passed, "gate %s failed: %s %s", ksm_gate_level_name(g->gate), g->message,
              g->n_failed ? g->checks_failed[0] : "");
    cr_assert_eq(r->stage, stage, "stage %s, expected %s", ksm_stage_name(r->stage),
                 ksm_stage_name(stage));
}

/* germinate -> TRAINING -> (10 epochs of metrics) BLENDING -> (ramp) HOLDING -> FOSSILIZED,
 * with SetAlphaTarget during the ramp. Also used by the Python comparison (same numbers). */
static void drive_lifecycle(ksm_client *c, const char *m, const char *slot)
{
    struct ksm_client_error e;
    struct ksm_slot_report r;
    struct ksm_gate_result g;
    struct ksm_germinate_args ga = {.blueprint_id = "conv_light", .init_seed = 7};
    OK(ksm_client_germinate(c, m, slot, &ga, &r, &e));
    cr_expect(r.occupied);
    cr_expect_eq(r.stage, KSM_STAGE_GERMINATED);
    cr_expect_str_eq(r.blueprint_id, "conv_light");
    OK(ksm_client_advance(c, m, slot, KSM_STAGE_UNKNOWN, &g, &r, &e));
    expect_gate(&g, &r, KSM_STAGE_TRAINING);
    for (int i = 0; i < 10; i++) {
        struct ksm_metrics_update u = {.has_val_accuracy = true,
                                       .val_accuracy = 50.0 + i,
                                       .has_gradient_health = true,
                                       .gradient_health = 0.9,
                                       .has_exploding = true,
                                       .exploding = false,
                                       .has_gradient_norm = true,
                                       .gradient_norm = 1.5};
        OK(ksm_client_record_metrics(c, m, slot, &u, &r, &e));
    }
    cr_expect_float_eq(r.metrics.current_val_accuracy, 59.0, 1e-9);
    OK(ksm_client_advance(c, m, slot, KSM_STAGE_UNKNOWN, &g, &r, &e));
    expect_gate(&g, &r, KSM_STAGE_BLENDING);
    size_t n = 0;
    for (int i = 0; i < 20 && !(r.controller.mode == KSM_ALPHA_HOLD && r.controller.alpha >= 1.0);
         i++)
        OK(ksm_client_step_epoch(c, m, slot, &r, 1, &n, &e));
    cr_expect_eq(n, 1);
    /* Retargeting is allowed from HOLD: the same target again, on a cosine curve. */
    bool acc = false;
    OK(ksm_client_set_alpha_target(c, m, slot, 1.0, 2, KSM_CURVE_COSINE, false, 0,
                                   KSM_ALGO_UNSPECIFIED, &acc, &r, &e));
    for (int i = 0; i < 5 && !(r.controller.mode == KSM_ALPHA_HOLD && r.controller.alpha >= 1.0);
         i++)
        OK(ksm_client_step_epoch(c, m, slot, &r, 1, &n, &e));
    cr_expect_float_eq(r.controller.alpha, 1.0, 1e-6);
    OK(ksm_client_advance(c, m, slot, KSM_STAGE_UNKNOWN, &g, &r, &e));
    expect_gate(&g, &r, KSM_STAGE_HOLDING);
    struct ksm_metrics_update cf = {.has_counterfactual = true, .counterfactual = 2.0};
    OK(ksm_client_record_metrics(c, m, slot, &cf, &r, &e));
    cr_expect(r.metrics.has_counterfactual);
    OK(ksm_client_advance(c, m, slot, KSM_STAGE_UNKNOWN, &g, &r, &e));
    expect_gate(&g, &r, KSM_STAGE_FOSSILIZED);
}

struct seen {
    int n;
    uint64_t last_seq;
    bool ordered;
    int stage_changes;
};

static int count_event(void *ud, uint64_t seq, const struct ksm_lifecycle_event *ev)
{
    struct seen *s = ud;
    if (s->n && seq <= s->last_seq) s->ordered = false;
    s->last_seq = seq;
    s->n++;
    if (ev->type == KSM_EV_SEED_STAGE_CHANGED) s->stage_changes++;
    return 0;
}

Test(client, every_rpc_happy_path)
{
    struct rpc_daemon d;
    rpc_daemon_start(&d);
    ksm_client *c = rpc_connect(&d);
    struct ksm_client_error e;

    enum ksm_health_status hs;
    OK(ksm_client_health(c, "", &hs, &e));
    cr_expect_eq(hs, KSM_HEALTH_SERVING);
    OK(ksm_client_health(c, "kasmina.v1.Kasmina", &hs, &e));
    cr_expect_eq(hs, KSM_HEALTH_SERVING);

    struct ksm_client_server_info si;
    OK(ksm_client_server_info(c, &si, &e));
    cr_expect_str_eq(si.name, "kasminad");
    cr_expect(si.ready);
    cr_expect_geq(si.n_devices, 2);
    cr_expect_str_eq(si.devices[0].name, "cpu:0");
    /* the CPU devices name the OpenBLAS kernels their GEMMs run on */
    cr_expect_not_null(strstr(si.devices[0].description, "OpenBLAS GEMM: "), "%s",
                       si.devices[0].description);
    bool has_conv_light = false;
    for (size_t i = 0; i < si.n_cnn_blueprints; i++)
        has_conv_light |= !strcmp(si.cnn_blueprints[i], "conv_light");
    cr_expect(has_conv_light);
    ksm_client_server_info_free(&si);

    struct ksm_model_spec spec = small_cnn();
    struct ksm_model_info *mi = calloc(1, sizeof *mi);
    OK(ksm_client_model_create(c, "m1", &spec, mi, &e));
    cr_expect_str_eq(mi->model_id, "m1");
    cr_expect_eq(mi->topology, KSM_TOPOLOGY_CNN);
    cr_expect_eq(mi->cnn.num_classes, 10);
    cr_assert_geq(mi->n_slots, 2);
    cr_expect_gt(mi->host_params, 0);
    char slot0[KSM_SLOT_ID_MAX], slot1[KSM_SLOT_ID_MAX];
    strcpy(slot0, mi->slots[0].slot_id);
    strcpy(slot1, mi->slots[1].slot_id);
    uint64_t gen0 = mi->generation;
    OK(ksm_client_model_get(c, "m1", mi, &e));
    cr_expect_str_eq(mi->model_id, "m1");
    struct ksm_model_info *list;
    size_t nm;
    OK(ksm_client_model_list(c, &list, &nm, &e));
    cr_expect_eq(nm, 1);
    cr_expect_str_eq(list[0].model_id, "m1");
    free(list);

    struct ksm_slot_report reps[KSM_MAX_SLOTS];
    size_t nr;
    OK(ksm_client_slot_reports(c, "m1", NULL, reps, KSM_MAX_SLOTS, &nr, &e));
    cr_expect_eq(nr, (size_t)mi->n_slots);
    for (size_t i = 0; i < nr; i++) cr_expect(!reps[i].occupied);

    drive_lifecycle(c, "m1", slot0);

    /* A second seed: SetAlpha, SchedulePrune, Prune. */
    struct ksm_slot_report r;
    struct ksm_germinate_args ga = {.blueprint_id = "conv_light", .init_seed = 9};
    OK(ksm_client_germinate(c, "m1", slot1, &ga, &r, &e));
    OK(ksm_client_set_alpha(c, "m1", slot1, 0.5, &r, &e));
    cr_expect_float_eq(r.controller.alpha, 0.5, 1e-6);
    bool acc;
    OK(ksm_client_schedule_prune(c, "m1", slot1, 3, KSM_CURVE_LINEAR, true, 12.0, "test", "ci",
                                 &acc, &r, &e));
    OK(ksm_client_prune(c, "m1", slot1, "test", "ci", &acc, &r, &e));
    OK(ksm_client_slot_reports(c, "m1", slot1, reps, 1, &nr, &e));
    cr_expect_eq(nr, 1);
    OK(ksm_client_step_epoch(c, "m1", NULL, reps, KSM_MAX_SLOTS, &nr, &e));
    cr_expect_eq(nr, (size_t)mi->n_slots);

    /* Compute. */
    ksm_tensor x, y;
    make_batch(4, &x, &y);
    struct ksm_forward_args fa = {.input = &x};
    struct ksm_forward_result fr;
    OK(ksm_client_forward(c, "m1", &fa, &fr, &e));
    cr_expect_eq(fr.output.dtype, KSM_DTYPE_F32);
    cr_expect_eq(fr.output.ndim, 2);
    cr_expect_eq(fr.output.shape[0], 4);
    cr_expect_eq(fr.output.shape[1], 10);
    cr_expect_gt(fr.model_generation, gen0);
    float first = ((float *)fr.output.data)[0];
    cr_expect(isfinite(first));
    ksm_host_tensor_free(&fr.output);

    float alphas[4] = {1, 1, 0, 0};
    struct ksm_alpha_override ov = {.slot_id = slot0, .alpha = alphas, .n = 4};
    struct ksm_forward_args ffa = {.input = &x, .overrides = &ov, .n_overrides = 1, .fused = true};
    OK(ksm_client_forward(c, "m1", &ffa, &fr, &e));
    cr_expect_eq(fr.output.shape[0], 4);
    cr_expect_float_eq(((float *)fr.output.data)[0], first, 1e-5,
                       "alpha 1 on a fossilized seed is the blended forward");
    ksm_host_tensor_free(&fr.output);

    const char *ids[1] = {slot0};
    float off[1] = {0};
    struct ksm_alpha_config cfgs[2] = {{.name = "main"},
                                       {.name = "without", .slot_ids = ids, .alpha = off, .n = 1}};
    struct ksm_evaluate_args ea = {
        .input = &x, .targets = &y, .configs = cfgs, .n_configs = 2, .return_logits = true};
    struct ksm_evaluate_result er;
    OK(ksm_client_evaluate(c, "m1", &ea, &er, &e));
    cr_assert_eq(er.n, 2);
    cr_expect_str_eq(er.results[0].name, "main");
    cr_expect_str_eq(er.results[1].name, "without");
    cr_expect_eq(er.results[0].total, 4);
    cr_expect(isfinite(er.results[0].loss) && er.results[0].loss > 0);
    cr_expect_eq(er.results[0].logits.shape[0], 4);
    cr_expect_float_eq(((float *)er.results[0].logits.data)[0], first, 1e-5);
    ksm_evaluate_result_free(&er);
    struct ksm_evaluate_args es = {.input = &x, .targets = &y, .generate_standard = true};
    OK(ksm_client_evaluate(c, "m1", &es, &er, &e));
    cr_expect_geq(er.n, 1);
    ksm_evaluate_result_free(&er);
    free(x.data);
    free(y.data);

    /* Weights round trip. */
    void *st;
    size_t st_len;
    OK(ksm_client_export_weights(c, "m1", &st, &st_len, &e));
    ksm_st_file *sf;
    cr_assert_eq(ksm_st_parse(st, st_len, &sf, NULL, 0), 0);
    cr_expect_gt(ksm_st_count(sf), 0);
    ksm_st_close(sf);
    struct ksm_load_result lr;
    OK(ksm_client_load_weights(c, "m1", st, st_len, true, &lr, &e));
    cr_expect_gt(lr.n_loaded, 0);
    cr_expect_eq(lr.n_missing, 0);
    cr_expect_eq(lr.n_unexpected, 0);
    ksm_load_result_free(&lr);
    free(st);

    OK(ksm_client_model_move(c, "m1", "cpu:1", -1, mi, &e));
    cr_expect_str_eq(mi->device, "cpu:1");

    /* Statistics. */
    struct ksm_client_memory_stats ms;
    OK(ksm_client_memory_stats(c, NULL, &ms, &e));
    cr_expect_geq(ms.n, 2);
    cr_expect_str_eq(ms.devices[0].device, "cpu:0");
    ksm_client_memory_stats_free(&ms);
    OK(ksm_client_memory_stats(c, "cpu:1", &ms, &e));
    cr_expect_eq(ms.n, 1);
    ksm_client_memory_stats_free(&ms);
    struct ksm_client_cache_counters *cc;
    size_t ncc;
    OK(ksm_client_cache_stats(c, "m1", &cc, &ncc, &e));
    for (size_t i = 0; i < ncc; i++) cr_expect_str_eq(cc[i].model_id, "m1");
    free(cc);
    OK(ksm_client_empty_cache(c, NULL, &ms, &e));
    cr_expect_geq(ms.n, 2);
    ksm_client_memory_stats_free(&ms);

    /* Events: everything above, in order, then the stream idles out. */
    struct seen s = {.ordered = true};
    OK(ksm_client_watch_events(c, "m1", 0, 300, count_event, &s, &e));
    cr_expect_gt(s.n, 0);
    cr_expect(s.ordered);
    cr_expect_geq(s.stage_changes, 4);
    struct seen s2 = {.ordered = true};
    OK(ksm_client_watch_events(c, "m1", s.last_seq, 200, count_event, &s2, &e));
    cr_expect_eq(s2.n, 0, "resume after the last sequence sees nothing old");

    uint64_t freed = 0;
    OK(ksm_client_model_delete(c, "m1", &freed, &e));
    OK(ksm_client_model_list(c, &list, &nm, &e));
    cr_expect_eq(nm, 0);
    free(list);
    free(mi);
    ksm_client_close(c);
    cr_expect_eq(rpc_daemon_stop(&d), 0, "kasminad exits 0 on SIGTERM");
}

Test(client, errors_come_back_as_ksm_codes_with_the_servers_sentence)
{
    struct rpc_daemon d;
    rpc_daemon_start(&d);
    ksm_client *c = rpc_connect(&d);
    struct ksm_client_error e;
    struct ksm_model_info *mi = calloc(1, sizeof *mi);

    cr_expect_eq(ksm_client_model_get(c, "nope", mi, &e), KSM_ENOMODEL);
    cr_expect_eq(e.code, KSM_ENOMODEL);
    cr_expect_eq(e.grpc_status, 5);
    cr_expect(strstr(e.message, "nope") != NULL, "%s", e.message);

    struct ksm_model_spec spec = small_cnn();
    OK(ksm_client_model_create(c, "m2", &spec, mi, &e));
    cr_expect_eq(ksm_client_model_create(c, "m2", &spec, mi, &e), KSM_EEXIST);
    cr_expect_eq(e.grpc_status, 6);

    struct ksm_slot_report r;
    struct ksm_germinate_args ga = {.blueprint_id = "conv_light"};
    cr_expect_eq(ksm_client_germinate(c, "m2", "r9c9", &ga, &r, &e), KSM_ENOSLOT, "%s", e.message);
    cr_expect_eq(e.grpc_status, 3);
    struct ksm_germinate_args bad = {.blueprint_id = "no_such_blueprint"};
    cr_expect_eq(ksm_client_germinate(c, "m2", mi->slots[0].slot_id, &bad, &r, &e),
                 KSM_ENOBLUEPRINT, "%s", e.message);
    OK(ksm_client_germinate(c, "m2", mi->slots[0].slot_id, &ga, &r, &e));
    int rc = ksm_client_germinate(c, "m2", mi->slots[0].slot_id, &ga, &r, &e);
    cr_expect_eq(e.grpc_status, 9, "germinate on an occupied slot: %s (%s)", e.message,
                 ksm_err_name(rc));
    cr_expect_eq(ksm_client_set_alpha(c, "m2", mi->slots[0].slot_id, NAN, &r, &e), KSM_EINVAL);
    cr_expect_eq(e.grpc_status, 3);

    /* The client's own limits and an unreachable server. */
    ksm_client *far;
    struct ksm_client_options o = {.deadline_ms = 2000};
    OK(ksm_client_connect("unix:/nonexistent/kasminad.sock", &o, &far, &e));
    enum ksm_health_status hs;
    cr_expect_eq(ksm_client_health(far, "", &hs, &e), KSM_ENOTREADY);
    cr_expect_eq(e.grpc_status, 14);
    ksm_client_close(far);
    cr_expect_eq(ksm_client_connect("", NULL, &far, &e), KSM_EINVAL);
    /* wait_for_ready waits for the server up to the deadline, which ksm_client_set_deadline
     * shortens: DEADLINE_EXCEEDED comes back as KSM_ETIMEDOUT. */
    struct ksm_client_options w = {.deadline_ms = 20000, .wait_for_ready = true};
    OK(ksm_client_connect("unix:/nonexistent/kasminad.sock", &w, &far, &e));
    ksm_client_set_deadline(far, 300);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    cr_expect_eq(ksm_client_health(far, "", &hs, &e), KSM_ETIMEDOUT, "%s", e.message);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    cr_expect_eq(e.grpc_status, 4);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    cr_expect(secs >= 0.25 && secs < 5.0, "waited %.3f s for a 300 ms deadline", secs);
    ksm_client_close(far);

    free(mi);
    ksm_client_close(c);
    rpc_daemon_stop(&d);
}

struct watcher {
    ksm_client *c;
    struct seen s;
    int rc;
};

static int stop_after_two(void *ud, uint64_t seq, const struct ksm_lifecycle_event *ev)
{
    struct seen *s = ud;
    count_event(s, seq, ev);
    return s->n >= 2 ? 7 : 0;
}

static void *watch_thread(void *p)
{
    struct watcher *w = p;
    struct ksm_client_error e;
    w->rc = ksm_client_watch_events(w->c, "", 0, 0, stop_after_two, &w->s, &e);
    return NULL;
}

Test(client, watch_events_follows_live_and_stops_when_the_callback_says)
{
    struct rpc_daemon d;
    rpc_daemon_start(&d);
    ksm_client *c = rpc_connect(&d);
    struct ksm_client_error e;
    struct watcher w = {.c = c, .s = {.ordered = true}};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, watch_thread, &w), 0);
    struct ksm_model_spec spec = small_cnn();
    struct ksm_model_info *mi = calloc(1, sizeof *mi);
    OK(ksm_client_model_create(c, "m3", &spec, mi, &e));
    struct ksm_slot_report r;
    struct ksm_gate_result g;
    struct ksm_germinate_args ga = {.blueprint_id = "conv_light"};
    OK(ksm_client_germinate(c, "m3", mi->slots[0].slot_id, &ga, &r, &e));
    OK(ksm_client_advance(c, "m3", mi->slots[0].slot_id, KSM_STAGE_UNKNOWN, &g, &r, &e));
    pthread_join(t, NULL);
    cr_expect_eq(w.rc, 7, "the callback's value is returned");
    cr_expect_eq(w.s.n, 2);
    cr_expect(w.s.ordered);
    free(mi);
    ksm_client_close(c);
    rpc_daemon_stop(&d);
}

/* Tensors and weight files of more than 64 KiB take wire/pbgather's copy-once path: the server
 * reads the request from the transport's slices, the client the reply (and takes the buffers
 * over). The daemon's results must be the in-process engine's, bit for bit, for the same model
 * and weights (the engine is deterministic whatever its thread count). */
static void expect_same_tensor(const ksm_tensor *a, const ksm_tensor *b, const char *what)
{
    cr_assert_eq(a->ndim, b->ndim, "%s: ndim", what);
    for (int i = 0; i < a->ndim; i++) cr_assert_eq(a->shape[i], b->shape[i], "%s: shape", what);
    cr_assert_eq(memcmp(a->data, b->data, ksm_tensor_nbytes(a)), 0,
                 "%s: the daemon's result differs from the in-process engine's", what);
}

Test(client, big_tensors_and_weight_files_cross_the_wire_intact)
{
    struct rpc_daemon d;
    rpc_daemon_start(&d);
    ksm_client *c = rpc_connect(&d);
    struct ksm_client_error e;
    char err[256];
    ksm_engine *eng;
    struct ksm_engine_config ec = {.cpu_devices = 1};
    cr_assert_eq(ksm_engine_new(&ec, &eng, err, sizeof err), 0, "%s", err);

    /* logits [8, 16, 1000]: 512 KB; tok_emb 1000 x 32: 128 KB of the weights file */
    struct ksm_model_spec ts = {.topology = KSM_TOPOLOGY_TRANSFORMER,
                                .transformer = {.vocab_size = 1000,
                                                .n_embd = 32,
                                                .n_head = 2,
                                                .n_layer = 2,
                                                .block_size = 16,
                                                .num_segments = 2},
                                .init_seed = 3};
    struct ksm_model_spec cs = small_cnn();
    OK(ksm_client_model_create(c, "tf", &ts, NULL, &e));
    OK(ksm_client_model_create(c, "cnn", &cs, NULL, &e));
    ksm_model *ltf, *lcnn;
    cs.init_seed = ts.init_seed = 99; /* different weights, until the daemon's are loaded */
    cr_assert_eq(ksm_engine_model_create(eng, "tf", &ts, &ltf, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_engine_model_create(eng, "cnn", &cs, &lcnn, err, sizeof err), 0, "%s", err);
    const char *ids[2] = {"tf", "cnn"};
    ksm_model *local[2] = {ltf, lcnn};
    for (int i = 0; i < 2; i++) {
        void *st;
        size_t len;
        OK(ksm_client_export_weights(c, ids[i], &st, &len, &e));
        if (i == 0) cr_expect_gt(len, 128 * 1024);
        struct ksm_load_result lr;
        cr_assert_eq(ksm_model_load_weights(local[i], st, len, true, &lr, err, sizeof err), 0, "%s",
                     err);
        ksm_load_result_free(&lr);
        OK(ksm_client_load_weights(c, ids[i], st, len, true, &lr, &e)); /* and back again */
        cr_expect_eq(lr.n_missing, 0);
        ksm_load_result_free(&lr);
        free(st);
    }

    /* CNN: a 786 KB input. */
    ksm_tensor x, y;
    make_batch(64, &x, &y);
    struct ksm_forward_args fa = {.input = &x};
    struct ksm_forward_result rr, lr;
    OK(ksm_client_forward(c, "cnn", &fa, &rr, &e));
    cr_assert_eq(ksm_model_forward(lcnn, &fa, &lr, err, sizeof err), 0, "%s", err);
    expect_same_tensor(&rr.output, &lr.output, "CNN forward");
    ksm_host_tensor_free(&rr.output);
    ksm_host_tensor_free(&lr.output);
    free(x.data);
    free(y.data);

    /* Transformer: 512 KB of logits back, from Forward and from Evaluate. */
    int64_t tok[8 * 16], tgt[8 * 16];
    for (int i = 0; i < 8 * 16; i++) {
        tok[i] = (i * 37 + 11) % 1000;
        tgt[i] = (i * 53 + 5) % 1000;
    }
    ksm_tensor tx, ty;
    cr_assert_eq(ksm_tensor_init(&tx, NULL, tok, KSM_DTYPE_I64, 2, (const int64_t[]){8, 16}), 0);
    cr_assert_eq(ksm_tensor_init(&ty, NULL, tgt, KSM_DTYPE_I64, 2, (const int64_t[]){8, 16}), 0);
    fa.input = &tx;
    OK(ksm_client_forward(c, "tf", &fa, &rr, &e));
    cr_assert_eq(ksm_model_forward(ltf, &fa, &lr, err, sizeof err), 0, "%s", err);
    cr_expect_eq(ksm_tensor_nbytes(&rr.output), 8 * 16 * 1000 * sizeof(float));
    expect_same_tensor(&rr.output, &lr.output, "transformer forward");
    ksm_host_tensor_free(&rr.output);
    ksm_host_tensor_free(&lr.output);
    struct ksm_alpha_config cfg = {.name = "main"};
    struct ksm_evaluate_args ea = {
        .input = &tx, .targets = &ty, .configs = &cfg, .n_configs = 1, .return_logits = true};
    struct ksm_evaluate_result re, le;
    OK(ksm_client_evaluate(c, "tf", &ea, &re, &e));
    cr_assert_eq(ksm_model_evaluate(ltf, &ea, &le, err, sizeof err), 0, "%s", err);
    cr_assert_eq(re.n, 1);
    cr_expect_eq(re.results[0].loss, le.results[0].loss);
    expect_same_tensor(&re.results[0].logits, &le.results[0].logits, "transformer evaluate");
    ksm_evaluate_result_free(&re);
    ksm_evaluate_result_free(&le);

    ksm_model_unref(ltf);
    ksm_model_unref(lcnn);
    ksm_engine_free(eng);
    ksm_client_close(c);
    cr_expect_eq(rpc_daemon_stop(&d), 0,
                 "kasminad exits 0 on SIGTERM (and LeakSanitizer is quiet)");
}
