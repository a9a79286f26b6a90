/*
 * Training under concurrency (docs/training.md), engine level. One shared CNN model takes, all at
 * once: TrainSteps from two threads on two stream keys (collecting gradient statistics on some
 * steps), ConfigureTraining (with and without reset_optimizer_state), forwards, fused forwards
 * and evaluates on their own stream keys, the seed lifecycle (germinate, advance, set_alpha,
 * step_epoch, RecordMetrics(use_collected_gradients), prune), ExportWeights/LoadWeights, moves
 * between cpu:0 and cpu:1, and readers of the model info, training config and momentum bytes.
 * Two more models train and forward beside it (on one, four threads update different fields of the
 * training configuration at once: none may undo another), and a churn thread creates, trains
 * and deletes models that another thread trains and forwards by name (which may find them gone).
 *
 * Every call must return OK or one of the refusals documented for the race it is in; after the
 * join, each model's train_step is the number of TrainSteps that succeeded on it, and every
 * reader saw generation and train_step never go back.
 *
 * Then the same through the service with a state directory (what kasminad runs): TrainSteps and
 * ConfigureTraining (in memory) interleave with journalled lifecycle calls, a snapshotted
 * LoadWeights and forwards, until DeleteModel removes the model under the trainers, whose next
 * calls must be refused with NOT_FOUND.
 */
#include <ftw.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "io/persist.h"
#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kasmina/log.h"
#include "kasmina/training.h"
#include "service/service.h"
#include "tsan_check.h"

#define B         4
#define STEPS     30 /* per trainer */
#define FORWARDS  30 /* per forwarder */
#define CYCLES    10 /* lifecycle cycles */
#define N_MODELS  3  /* "m0" (shared by every thread), "m1", "m2" */
#define CHURN     6  /* models created, trained and deleted */
#define IN_FLOATS (B * 3 * 8 * 8)

static ksm_engine *engine;
static ksm_model *models[N_MODELS];
static atomic_long ok_steps[N_MODELS];
static atomic_bool stop;
static atomic_long events, collected, folded, moves, churned, gone;
static atomic_int trainers_left;
static atomic_bool lifecycle_done; /* the trainers run until then (and STEPS at least) */

static void on_event(void *ud, const struct ksm_lifecycle_event *ev)
{
    (void)ud;
    CHECK(ev->type < KSM_EV_COUNT, "event type %d", (int)ev->type);
    atomic_fetch_add(&events, 1);
}

/* One of the codes in the list (0 always allowed), else the test fails naming the call. */
static void expect(const char *what, int rc, const char *err, int n, const int *allowed)
{
    if (rc == 0) return;
    for (int i = 0; i < n; i++)
        if (rc == allowed[i]) return;
    CHECK(0, "%s: %s (%s)", what, ksm_err_name(rc), err);
}
#define EXPECT(what, rc, err, ...)                                                                 \
    expect(what, rc, err, (int)(sizeof((int[]){__VA_ARGS__}) / sizeof(int)), (int[]){__VA_ARGS__})

struct batch {
    float x[IN_FLOATS];
    int64_t y[B];
    ksm_tensor in, tg;
};

static void batch_init(struct batch *b, int salt)
{
    for (int i = 0; i < IN_FLOATS; i++) b->x[i] = (float)((i * 7 + salt) % 13) / 13.0f - 0.5f;
    for (int i = 0; i < B; i++) b->y[i] = (i + salt) % 5;
    CHECK_OK(ksm_tensor_init(&b->in, NULL, b->x, KSM_DTYPE_F32, 4, (int64_t[]){B, 3, 8, 8}));
    CHECK_OK(ksm_tensor_init(&b->tg, NULL, b->y, KSM_DTYPE_I64, 1, (int64_t[]){B}));
}

/* What a reader saw last: generation and train_step never go back. */
struct seen {
    uint64_t gen, step;
};

static void saw(struct seen *s, const char *what, uint64_t gen, uint64_t step)
{
    CHECK(gen >= s->gen, "%s: generation went back from %llu to %llu", what,
          (unsigned long long)s->gen, (unsigned long long)gen);
    CHECK(step >= s->step, "%s: train_step went back from %llu to %llu", what,
          (unsigned long long)s->step, (unsigned long long)step);
    s->gen = gen;
    s->step = step;
}

struct worker {
    int id;    /* thread number */
    int model; /* index into models[] */
};

