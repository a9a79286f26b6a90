/*
 * service: the mutation protocol over a real engine and a real state directory.
 *
 * - Germinations of two models run concurrently: with model a's own lock held (its germination
 *   is parked inside the engine), a germination of model b completes. Nothing daemon-wide is held
 *   across an engine call (a server-wide lock around germinate used to serialise them).
 * - A mutation's events reach the event log only after the call, in order, numbered; a refused
 *   mutation publishes none.
 * - A model deleted after its lookup: the mutation answers KSM_ENOMODEL and changes nothing.
 * - The engine's limits have codes of their own and the service names the daemon's options.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "io/persist.h"
#include "kasmina/errors.h"
#include "kasmina/model_impl.h"
#include "kt.h"
#include "service/service.h"

TestSuite(service, .timeout = 120);

struct fixture {
    char *dir;
    ksm_engine *e;
    ksm_persist *p;
    ksm_service *s;
};

static void fixture_init(struct fixture *f, uint32_t max_models, uint32_t max_seeds)
{
    f->dir = kt_tmpdir("service");
    char err[512] = "";
    struct ksm_engine_config ec = {
        .cpu_devices = 1, .max_models = max_models, .max_seeds_per_model = max_seeds};
    f->e = kt_engine_new(&ec);
    char state[128];
    snprintf(state, sizeof state, "%s/state", f->dir);
    struct ksm_persist_config pc = {.dir = state};
    cr_assert_eq(ksm_persist_open(&pc, &f->p, err, sizeof err), 0, "%s", err);
    struct ksm_service_config sc = {.engine = f->e,
                                    .persist = f->p,
                                    .event_ring = 64,
                                    .max_models = max_models,
                                    .max_seeds_per_model = max_seeds};
    cr_assert_eq(ksm_service_new(&sc, &f->s), 0);
}

static void fixture_fini(struct fixture *f)
{
    ksm_service_free(f->s);
    ksm_engine_free(f->e);
    ksm_persist_close(f->p);
    kt_rmtree(f->dir);
    free(f->dir);
}

static const char *const SLOTS[] = {"r0c0", "r0c1"};

static ksm_model *create(struct fixture *f, const char *id)
{
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN, .slots = SLOTS, .n_slots = 2};
    spec.cnn = (struct ksm_cnn_spec){.num_classes = 4, .n_blocks = 2, .base_channels = 8};
    ksm_model *m = NULL;
    char err[512] = "";
    int rc = ksm_service_model_create(f->s, id, &spec, &m, err, sizeof err);
    cr_assert_eq(rc, 0, "create %s: %s", id, err);
    return m;
}

struct germ {
    struct fixture *f;
    ksm_model *m;
    int rc;
    char err[256];
    volatile int done;
};

static void *germinate_main(void *arg)
{
    struct germ *g = arg;
    struct ksm_germinate_args a = {.blueprint_id = "conv_light", .init_seed = 1};
    struct ksm_slot_report r;
    g->rc = ksm_service_germinate(g->f->s, g->m, "r0c0", &a, &r, g->err, sizeof g->err);
    g->done = 1;
    return NULL;
}

Test(service, germinations_of_two_models_run_concurrently)
{
    struct fixture f;
    fixture_init(&f, 0, 4);
    ksm_model *a = create(&f, "a"), *b = create(&f, "b");
    struct germ ga = {.f = &f, .m = a}, gb = {.f = &f, .m = b};
    pthread_mutex_lock(&a->lock); /* a's germination will wait inside the engine */
    pthread_t ta, tb;
    cr_assert_eq(pthread_create(&ta, NULL, germinate_main, &ga), 0);
    usleep(100 * 1000); /* let it reach the lock (if it has not, b is unaffected anyway) */
    cr_expect_eq(ga.done, 0, "a's germination finished while its model was locked");
    cr_assert_eq(pthread_create(&tb, NULL, germinate_main, &gb), 0);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 30;
    int jrc = pthread_timedjoin_np(tb, NULL, &until);
    cr_expect_eq(jrc, 0, "b's germination waited on a's (serialised across models)");
    cr_expect_eq(gb.rc, 0, "%s", gb.err);
    cr_expect_eq(ga.done, 0, "a's germination ran while its model was locked");
    pthread_mutex_unlock(&a->lock);
    cr_assert_eq(pthread_join(ta, NULL), 0);
    if (jrc != 0) pthread_join(tb, NULL);
    cr_expect_eq(ga.rc, 0, "%s", ga.err);
    ksm_model_unref(a);
    ksm_model_unref(b);
    fixture_fini(&f);
}

struct seen {
    uint64_t seq[16];
    enum ksm_lifecycle_type type[16];
    int n;
};

