/*
 * The engine under concurrency: one CNN model, forwards on four stream keys from four threads
 * (each must succeed with the right shape whatever the lifecycle is doing), one thread mutating
 * the lifecycle (germinate, advance, set_alpha, step_epoch, prune, load weights), one reading
 * cache, memory and model statistics and slot reports, and the event sink counting events.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kasmina/log.h"
#include "tsan_check.h"

#define FORWARD_THREADS 4
#define FORWARDS        100
#define CYCLES          25

static ksm_engine *engine;
static ksm_model *model;
static atomic_bool stop;
static atomic_long events;

static void on_event(void *ud, const struct ksm_lifecycle_event *ev)
{
    (void)ud;
    CHECK(ev->type < KSM_EV_COUNT, "event type %d", (int)ev->type);
    atomic_fetch_add(&events, 1);
}

static void *forwarder(void *p)
{
    int id = *(int *)p;
    char key[8];
    snprintf(key, sizeof key, "env-%d", id);
    float x[2 * 3 * 8 * 8];
    for (size_t i = 0; i < sizeof x / sizeof x[0]; i++) x[i] = (float)((i * 7 + id) % 13) / 13.0f;
    ksm_tensor in;
    CHECK_OK(ksm_tensor_init(&in, NULL, x, KSM_DTYPE_F32, 4, (int64_t[]){2, 3, 8, 8}));
    for (int i = 0; i < FORWARDS; i++) {
        struct ksm_forward_args a = {.input = &in, .stream = key};
        struct ksm_forward_result r;
        char err[256] = "";
        int rc = ksm_model_forward(model, &a, &r, err, sizeof err);
        CHECK(rc == 0, "forward on %s: %s (%s)", key, ksm_err_name(rc), err);
        CHECK(r.output.ndim == 2 && r.output.shape[0] == 2 && r.output.shape[1] == 5, "shape");
        ksm_host_tensor_free(&r.output);
    }
    return NULL;
}

static void *mutator(void *p)
{
    (void)p;
    char err[256];
    struct ksm_slot_report rep;
    struct ksm_gate_result gate;
    void *w = NULL;
    size_t wlen = 0;
    CHECK_OK(ksm_model_export_weights(model, &w, &wlen, err, sizeof err));
    for (int c = 0; c < CYCLES && !atomic_load(&stop); c++) {
        struct ksm_germinate_args g = {.blueprint_id = c % 2 ? "conv_light" : "norm",
                                       .init_seed = (uint64_t)c};
        int rc = ksm_model_germinate(model, "r0c1", &g, &rep, err, sizeof err);
        CHECK(rc == 0 || rc == KSM_ESTAGE, "germinate: %s (%s)", ksm_err_name(rc), err);
        (void)ksm_model_advance(model, "r0c1", KSM_STAGE_UNKNOWN, &gate, &rep, err, sizeof err);
        (void)ksm_model_set_alpha(model, "r0c1", 0.25 + 0.5 * (c % 2), &rep, err, sizeof err);
        size_t n = 0;
        struct ksm_slot_report reps[KSM_MAX_SLOTS];
        CHECK_OK(ksm_model_step_epoch(model, NULL, reps, KSM_MAX_SLOTS, &n, err, sizeof err));
        bool accepted = false;
        (void)ksm_model_prune(model, "r0c1", "tsan", "policy", &accepted, &rep, err, sizeof err);
        for (int k = 0; k < 6; k++)
            CHECK_OK(ksm_model_step_epoch(model, NULL, reps, KSM_MAX_SLOTS, &n, err, sizeof err));
        if (c % 8 == 7) {
            struct ksm_load_result lr;
            memset(&lr, 0, sizeof lr);
            rc = ksm_model_load_weights(model, w, wlen, false, &lr, err, sizeof err);
            CHECK(rc == 0, "load weights: %s (%s)", ksm_err_name(rc), err);
            ksm_load_result_free(&lr);
        }
    }
    free(w);
    return NULL;
}

static void *reader(void *p)
{
    (void)p;
    while (!atomic_load(&stop)) {
        struct ksm_cache_counters cc[64];
        size_t n = 0;
        CHECK_OK(ksm_model_cache_stats(model, cc, 64, &n));
        struct ksm_model_info info;
        CHECK_OK(ksm_model_get_info(model, &info));
        struct ksm_slot_report reps[KSM_MAX_SLOTS];
        char err[256];
        CHECK_OK(ksm_model_slot_reports(model, NULL, reps, KSM_MAX_SLOTS, &n, err, sizeof err));
        for (int i = 0; i < ksm_engine_device_count(engine); i++) {
            ksm_device *d = ksm_engine_device(engine, i);
            ksm_allocator *a = ksm_engine_allocator(engine, d);
            if (a == NULL) continue;
            struct ksm_mem_stats st;
            ksm_alloc_get_stats(a, &st);
        }
        ksm_model **list;
        size_t nm;
        CHECK_OK(ksm_engine_model_list(engine, &list, &nm));
        for (size_t i = 0; i < nm; i++) ksm_model_unref(list[i]);
        free(list);
        (void)ksm_engine_health(engine, NULL, 0);
    }
    return NULL;
}

int main(void)
{
    ksm_log_set_level(KSM_LOG_WARN);
    char err[256] = "";
    struct ksm_engine_config ec = {.cpu_devices = 1};
    CHECK_OK(ksm_engine_new(&ec, &engine, err, sizeof err));
    ksm_engine_set_event_sink(engine, on_event, NULL);
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                  .cnn = {.base_channels = 4, .num_classes = 5},
                                  .init_seed = 1};
    int rc = ksm_engine_model_create(engine, "m", &spec, &model, err, sizeof err);
    CHECK(rc == 0, "create: %s", err);

    pthread_t mut, rd;
    CHECK_OK(pthread_create(&mut, NULL, mutator, NULL));
    CHECK_OK(pthread_create(&rd, NULL, reader, NULL));
    int ids[FORWARD_THREADS];
    for (int i = 0; i < FORWARD_THREADS; i++) ids[i] = i;
    run_threads(FORWARD_THREADS, forwarder, ids, sizeof ids[0]);
    CHECK_OK(pthread_join(mut, NULL));
    atomic_store(&stop, true);
    CHECK_OK(pthread_join(rd, NULL));

    ksm_model_unref(model);
    CHECK_OK(ksm_engine_model_delete(engine, "m", NULL));
    ksm_engine_free(engine);
    printf("tsan_engine: %d x %d forwards, %d lifecycle cycles, %ld events ok\n", FORWARD_THREADS,
           FORWARDS, CYCLES, atomic_load(&events));
    return 0;
}