static void *trainer(void *p)
{
    const struct worker *w = p;
    ksm_model *m = models[w->model];
    struct batch b;
    batch_init(&b, w->id);
    char key[16];
    snprintf(key, sizeof key, "train-%d", w->id);
    struct seen s = {0};
    for (int i = 0; i < STEPS || !atomic_load(&lifecycle_done); i++) {
        /* collect on some steps, never on some, the stride deciding on the rest */
        int collect = i % 3 == 0 ? 1 : i % 3 == 1 ? 0 : -1;
        struct ksm_train_args a = {
            .input = &b.in, .targets = &b.tg, .stream = key, .collect_gradients = collect};
        struct ksm_train_result r;
        char err[256] = "";
        int rc = ksm_model_train_step(m, &a, &r, err, sizeof err);
        CHECK(rc == 0, "train step %d on %s: %s (%s)", i, ksm_model_id(m), ksm_err_name(rc), err);
        atomic_fetch_add(&ok_steps[w->model], 1);
        CHECK(r.total == B && r.correct <= B, "correct %llu of %llu", (unsigned long long)r.correct,
              (unsigned long long)r.total);
        CHECK(r.loss == r.loss && r.loss >= 0, "loss %g", r.loss);
        CHECK(r.train_step >= 1, "train_step %llu", (unsigned long long)r.train_step);
        if (collect == 0) CHECK(!r.gradients_collected, "gradients collected with collect 0");
        if (r.gradients_collected) {
            CHECK(r.host_grad_norm >= 0 && r.host_param_count > 0, "host gradient statistics");
            atomic_fetch_add(&collected, 1);
        }
        saw(&s, "trainer", r.model_generation, r.train_step);
    }
    atomic_fetch_sub(&trainers_left, 1);
    return NULL;
}

static void *configurer(void *p)
{
    const struct worker *w = p;
    ksm_model *m = models[w->model];
    struct seen s = {0};
    for (int i = 0; atomic_load(&trainers_left) > 0; i++) {
        struct ksm_training_config c;
        ksm_training_config_defaults(&c);
        c.host.lr = 0.005 + 0.001 * (i % 5);
        c.seed.momentum = i % 4 == 3 ? 0.0 : 0.9; /* momentum 0 drops the buffers */
        c.gradient_telemetry_stride = (uint32_t)(i % 3);
        char err[256] = "";
        CHECK_OK(ksm_model_configure_training(m, &c, i % 2 == 1, err, sizeof err));
        struct ksm_training_config now;
        uint64_t step = 0;
        CHECK_OK(ksm_model_training_config(m, &now, &step));
        saw(&s, "configurer", ksm_model_generation(m), step);
        size_t bytes;
        CHECK_OK(ksm_model_training_momentum_bytes(m, NULL, &bytes));
        int rc = ksm_model_training_momentum_bytes(m, "r0c1", &bytes);
        CHECK(rc == 0, "momentum bytes of r0c1: %s", ksm_err_name(rc));
    }
    return NULL;
}

/* Partial updates (ConfigureTraining with one field): N_FIELDS updaters on one model, each
 * raising its own field from 1 up (the first also dropping the momentum on odd calls). Each sees
 * its value as its call left it, and the others' never go back: no update undoes another. */
#define N_FIELDS 4
#define UPDATES  150 /* per updater, at most */
static atomic_int next_field;

static double get_field(const struct ksm_training_config *c, int k)
{
    switch (k) {
    case 0: return c->gradient_telemetry_stride;
    case 1: return c->exploding_threshold;
    case 2: return c->vanishing_threshold;
    default: return c->max_grad_norm;
    }
}

static void set_field(struct ksm_training_config *c, int k, uint32_t v)
{
    switch (k) {
    case 0: c->gradient_telemetry_stride = v; break;
    case 1: c->exploding_threshold = v; break;
    case 2: c->vanishing_threshold = v; break;
    default: c->max_grad_norm = v;
    }
}

struct field_update {
    int which;
    uint32_t v;
};

static int merge_field(void *ud, const struct ksm_training_config *in_force,
                       struct ksm_training_config *next, char *err, size_t errlen)
{
    (void)in_force, (void)err, (void)errlen;
    const struct field_update *f = ud;
    set_field(next, f->which, f->v);
    return 0;
}