static void listen(void *ud, const struct ksm_lifecycle_event *ev, uint64_t q)
{
    struct seen *s = ud;
    if (s->n < 16) {
        s->seq[s->n] = q;
        s->type[s->n] = ev->type;
        s->n++;
    }
}

Test(service, events_are_published_after_a_durable_mutation_and_never_for_a_refused_one)
{
    struct fixture f;
    fixture_init(&f, 0, 0);
    struct seen seen = {0};
    ksm_event_log_set_listener(ksm_service_events(f.s), listen, &seen);
    ksm_model *m = create(&f, "m");
    struct ksm_germinate_args a = {.blueprint_id = "conv_light", .init_seed = 1};
    struct ksm_slot_report r;
    char err[256] = "";
    cr_assert_eq(ksm_service_germinate(f.s, m, "r0c0", &a, &r, err, sizeof err), 0, "%s", err);
    int after_germinate = seen.n;
    cr_expect_gt(after_germinate, 0, "germinate published no event");
    for (int i = 0; i < seen.n; i++) cr_expect_eq(seen.seq[i], (uint64_t)i + 1);
    /* Refused: the slot is busy. Nothing published, nothing changed. */
    uint64_t gen = ksm_model_generation(m);
    cr_expect_neq(ksm_service_germinate(f.s, m, "r0c0", &a, &r, err, sizeof err), 0);
    cr_expect_eq(seen.n, after_germinate);
    cr_expect_eq(ksm_model_generation(m), gen);
    uint64_t oldest, last;
    ksm_event_log_window(ksm_service_events(f.s), &oldest, &last);
    cr_expect_eq(last, (uint64_t)after_germinate);
    struct ksm_lifecycle_event ev;
    cr_expect_eq(ksm_event_log_get(ksm_service_events(f.s), 1, &ev), 0);
    cr_expect_str_eq(ev.model_id, "m");
    cr_expect_eq(ksm_event_log_get(ksm_service_events(f.s), last + 1, &ev), KSM_ERANGE);
    ksm_event_log_set_listener(ksm_service_events(f.s), NULL, NULL);
    ksm_model_unref(m);
    fixture_fini(&f);
}

Test(service, a_mutation_of_a_model_deleted_after_its_lookup_is_not_found)
{
    struct fixture f;
    fixture_init(&f, 0, 0);
    ksm_model *m = create(&f, "gone");
    char err[256] = "";
    cr_assert_eq(ksm_service_model_delete(f.s, "gone", NULL, err, sizeof err), 0, "%s", err);
    size_t n = 0;
    struct ksm_slot_report reps[2];
    cr_expect_eq(ksm_service_step_epoch(f.s, m, NULL, reps, 2, &n, err, sizeof err), KSM_ENOMODEL);
    cr_expect_str_eq(err, "model_id 'gone' does not exist.");
    /* Even when another model of the same id was created meanwhile. */
    ksm_model *again = create(&f, "gone");
    uint64_t gen = ksm_model_generation(again);
    cr_expect_eq(ksm_service_set_alpha(f.s, m, "r0c0", 0.5, reps, err, sizeof err), KSM_ENOMODEL);
    cr_expect_eq(ksm_model_generation(again), gen);
    ksm_model_unref(again);
    ksm_model_unref(m);
    fixture_fini(&f);
}

Test(service, engine_limits_have_codes_of_their_own_and_name_the_daemon_options)
{
    struct fixture f;
    fixture_init(&f, 1, 1);
    ksm_model *m = create(&f, "one");
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN};
    ksm_model *x = NULL;
    char err[512] = "";
    int rc = ksm_service_model_create(f.s, "two", &spec, &x, err, sizeof err);
    cr_expect_eq(rc, KSM_EMAXMODELS, "%s", ksm_err_name(rc));
    ksm_service_explain(f.s, rc, err, sizeof err);
    cr_expect_not_null(strstr(err, "max-models = 1"), "%s", err);
    struct ksm_germinate_args a = {.blueprint_id = "conv_light", .init_seed = 1};
    struct ksm_slot_report r;
    cr_assert_eq(ksm_service_germinate(f.s, m, "r0c0", &a, &r, err, sizeof err), 0, "%s", err);
    rc = ksm_service_germinate(f.s, m, "r0c1", &a, &r, err, sizeof err);
    cr_expect_eq(rc, KSM_EMAXSEEDS, "%s", ksm_err_name(rc));
    ksm_service_explain(f.s, rc, err, sizeof err);
    cr_expect_str_eq(err, "model 'one' already has 1 live seeds; max-seeds-per-model = 1.");
    ksm_model_unref(m);
    fixture_fini(&f);
}
