/*
 * kasminad under 16 concurrent clients: starts the kasminad given (the ThreadSanitizer build),
 * drives it from 16 threads, each with its own libkasmina-client connection, mixing lifecycle
 * mutations, forwards on per-thread stream keys, evaluate, training (TrainStep on two shared
 * models, ConfigureTraining, RecordMetrics(use_collected_gradients)), statistics and model
 * create/train/delete, plus one WatchEvents subscriber. Each shared model's train_step must then
 * be the number of TrainSteps that succeeded on it. Then it stops it with SIGTERM under load: 8
 * clients keep calling and a second subscriber is listening while kasminad drains, ends the stream
 * and shuts its server down. The daemon must exit 0: ThreadSanitizer makes it exit 66 when it
 * reported a race (its reports go to the daemon's stderr, or to TSAN_OPTIONS log_path); this
 * program's own reports (the client library) make it exit 66 too. tsan_daemon <kasminad> <scratch
 * dir>
 */
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kasmina/client.h"
#include "kasmina/errors.h"
#include "tsan_check.h"

#define CLIENTS  16
#define ROUNDS   12
#define STOPPERS 8  /* clients still calling when SIGTERM arrives */
#define BEFORE   64 /* calls they make before it is sent */

extern char **environ;
static char target[300];
static atomic_int calls, errors, events_seen, stop_calls, stop_events;
static const char *const shared_models[2] = {"shared", "trained"};
static atomic_int trained[2], collected; /* successful TrainSteps on each shared model */

static bool expected(int rc)
{
    /* Lifecycle races between clients are legal outcomes, not failures. */
    return rc == 0 || rc == KSM_ESTAGE || rc == KSM_ENOSEED || rc == KSM_EGATE ||
           rc == KSM_EEXIST || rc == KSM_ENOMODEL || rc == KSM_EINVAL;
}

#define CALL(expr)                                                                                 \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        atomic_fetch_add(&calls, 1);                                                               \
        if (!expected(rc_)) {                                                                      \
            atomic_fetch_add(&errors, 1);                                                          \
            fprintf(stderr, "tsan_daemon: %s: %s (%s)\n", #expr, ksm_err_name(rc_), e.message);    \
        }                                                                                          \
    } while (0)