static void *updater(void *p)
{
    const struct worker *w = p;
    ksm_model *m = models[w->model];
    int which = atomic_fetch_add(&next_field, 1);
    CHECK(which < N_FIELDS, "more updaters than fields");
    double seen[N_FIELDS] = {0}; /* every field starts at 0 (main) */
    struct seen s = {0};
    for (uint32_t v = 1; v <= UPDATES && atomic_load(&trainers_left) > 0; v++) {
        struct field_update f = {.which = which, .v = v};
        struct ksm_training_config now;
        uint64_t step;
        char err[256] = "";
        int rc = ksm_model_update_training(m, merge_field, &f, which == 0 && v % 2, &now, &step,
                                           err, sizeof err);
        CHECK(rc == 0, "update training: %s (%s)", ksm_err_name(rc), err);
        CHECK(get_field(&now, which) == v, "updater %d: its field is %g after setting %u", which,
              get_field(&now, which), v);
        for (int k = 0; k < N_FIELDS; k++) {
            CHECK(get_field(&now, k) >= seen[k],
                  "updater %d: field %d went back from %g to %g (an update was undone)", which, k,
                  seen[k], get_field(&now, k));
            seen[k] = get_field(&now, k);
        }
        saw(&s, "updater", ksm_model_generation(m), step);
    }
    return NULL;
}

static void *forwarder(void *p)
{
    const struct worker *w = p;
    ksm_model *m = models[w->model];
    struct batch b;
    batch_init(&b, 100 + w->id);
    char key[16];
    snprintf(key, sizeof key, "env-%d", w->id);
    float alpha[B] = {0.0f, 0.25f, 0.75f, 1.0f};
    struct ksm_alpha_override ov = {.slot_id = "r0c1", .alpha = alpha, .n = B};
    const char *cfg_slots[] = {"r0c1"};
    float cfg_alpha[] = {0.0f};
    struct ksm_alpha_config cfg = {
        .name = "without_r0c1", .slot_ids = cfg_slots, .alpha = cfg_alpha, .n = 1};
    struct seen s = {0};
    for (int i = 0; i < FORWARDS; i++) {
        char err[256] = "";
        int rc;
        if (i % 3 == 2) {
            struct ksm_evaluate_args ea = {.input = &b.in,
                                           .targets = &b.tg,
                                           .stream = key,
                                           .configs = i % 2 ? &cfg : NULL,
                                           .n_configs = i % 2 ? 1 : 0,
                                           .generate_standard = i % 2 == 0};
            struct ksm_evaluate_result er;
            rc = ksm_model_evaluate(m, &ea, &er, err, sizeof err);
            CHECK(rc == 0, "evaluate on %s: %s (%s)", key, ksm_err_name(rc), err);
            CHECK(er.n >= 1, "evaluate returned no config");
            for (size_t k = 0; k < er.n; k++)
                CHECK(er.results[k].total == B, "evaluate total %llu",
                      (unsigned long long)er.results[k].total);
            saw(&s, "evaluate", er.model_generation, 0);
            ksm_evaluate_result_free(&er);
        } else {
            struct ksm_forward_args fa = {.input = &b.in,
                                          .stream = key,
                                          .overrides = i % 3 ? &ov : NULL,
                                          .n_overrides = i % 3 ? 1 : 0};
            struct ksm_forward_result fr;
            rc = ksm_model_forward(m, &fa, &fr, err, sizeof err);
            CHECK(rc == 0, "forward on %s: %s (%s)", key, ksm_err_name(rc), err);
            CHECK(fr.output.ndim == 2 && fr.output.shape[0] == B && fr.output.shape[1] == 5,
                  "forward shape");
            const float *o = fr.output.data;
            for (int k = 0; k < B * 5; k++) CHECK(o[k] == o[k], "forward logit %d is NaN", k);
            saw(&s, "forward", fr.model_generation, 0);
            ksm_host_tensor_free(&fr.output);
        }
    }
    return NULL;
}

static void *lifecycle(void *p)
{
    const struct worker *w = p;
    ksm_model *m = models[w->model];
    char err[256] = "";
    struct ksm_slot_report rep;
    struct ksm_gate_result gate;
    void *wts = NULL;
    size_t wlen = 0;
    CHECK_OK(ksm_model_export_weights(m, &wts, &wlen, err, sizeof err));
    for (int c = 0; c < CYCLES; c++) {
        const char *slot = c % 2 ? "r0c1" : "r0c2";
        struct ksm_germinate_args g = {.blueprint_id = c % 3 ? "conv_light" : "norm",
                                       .init_seed = (uint64_t)c};
        int rc = ksm_model_germinate(m, slot, &g, &rep, err, sizeof err);
        EXPECT("germinate", rc, err, KSM_ESTAGE);
        /* GERMINATED -> TRAINING: the trainers now step its seed; some steps collect its
         * gradient statistics (every third step of each trainer asks) */
        rc = ksm_model_advance(m, slot, KSM_STAGE_UNKNOWN, &gate, &rep, err, sizeof err);
        EXPECT("advance", rc, err, KSM_ESTAGE, KSM_ENOSEED);
        long before = atomic_load(&ok_steps[w->model]);
        while (atomic_load(&ok_steps[w->model]) < before + 8) sched_yield();
        size_t n = 0;
        struct ksm_slot_report reps[KSM_MAX_SLOTS];
        for (int k = 0; k < 3; k++) {
            CHECK_OK(ksm_model_step_epoch(m, NULL, reps, KSM_MAX_SLOTS, &n, err, sizeof err));
            struct ksm_metrics_update u = {.use_collected_gradients = true,
                                           .has_val_accuracy = true,
                                           .val_accuracy = 10.0 + c + k};
            rc = ksm_model_record_metrics(m, slot, &u, &rep, err, sizeof err);
            /* ESTAGE: no collecting step since this seed was germinated */
            EXPECT("record metrics", rc, err, KSM_ESTAGE, KSM_ENOSEED);
            if (rc == 0) {
                CHECK(rep.telemetry.has_gradient_norm && rep.metrics.has_grad_ratio,
                      "folded gradients not in the report");
                atomic_fetch_add(&folded, 1);
            }
        }
        rc = ksm_model_advance(m, slot, KSM_STAGE_UNKNOWN, &gate, &rep, err, sizeof err);
        EXPECT("advance", rc, err, KSM_ESTAGE, KSM_ENOSEED);
        rc = ksm_model_set_alpha(m, slot, 0.25 + 0.5 * (c % 2), &rep, err, sizeof err);
        EXPECT("set alpha", rc, err, KSM_ESTAGE, KSM_ENOSEED);
        CHECK_OK(ksm_model_step_epoch(m, NULL, reps, KSM_MAX_SLOTS, &n, err, sizeof err));
        if (c % 3 == 2) {
            struct ksm_load_result lr;
            memset(&lr, 0, sizeof lr);
            rc = ksm_model_load_weights(m, wts, wlen, false, &lr, err, sizeof err);
            CHECK(rc == 0, "load weights: %s (%s)", ksm_err_name(rc), err);
            ksm_load_result_free(&lr);
            free(wts);
            CHECK_OK(ksm_model_export_weights(m, &wts, &wlen, err, sizeof err));
        }
        bool accepted = false;
        rc = ksm_model_prune(m, slot, "tsan", "policy", &accepted, &rep, err, sizeof err);
        EXPECT("prune", rc, err, KSM_ESTAGE, KSM_ENOSEED);
        for (int k = 0; k < 4; k++) /* through the embargo */
            CHECK_OK(ksm_model_step_epoch(m, NULL, reps, KSM_MAX_SLOTS, &n, err, sizeof err));
    }
    free(wts);
    atomic_store(&lifecycle_done, true);
    return NULL;
}

static void *mover(void *p)
{
    const struct worker *w = p;
    ksm_model *m = models[w->model];
    for (int i = 0; atomic_load(&trainers_left) > 0; i++) {
        char err[256] = "";
        CHECK_OK(ksm_model_move(m, i % 2 ? "cpu:0" : "cpu:1", -1, err, sizeof err));
        atomic_fetch_add(&moves, 1);
        struct ksm_model_info info;
        CHECK_OK(ksm_model_get_info(m, &info));
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL); /* let the others run on each device */
    }
    return NULL;
}

static void *reader(void *p)
{
    (void)p;
    struct seen s[N_MODELS] = {{0}};
    while (!atomic_load(&stop)) {
        for (int i = 0; i < N_MODELS; i++) {
            ksm_model *m = models[i];
            struct ksm_model_info info;
            CHECK_OK(ksm_model_get_info(m, &info));
            saw(&s[i], "reader", info.generation, info.train_step);
            struct ksm_training_config c;
            uint64_t step = 0;
            CHECK_OK(ksm_model_training_config(m, &c, &step));
            CHECK(step >= info.train_step, "training_config step went back");
            struct ksm_slot_report reps[KSM_MAX_SLOTS];
            size_t n = 0;
            char err[256];
            CHECK_OK(ksm_model_slot_reports(m, NULL, reps, KSM_MAX_SLOTS, &n, err, sizeof err));
            struct ksm_cache_counters cc[64];
            CHECK_OK(ksm_model_cache_stats(m, cc, 64, &n));
        }
        for (int i = 0; i < ksm_engine_device_count(engine); i++) {
            ksm_allocator *a = ksm_engine_allocator(engine, ksm_engine_device(engine, i));
            if (a == NULL) continue;
            struct ksm_mem_stats st;
            ksm_alloc_get_stats(a, &st);
        }
        (void)ksm_engine_health(engine, NULL, 0);
    }
    return NULL;
}