static void *client(void *p)
{
    int id = *(int *)p;
    ksm_client *c;
    struct ksm_client_error e;
    CHECK_OK(ksm_client_connect(target, NULL, &c, &e));
    char key[16], own[16];
    snprintf(key, sizeof key, "env-%d", id);
    snprintf(own, sizeof own, "own-%d", id);
    float x[2 * 3 * 8 * 8];
    for (size_t i = 0; i < sizeof x / sizeof x[0]; i++) x[i] = (float)((i + id) % 5) / 5.0f;
    ksm_tensor in;
    CHECK_OK(ksm_tensor_init(&in, NULL, x, KSM_DTYPE_F32, 4, (int64_t[]){2, 3, 8, 8}));
    int64_t lab[2] = {1, 3};
    ksm_tensor tg;
    CHECK_OK(ksm_tensor_init(&tg, NULL, lab, KSM_DTYPE_I64, 1, (int64_t[]){2}));
    const char *slot = id % 2 ? "r0c1" : "r0c2";
    for (int r = 0; r < ROUNDS; r++) {
        struct ksm_slot_report rep;
        struct ksm_forward_result fr;
        struct ksm_forward_args fa = {.input = &in, .stream = key};
        int rc = ksm_client_forward(c, "shared", &fa, &fr, &e);
        CALL(rc);
        if (rc == 0) ksm_host_tensor_free(&fr.output);
        /* a TrainStep on one of the shared models, on this client's stream key, collecting the
         * gradient statistics on some steps */
        if ((id + r) % 2 == 0) {
            int k = (id / 2 + r) % 2;
            struct ksm_train_args ta = {
                .input = &in, .targets = &tg, .stream = key, .collect_gradients = r % 3 - 1};
            struct ksm_train_result tr;
            rc = ksm_client_train_step(c, shared_models[k], &ta, &tr, &e);
            CALL(rc);
            if (rc == 0) {
                atomic_fetch_add(&trained[k], 1);
                if (tr.gradients_collected) atomic_fetch_add(&collected, 1);
            }
        }
        switch ((id + r) % 9) {
        case 0: {
            struct ksm_germinate_args g = {.blueprint_id = "norm"};
            CALL(ksm_client_germinate(c, "shared", slot, &g, &rep, &e));
            break;
        }
        case 1:
            CALL(ksm_client_advance(c, "shared", slot, KSM_STAGE_UNKNOWN, NULL, &rep, &e));
            break;
        case 2: CALL(ksm_client_set_alpha(c, "shared", slot, 0.5, &rep, &e)); break;
        case 3: {
            bool acc;
            CALL(ksm_client_prune(c, "shared", slot, "tsan", NULL, &acc, &rep, &e));
            break;
        }
        case 4: CALL(ksm_client_step_epoch(c, "shared", NULL, NULL, 0, NULL, &e)); break;
        case 6: {
            /* read (dropping the momentum on some), then change the learning rate and stride */
            struct ksm_training_config tc;
            uint64_t step;
            const char *mid = shared_models[id % 2];
            rc = ksm_client_configure_training(c, mid, NULL, id % 3 == 0, &tc, &step, &e);
            CALL(rc);
            if (rc != 0) break;
            tc.host.lr = 0.005 + 0.001 * (id % 4);
            tc.gradient_telemetry_stride = (uint32_t)(r % 3);
            CALL(ksm_client_configure_training(c, mid, &tc, false, NULL, NULL, &e));
            break;
        }
        case 7: {
            struct ksm_metrics_update u = {.use_collected_gradients = true};
            CALL(ksm_client_record_metrics(c, shared_models[id % 2], slot, &u, &rep, &e));
            break;
        }
        case 8: {
            struct ksm_model_info info;
            CALL(ksm_client_model_get(c, shared_models[id % 2], &info, &e));
            struct ksm_slot_report reps[KSM_MAX_SLOTS];
            size_t n;
            CALL(ksm_client_slot_reports(c, shared_models[id % 2], NULL, reps, KSM_MAX_SLOTS, &n,
                                         &e));
            break;
        }
        default: {
            struct ksm_client_memory_stats ms;
            rc = ksm_client_memory_stats(c, NULL, &ms, &e);
            CALL(rc);
            if (rc == 0) ksm_client_memory_stats_free(&ms);
            struct ksm_client_cache_counters *cc;
            size_t n;
            rc = ksm_client_cache_stats(c, NULL, &cc, &n, &e);
            CALL(rc);
            if (rc == 0) free(cc);
        }
        }
        if (r % 4 == 0) {
            struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                          .cnn = {.base_channels = 4, .num_classes = 5}};
            CALL(ksm_client_model_create(c, own, &spec, NULL, &e));
            CALL(ksm_client_forward(c, own, &fa, &fr, &e) == 0
                     ? (ksm_host_tensor_free(&fr.output), 0)
                     : KSM_EINTERNAL);
            struct ksm_train_args ta = {.input = &in, .targets = &tg, .collect_gradients = -1};
            struct ksm_train_result tr;
            CALL(ksm_client_train_step(c, own, &ta, &tr, &e));
            CALL(ksm_client_model_delete(c, own, NULL, &e));
        }
        if (r % 5 == 0) {
            struct ksm_evaluate_args ea = {.input = &in, .targets = &tg, .generate_standard = true};
            struct ksm_evaluate_result er;
            rc = ksm_client_evaluate(c, "shared", &ea, &er, &e);
            CALL(rc);
            if (rc == 0) ksm_evaluate_result_free(&er);
        }
    }
    ksm_client_close(c);
    return NULL;
}

static int on_event(void *ud, uint64_t seq, const struct ksm_lifecycle_event *ev)
{
    (void)ud;
    (void)seq;
    (void)ev;
    atomic_fetch_add(&events_seen, 1);
    return 0;
}

static void *watcher(void *p)
{
    (void)p;
    ksm_client *c;
    struct ksm_client_error e;
    CHECK_OK(ksm_client_connect(target, NULL, &c, &e));
    (void)ksm_client_watch_events(c, NULL, 0, 3000, on_event, NULL, &e);
    ksm_client_close(c);
    return NULL;
}