/* Creates, trains, forwards and deletes models "churn-k" while hunter() uses them by name. */
static void *churner(void *p)
{
    (void)p;
    struct batch b;
    batch_init(&b, 7);
    for (int k = 0; k < CHURN; k++) {
        char id[32], err[256] = "";
        snprintf(id, sizeof id, "churn-%d", k % 2);
        struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                      .cnn = {.base_channels = 4, .num_classes = 5},
                                      .init_seed = (uint64_t)k};
        ksm_model *m;
        int rc = ksm_engine_model_create(engine, id, &spec, &m, err, sizeof err);
        CHECK(rc == 0, "create %s: %s (%s)", id, ksm_err_name(rc), err);
        struct ksm_germinate_args g = {.blueprint_id = "norm"};
        CHECK_OK(ksm_model_germinate(m, "r0c1", &g, NULL, err, sizeof err));
        struct ksm_gate_result gate;
        CHECK_OK(ksm_model_advance(m, "r0c1", KSM_STAGE_UNKNOWN, &gate, NULL, err, sizeof err));
        for (int i = 0; i < 3; i++) {
            struct ksm_train_args a = {.input = &b.in, .targets = &b.tg, .collect_gradients = 1};
            struct ksm_train_result r;
            rc = ksm_model_train_step(m, &a, &r, err, sizeof err);
            CHECK(rc == 0, "train %s: %s (%s)", id, ksm_err_name(rc), err);
        }
        struct ksm_metrics_update u = {.use_collected_gradients = true};
        CHECK_OK(ksm_model_record_metrics(m, "r0c1", &u, NULL, err, sizeof err));
        /* deleted with hunter() possibly inside a call on it: that call finishes or is refused */
        CHECK_OK(ksm_engine_model_delete(engine, id, NULL));
        rc = ksm_model_train_step(m, &(struct ksm_train_args){.input = &b.in, .targets = &b.tg},
                                  &(struct ksm_train_result){0}, err, sizeof err);
        CHECK(rc == KSM_ENOMODEL, "train step on a deleted model: %s", ksm_err_name(rc));
        ksm_model_unref(m);
        atomic_fetch_add(&churned, 1);
    }
    return NULL;
}

static void *hunter(void *p)
{
    (void)p;
    struct batch b;
    batch_init(&b, 11);
    for (int i = 0; atomic_load(&churned) < CHURN; i++) {
        char id[32], err[256] = "";
        snprintf(id, sizeof id, "churn-%d", i % 2);
        ksm_model *m;
        if (ksm_engine_model_get(engine, id, &m) != 0) {
            sched_yield();
            continue;
        }
        int rc;
        if (i % 3 == 0) {
            struct ksm_training_config c;
            ksm_training_config_defaults(&c);
            rc = ksm_model_configure_training(m, &c, true, err, sizeof err);
        } else if (i % 3 == 1) {
            struct ksm_train_args a = {.input = &b.in, .targets = &b.tg, .stream = "hunt"};
            struct ksm_train_result r;
            rc = ksm_model_train_step(m, &a, &r, err, sizeof err);
        } else {
            struct ksm_forward_args fa = {.input = &b.in, .stream = "hunt"};
            struct ksm_forward_result fr;
            rc = ksm_model_forward(m, &fa, &fr, err, sizeof err);
            if (rc == 0) ksm_host_tensor_free(&fr.output);
        }
        if (rc == KSM_ENOMODEL) atomic_fetch_add(&gone, 1);
        EXPECT("call on a churned model", rc, err, KSM_ENOMODEL);
        ksm_model_unref(m);
    }
    return NULL;
}

/* ---- the same through the service, with a state directory ---- */

static ksm_service *svc;
static atomic_long svc_steps, svc_refused, svc_events;
static atomic_int svc_trainers_left;
static atomic_bool svc_deleted;

static void on_published(void *ud, const struct ksm_lifecycle_event *ev, uint64_t seq)
{
    (void)ud, (void)ev, (void)seq;
    atomic_fetch_add(&svc_events, 1);
}

/* Trains "s0" until it is deleted: then a lookup or the step itself says NOT_FOUND. */
static void *svc_trainer(void *p)
{
    const struct worker *w = p;
    struct batch b;
    batch_init(&b, 200 + w->id);
    char key[16];
    snprintf(key, sizeof key, "svc-%d", w->id);
    for (int i = 0;; i++) {
        char err[256] = "";
        ksm_model *m;
        int rc = ksm_service_model_get(svc, "s0", &m, err, sizeof err);
        if (rc == KSM_ENOMODEL) break;
        CHECK(rc == 0, "service model get: %s (%s)", ksm_err_name(rc), err);
        struct ksm_train_args a = {
            .input = &b.in, .targets = &b.tg, .stream = key, .collect_gradients = i % 2};
        struct ksm_train_result r;
        rc = ksm_service_train_step(svc, m, &a, &r, err, sizeof err);
        ksm_model_unref(m);
        if (rc == KSM_ENOMODEL) { /* deleted since it was looked up */
            CHECK(atomic_load(&svc_deleted), "NOT_FOUND before the delete: %s", err);
            atomic_fetch_add(&svc_refused, 1);
            break;
        }
        CHECK(rc == 0, "service train step: %s (%s)", ksm_err_name(rc), err);
        atomic_fetch_add(&svc_steps, 1);
    }
    atomic_fetch_sub(&svc_trainers_left, 1);
    return NULL;
}

static int replace_all(void *ud, const struct ksm_training_config *in_force,
                       struct ksm_training_config *next, char *err, size_t errlen)
{
    (void)in_force, (void)err, (void)errlen;
    *next = *(const struct ksm_training_config *)ud;
    return 0;
}

static void *svc_configurer(void *p)
{
    (void)p;
    for (int i = 0; atomic_load(&svc_trainers_left) > 0; i++) {
        char err[256] = "";
        ksm_model *m;
        if (ksm_service_model_get(svc, "s0", &m, err, sizeof err) != 0) break;
        struct ksm_training_config c;
        ksm_training_config_defaults(&c);
        c.seed.lr = 0.02 + 0.01 * (i % 3);
        int rc = ksm_service_configure_training(svc, m, replace_all, &c, i % 2 == 0, NULL, NULL,
                                                err, sizeof err);
        EXPECT("service configure training", rc, err, KSM_ENOMODEL);
        ksm_model_unref(m);
    }
    return NULL;
}

static void *svc_forwarder(void *p)
{
    const struct worker *w = p;
    struct batch b;
    batch_init(&b, 300 + w->id);
    while (atomic_load(&svc_trainers_left) > 0) {
        char err[256] = "";
        ksm_model *m;
        if (ksm_service_model_get(svc, "s0", &m, err, sizeof err) != 0) break;
        struct ksm_forward_args fa = {.input = &b.in, .stream = "svc-forward"};
        struct ksm_forward_result fr;
        int rc = ksm_model_forward(m, &fa, &fr, err, sizeof err);
        EXPECT("service forward", rc, err, KSM_ENOMODEL);
        if (rc == 0) ksm_host_tensor_free(&fr.output);
        ksm_model_unref(m);
    }
    return NULL;
}