/* A call failing because the server stops: draining (ESHUTDOWN), the connection gone
 * (ENOTREADY, from UNAVAILABLE), or cancelled at the end of the drain. */
static bool stopping(int rc)
{
    return rc == KSM_ESHUTDOWN || rc == KSM_ENOTREADY || rc == KSM_ECANCELED;
}

/* Calls until the server stops answering. */
static void *stopper(void *p)
{
    int id = *(int *)p;
    ksm_client *c;
    struct ksm_client_error e;
    CHECK_OK(ksm_client_connect(target, NULL, &c, &e));
    char key[16];
    snprintf(key, sizeof key, "stop-%d", id);
    float x[2 * 3 * 8 * 8];
    for (size_t i = 0; i < sizeof x / sizeof x[0]; i++) x[i] = (float)((i + id) % 7) / 7.0f;
    ksm_tensor in;
    CHECK_OK(ksm_tensor_init(&in, NULL, x, KSM_DTYPE_F32, 4, (int64_t[]){2, 3, 8, 8}));
    int64_t lab[2] = {0, 4};
    ksm_tensor tg;
    CHECK_OK(ksm_tensor_init(&tg, NULL, lab, KSM_DTYPE_I64, 1, (int64_t[]){2}));
    const char *slot = id % 2 ? "r0c1" : "r0c2";
    for (int r = 0; r < 100000; r++) {
        int rc;
        if (r % 6 == 5) {
            struct ksm_train_args ta = {.input = &in, .targets = &tg, .stream = key};
            struct ksm_train_result tr;
            rc = ksm_client_train_step(c, shared_models[id % 2], &ta, &tr, &e);
        } else if (r % 2 == 0) {
            struct ksm_forward_args fa = {.input = &in, .stream = key};
            struct ksm_forward_result fr;
            rc = ksm_client_forward(c, "shared", &fa, &fr, &e);
            if (rc == 0) ksm_host_tensor_free(&fr.output);
        } else {
            struct ksm_slot_report rep;
            struct ksm_germinate_args g = {.blueprint_id = "norm"};
            bool acc;
            rc = r % 4 == 1 ? ksm_client_germinate(c, "shared", slot, &g, &rep, &e)
                            : ksm_client_prune(c, "shared", slot, "tsan", NULL, &acc, &rep, &e);
        }
        atomic_fetch_add(&stop_calls, 1);
        if (stopping(rc)) break;
        if (!expected(rc)) {
            atomic_fetch_add(&errors, 1);
            fprintf(stderr, "tsan_daemon: stopper %d: %s (%s)\n", id, ksm_err_name(rc), e.message);
            break;
        }
    }
    ksm_client_close(c);
    return NULL;
}

static int on_stop_event(void *ud, uint64_t seq, const struct ksm_lifecycle_event *ev)
{
    (void)ud;
    (void)seq;
    (void)ev;
    atomic_fetch_add(&stop_events, 1);
    return 0;
}

/* Subscribed (from the oldest kept event, with no idle end) until the server ends the stream. */
static void *stop_watcher(void *p)
{
    (void)p;
    ksm_client *c;
    struct ksm_client_error e;
    CHECK_OK(ksm_client_connect(target, NULL, &c, &e));
    int rc = ksm_client_watch_events(c, NULL, 0, 0, on_stop_event, NULL, &e);
    if (rc != 0 && !stopping(rc)) {
        atomic_fetch_add(&errors, 1);
        fprintf(stderr, "tsan_daemon: watcher at stop: %s (%s)\n", ksm_err_name(rc), e.message);
    }
    ksm_client_close(c);
    return NULL;
}

static void pause_ms(long ms) { nanosleep(&(struct timespec){0, ms * 1000 * 1000}, NULL); }