/* Journalled lifecycle calls and one snapshotted LoadWeights, then DeleteModel. */
static void *svc_lifecycle(void *p)
{
    (void)p;
    char err[256] = "";
    ksm_model *m;
    CHECK_OK(ksm_service_model_get(svc, "s0", &m, err, sizeof err));
    void *wts;
    size_t wlen;
    CHECK_OK(ksm_model_export_weights(m, &wts, &wlen, err, sizeof err));
    struct ksm_slot_report rep;
    struct ksm_gate_result gate;
    long folds = 0;
    for (int c = 0; c < 3; c++) {
        int rc;
        if (c == 1) { /* the weights as created, r0c1 empty as it is now */
            struct ksm_load_result lr;
            memset(&lr, 0, sizeof lr);
            rc = ksm_service_load_weights(svc, m, wts, wlen, false, &lr, err, sizeof err);
            CHECK(rc == 0, "service load weights: %s (%s)", ksm_err_name(rc), err);
            ksm_load_result_free(&lr);
        }
        struct ksm_germinate_args g = {.blueprint_id = "norm", .init_seed = (uint64_t)c};
        rc = ksm_service_germinate(svc, m, "r0c1", &g, &rep, err, sizeof err);
        CHECK(rc == 0, "service germinate: %s (%s)", ksm_err_name(rc), err);
        rc = ksm_service_advance(svc, m, "r0c1", KSM_STAGE_TRAINING, &gate, &rep, err, sizeof err);
        CHECK(rc == 0, "service advance: %s (%s)", ksm_err_name(rc), err);
        long before = atomic_load(&svc_steps);
        while (atomic_load(&svc_steps) < before + 4) sched_yield(); /* two collect */
        struct ksm_metrics_update u = {.use_collected_gradients = true};
        rc = ksm_service_record_metrics(svc, m, "r0c1", &u, &rep, err, sizeof err);
        CHECK(rc == 0, "service record metrics: %s (%s)", ksm_err_name(rc), err);
        CHECK(rep.metrics.has_grad_ratio, "no gradient ratio after the fold");
        folds++;
        size_t n;
        CHECK_OK(ksm_service_step_epoch(svc, m, NULL, NULL, 0, &n, err, sizeof err));
        bool accepted;
        rc = ksm_service_prune(svc, m, "r0c1", "tsan", "policy", &accepted, &rep, err, sizeof err);
        CHECK(rc == 0 && accepted, "service prune: %s (%s)", ksm_err_name(rc), err);
        for (int k = 0; k < 20 && rep.occupied; k++) { /* through the embargo */
            CHECK_OK(ksm_service_step_epoch(svc, m, "r0c1", &rep, 1, &n, err, sizeof err));
            CHECK(n == 1, "step epoch reported %zu slots", n);
        }
        CHECK(!rep.occupied, "r0c1 still occupied 20 epochs after the prune");
    }
    free(wts);
    atomic_store(&svc_deleted, true);
    CHECK_OK(ksm_service_model_delete(svc, "s0", NULL, err, sizeof err));
    ksm_model_unref(m);
    atomic_fetch_add(&folded, folds);
    return NULL;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static void service_phase(void)
{
    char dir[] = "/tmp/tsan_train.XXXXXX", err[512] = "";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    struct ksm_engine_config ec = {.cpu_devices = 1};
    ksm_engine *e;
    CHECK_OK(ksm_engine_new(&ec, &e, err, sizeof err));
    ksm_persist *ps;
    struct ksm_persist_config pc = {.dir = dir};
    int rc = ksm_persist_open(&pc, &ps, err, sizeof err);
    CHECK(rc == 0, "persist open: %s", err);
    CHECK_OK(ksm_persist_restore(ps, e, NULL, err, sizeof err));
    struct ksm_service_config sc = {.engine = e, .persist = ps};
    CHECK_OK(ksm_service_new(&sc, &svc));
    ksm_event_log_set_listener(ksm_service_events(svc), on_published, NULL);
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                  .cnn = {.base_channels = 4, .num_classes = 5},
                                  .init_seed = 9};
    ksm_model *m;
    rc = ksm_service_model_create(svc, "s0", &spec, &m, err, sizeof err);
    CHECK(rc == 0, "service create: %s", err);

    void *(*const fns[])(void *) = {svc_trainer, svc_trainer, svc_configurer, svc_forwarder,
                                    svc_lifecycle};
    enum { N = sizeof fns / sizeof fns[0] };
    atomic_store(&svc_trainers_left, 2);
    pthread_t th[N];
    struct worker w[N];
    for (int i = 0; i < N; i++) {
        w[i] = (struct worker){.id = i};
        CHECK_OK(pthread_create(&th[i], NULL, fns[i], &w[i]));
    }
    for (int i = 0; i < N; i++) CHECK_OK(pthread_join(th[i], NULL));
    uint64_t step;
    CHECK_OK(ksm_model_training_config(m, NULL, &step));
    CHECK(step == (uint64_t)atomic_load(&svc_steps),
          "service: train_step %llu after %ld TrainSteps", (unsigned long long)step,
          atomic_load(&svc_steps));
    ksm_model_unref(m);
    ksm_event_log_set_listener(ksm_service_events(svc), NULL, NULL);
    ksm_service_free(svc);
    ksm_engine_free(e);
    ksm_persist_close(ps);
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void *(*const kinds[])(void *) = {
    trainer, trainer,   configurer, forwarder, forwarder, lifecycle, mover, /* m0 */
    trainer, forwarder, updater,    updater,   updater,   updater,          /* m1 */
    trainer, forwarder};                                                    /* m2 */
/* the model each of kinds[] works on */
static const int on_model[] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2};
#define N_WORKERS ((int)(sizeof kinds / sizeof kinds[0]))

int main(void)
{
    ksm_log_set_level(KSM_LOG_WARN);
    char err[256] = "";
    struct ksm_engine_config ec = {.cpu_devices = 2};
    CHECK_OK(ksm_engine_new(&ec, &engine, err, sizeof err));
    ksm_engine_set_event_sink(engine, on_event, NULL);
    for (int i = 0; i < N_MODELS; i++) {
        char id[8];
        snprintf(id, sizeof id, "m%d", i);
        struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                      .cnn = {.base_channels = 4, .num_classes = 5},
                                      .init_seed = (uint64_t)i + 1};
        int rc = ksm_engine_model_create(engine, id, &spec, &models[i], err, sizeof err);
        CHECK(rc == 0, "create %s: %s", id, err);
    }
    /* m1 trains a live seed from the start */
    struct ksm_germinate_args g = {.blueprint_id = "conv_light"};
    CHECK_OK(ksm_model_germinate(models[1], "r0c1", &g, NULL, err, sizeof err));
    struct ksm_gate_result gate;
    CHECK_OK(ksm_model_advance(models[1], "r0c1", KSM_STAGE_UNKNOWN, &gate, NULL, err, sizeof err));
    /* the fields m1's updaters raise start at 0 */
    struct ksm_training_config c1;
    ksm_training_config_defaults(&c1);
    for (int k = 0; k < N_FIELDS; k++) set_field(&c1, k, 0);
    CHECK_OK(ksm_model_configure_training(models[1], &c1, false, err, sizeof err));

    int n_trainers = 0;
    for (int i = 0; i < N_WORKERS; i++) n_trainers += kinds[i] == trainer;
    atomic_store(&trainers_left, n_trainers);
    pthread_t th[N_WORKERS], rd, ch, hu;
    struct worker w[N_WORKERS];
    for (int i = 0; i < N_WORKERS; i++) {
        w[i] = (struct worker){.id = i, .model = on_model[i]};
        CHECK_OK(pthread_create(&th[i], NULL, kinds[i], &w[i]));
    }
    CHECK_OK(pthread_create(&rd, NULL, reader, NULL));
    CHECK_OK(pthread_create(&ch, NULL, churner, NULL));
    CHECK_OK(pthread_create(&hu, NULL, hunter, NULL));
    for (int i = 0; i < N_WORKERS; i++) CHECK_OK(pthread_join(th[i], NULL));
    CHECK_OK(pthread_join(ch, NULL));
    atomic_store(&stop, true);
    CHECK_OK(pthread_join(rd, NULL));
    CHECK_OK(pthread_join(hu, NULL));

    long steps = 0;
    for (int i = 0; i < N_MODELS; i++) {
        uint64_t step = 0;
        CHECK_OK(ksm_model_training_config(models[i], NULL, &step));
        CHECK(step == (uint64_t)atomic_load(&ok_steps[i]),
              "model m%d: train_step %llu after %ld successful TrainSteps", i,
              (unsigned long long)step, atomic_load(&ok_steps[i]));
        struct ksm_model_info info;
        CHECK_OK(ksm_model_get_info(models[i], &info));
        CHECK(info.train_step == step, "model info's train_step");
        steps += (long)step;
    }
    CHECK(atomic_load(&collected) > 0, "no step collected gradient statistics");
    CHECK(atomic_load(&folded) > 0, "no RecordMetrics folded collected gradients");
    for (int i = 0; i < N_MODELS; i++) {
        ksm_model_unref(models[i]);
        char id[8];
        snprintf(id, sizeof id, "m%d", i);
        CHECK_OK(ksm_engine_model_delete(engine, id, NULL));
    }
    ksm_engine_free(engine);

    service_phase();
    printf("tsan_train: %ld TrainSteps on %d models (%ld collected gradients, %ld folded by "
           "RecordMetrics), %ld moves, %ld churned models (%ld calls found one gone), %ld events; "
           "through the service: %ld TrainSteps, %ld refused after the delete, %ld events "
           "published ok\n",
           steps, N_MODELS, atomic_load(&collected), atomic_load(&folded), atomic_load(&moves),
           atomic_load(&churned), atomic_load(&gone), atomic_load(&events), atomic_load(&svc_steps),
           atomic_load(&svc_refused), atomic_load(&svc_events));
    return 0;
}