int main(int argc, char **argv)
{
    CHECK(argc == 3, "usage: tsan_daemon <kasminad> <scratch dir>");
    mkdir(argv[2], 0700);
    char sock[256];
    snprintf(sock, sizeof sock, "%s/k.sock", argv[2]);
    unlink(sock);
    snprintf(target, sizeof target, "unix:%s", sock);
    char *dargv[] = {argv[1],        "--listen",  target, "--no-cuda",   "--cpu-devices", "2",
                     "--no-persist", "--workers", "8",    "--log-level", "warn",          NULL};
    pid_t pid;
    CHECK_OK(posix_spawn(&pid, argv[1], NULL, NULL, dargv, environ));
    for (int i = 0; i < 600 && access(sock, F_OK) != 0; i++) {
        int st;
        CHECK(waitpid(pid, &st, WNOHANG) == 0, "kasminad exited early (status %d)", st);
        pause_ms(50);
    }
    CHECK(access(sock, F_OK) == 0, "kasminad did not create %s", sock);

    ksm_client *c;
    struct ksm_client_error e;
    struct ksm_client_options o = {.wait_for_ready = true, .deadline_ms = 30000};
    CHECK_OK(ksm_client_connect(target, &o, &c, &e));
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                  .cnn = {.base_channels = 4, .num_classes = 5}};
    for (int k = 0; k < 2; k++) {
        int rc = ksm_client_model_create(c, shared_models[k], &spec, NULL, &e);
        CHECK(rc == 0, "create %s: %s", shared_models[k], e.message);
    }
    /* "trained" has a seed in TRAINING on r0c1 from the start: its steps step it too */
    struct ksm_germinate_args g = {.blueprint_id = "conv_light"};
    CHECK_OK(ksm_client_germinate(c, "trained", "r0c1", &g, NULL, &e));
    CHECK_OK(ksm_client_advance(c, "trained", "r0c1", KSM_STAGE_TRAINING, NULL, NULL, &e));
    pthread_t w;
    CHECK_OK(pthread_create(&w, NULL, watcher, NULL));
    int ids[CLIENTS];
    for (int i = 0; i < CLIENTS; i++) ids[i] = i;
    run_threads(CLIENTS, client, ids, sizeof ids[0]);
    CHECK_OK(pthread_join(w, NULL));
    for (int k = 0; k < 2; k++) {
        uint64_t step = 0;
        CHECK_OK(ksm_client_configure_training(c, shared_models[k], NULL, false, NULL, &step, &e));
        CHECK(step == (uint64_t)atomic_load(&trained[k]), "%s: train_step %llu after %d TrainSteps",
              shared_models[k], (unsigned long long)step, atomic_load(&trained[k]));
    }
    CHECK(atomic_load(&collected) > 0, "no TrainStep collected gradient statistics");
    ksm_client_close(c);

    /* Stop under load: SIGTERM once the stoppers made BEFORE calls and the subscriber has
     * events (it is listed in the hub). Waiting here is for progress, not for a time. */
    pthread_t stop_th[STOPPERS];
    int stop_ids[STOPPERS];
    CHECK_OK(pthread_create(&w, NULL, stop_watcher, NULL));
    for (int i = 0; i < STOPPERS; i++) {
        stop_ids[i] = i;
        CHECK_OK(pthread_create(&stop_th[i], NULL, stopper, &stop_ids[i]));
    }
    while (atomic_load(&stop_calls) < BEFORE || atomic_load(&stop_events) == 0) {
        int st;
        CHECK(waitpid(pid, &st, WNOHANG) == 0, "kasminad exited early (status %d)", st);
        pause_ms(5);
    }
    kill(pid, SIGTERM);
    for (int i = 0; i < STOPPERS; i++) CHECK_OK(pthread_join(stop_th[i], NULL));
    CHECK_OK(pthread_join(w, NULL));
    int st = 0;
    CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
    printf("tsan_daemon: %d calls from %d clients (TrainSteps: %d and %d on the shared models, %d "
           "collected), %d events; then SIGTERM after %d calls of %d clients, %d calls in all, %d "
           "events at stop; %d unexpected errors; kasminad exit status %d\n",
           atomic_load(&calls), CLIENTS, atomic_load(&trained[0]), atomic_load(&trained[1]),
           atomic_load(&collected), atomic_load(&events_seen), BEFORE, STOPPERS,
           atomic_load(&stop_calls), atomic_load(&stop_events), atomic_load(&errors),
           WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
    CHECK(atomic_load(&errors) == 0, "unexpected errors");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "kasminad did not exit 0 (66: a race report)");
    return 0;
}
