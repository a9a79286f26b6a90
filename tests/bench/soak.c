/*
 * soak: many clients against one kasminad for a bounded time, mixing model lifecycle, seed
 * lifecycle, Forward, FusedForward, Evaluate and statistics calls. Passes (exit 0) when
 *   - no call failed,
 *   - the daemon's resident memory plateaued: VmRSS grew by at most max(5 %, 8 MiB) over the
 *     second half of the run (judged in runs of 120 s or more, or with --rss-check: a shorter run
 *     ends while the heap is still settling, about +20 MiB per 10 s in the first 30 s),
 *   - the allocator statistics came back: once the load stops, allocated bytes (current) on
 *     every device equal their value after the warm-up (each client's iteration creates and
 *     deletes what it uses; the long-lived models are the same as after the warm-up).
 * Prints requests, errors, RSS at start/middle/end and the allocator figures.
 *
 *   soak --kasminad build/kasminad [--duration 20] [--threads 8]
 *   soak --target unix:/run/kasmina/kasminad.sock --pid PID [--duration 600]
 *
 * With --kasminad it starts its own daemon on a temporary Unix socket (--no-persist) and stops
 * it at the end (a clean exit is required too). To bisect a leak, SOAK_MODE=bits leaves parts
 * out: 1 the scratch models (seed lifecycle), 2 compute on them, 4 compute on the long-lived
 * models, 8 the statistics calls.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kasmina/alloc.h"
#include "kasmina/client.h"

static char target[640];
static pid_t daemon_pid;
static double duration_s = 20;
static int n_threads = 8;
static int rss_check = -1; /* -1 auto: judged when duration_s >= 120 */
static atomic_bool stop_flag;
static atomic_long n_requests, n_errors;
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;
static char first_error[640];

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Resident set of the daemon in KiB (VmRSS), -1 when unknown. */
static long rss_kib(void)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)daemon_pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) return -1;
    long v = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) v = atol(line + 6);
    fclose(f);
    return v;
}

/* Counts one call; rc != 0 is an error (the first one is kept for the report). */
static int count(int rc, const struct ksm_client_error *e, const char *what)
{
    atomic_fetch_add(&n_requests, 1);
    if (rc != 0) {
        atomic_fetch_add(&n_errors, 1);
        pthread_mutex_lock(&err_lock);
        if (first_error[0] == '\0')
            snprintf(first_error, sizeof first_error, "%s: %s (%s)", what, e->message,
                     ksm_err_name(rc));
        pthread_mutex_unlock(&err_lock);
    }
    return rc;
}

#define CALL(expr) count((expr), &e, #expr)

static struct ksm_model_spec small_cnn(uint64_t seed)
{
    struct ksm_model_spec s = {.topology = KSM_TOPOLOGY_CNN,
                               .cnn = {.num_classes = 10, .base_channels = 8, .pool_layers = -1},
                               .init_seed = seed,
                               .permissive_gates = true};
    return s;
}

struct batch {
    ksm_tensor x, y;
    float alpha[4];
};

static void make_batch(struct batch *b, int64_t rows)
{
    int64_t xs[4] = {rows, 3, 32, 32}, ys[1] = {rows};
    size_t n = (size_t)(rows * 3 * 32 * 32);
    float *xd = malloc(n * sizeof *xd);
    int64_t *yd = malloc((size_t)rows * sizeof *yd);
    for (size_t i = 0; i < n; i++) xd[i] = (float)sin((double)i * 0.37) * 0.5f;
    for (int64_t i = 0; i < rows; i++) yd[i] = i % 10;
    ksm_tensor_init(&b->x, NULL, xd, KSM_DTYPE_F32, 4, xs);
    ksm_tensor_init(&b->y, NULL, yd, KSM_DTYPE_I64, 1, ys);
    for (int i = 0; i < 4; i++) b->alpha[i] = 0.25f * (float)i;
}

struct worker {
    int id;
    ksm_client *c;
    char model[32];   /* long-lived: created in the warm-up, kept */
    char scratch[32]; /* created and deleted by every iteration */
    struct batch b;
    int iterations;
};

static void compute(struct worker *w, const char *model, const char *slot)
{
    struct ksm_client_error e;
    struct ksm_forward_args fa = {.input = &w->b.x, .stream = "soak"};
    struct ksm_forward_result fr;
    memset(&fr, 0, sizeof fr);
    if (CALL(ksm_client_forward(w->c, model, &fa, &fr, &e)) == 0) ksm_host_tensor_free(&fr.output);
    if (slot != NULL) {
        struct ksm_alpha_override ov = {.slot_id = slot, .alpha = w->b.alpha, .n = 4};
        struct ksm_forward_args ff = {.input = &w->b.x, .overrides = &ov, .n_overrides = 1};
        memset(&fr, 0, sizeof fr);
        if (CALL(ksm_client_forward(w->c, model, &ff, &fr, &e)) == 0)
            ksm_host_tensor_free(&fr.output);
    }
    struct ksm_evaluate_args ea = {.input = &w->b.x, .targets = &w->b.y, .generate_standard = true};
    struct ksm_evaluate_result er;
    memset(&er, 0, sizeof er);
    if (CALL(ksm_client_evaluate(w->c, model, &ea, &er, &e)) == 0) ksm_evaluate_result_free(&er);
}

static void stats(struct worker *w)
{
    struct ksm_client_error e;
    struct ksm_client_memory_stats ms;
    memset(&ms, 0, sizeof ms);
    if (CALL(ksm_client_memory_stats(w->c, NULL, &ms, &e)) == 0) ksm_client_memory_stats_free(&ms);
    struct ksm_client_cache_counters *cc = NULL;
    size_t n = 0;
    if (CALL(ksm_client_cache_stats(w->c, w->model, &cc, &n, &e)) == 0) free(cc);
    struct ksm_slot_report reps[8];
    CALL(ksm_client_slot_reports(w->c, w->model, NULL, reps, 8, &n, &e));
    struct ksm_client_server_info info;
    memset(&info, 0, sizeof info);
    if (CALL(ksm_client_server_info(w->c, &info, &e)) == 0) ksm_client_server_info_free(&info);
    struct ksm_model_info *list = NULL;
    if (CALL(ksm_client_model_list(w->c, &list, &n, &e)) == 0) free(list);
}

/* One iteration: a scratch model through a seed's life (germinate, TRAINING, metrics, compute
 * with the seed, epochs, prune) and deleted; compute and statistics on the long-lived model. */
static int mode = -1;
static void iteration(struct worker *w)
{
    if (mode < 0) mode = getenv("SOAK_MODE") ? atoi(getenv("SOAK_MODE")) : 0;
    struct ksm_client_error e;
    struct ksm_model_info mi;
    struct ksm_model_spec spec = small_cnn((uint64_t)w->id + 100);
    if (mode & 1) {
        compute(w, w->model, NULL);
        stats(w);
        w->iterations++;
        return;
    }
    if (CALL(ksm_client_model_create(w->c, w->scratch, &spec, &mi, &e)) != 0) return;
    char slot[KSM_SLOT_ID_MAX];
    snprintf(slot, sizeof slot, "%s", mi.slots[w->iterations % mi.n_slots].slot_id);
    struct ksm_germinate_args ga = {.blueprint_id = "conv_light", .init_seed = 5};
    struct ksm_slot_report r;
    struct ksm_gate_result g;
    CALL(ksm_client_germinate(w->c, w->scratch, slot, &ga, &r, &e));
    CALL(ksm_client_advance(w->c, w->scratch, slot, KSM_STAGE_UNKNOWN, &g, &r, &e));
    struct ksm_metrics_update u = {.has_val_accuracy = true, .val_accuracy = 55.0};
    CALL(ksm_client_record_metrics(w->c, w->scratch, slot, &u, &r, &e));
    CALL(ksm_client_set_alpha(w->c, w->scratch, slot, 0.5, &r, &e));
    if (!(mode & 2)) compute(w, w->scratch, slot);
    size_t n = 0;
    CALL(ksm_client_step_epoch(w->c, w->scratch, NULL, NULL, 0, &n, &e));
    bool accepted = false;
    CALL(ksm_client_prune(w->c, w->scratch, slot, "soak", "soak", &accepted, &r, &e));
    CALL(ksm_client_model_delete(w->c, w->scratch, NULL, &e));
    if (!(mode & 4)) compute(w, w->model, NULL);
    if (!(mode & 8)) stats(w);
    w->iterations++;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    while (!atomic_load(&stop_flag)) iteration(w);
    return NULL;
}

static int64_t reserved_last;

/* Sum over devices of allocated bytes (current); reserved_last receives reserved bytes. */
static int64_t allocated_now(ksm_client *c)
{
    struct ksm_client_error e;
    struct ksm_client_memory_stats ms;
    memset(&ms, 0, sizeof ms);
    if (ksm_client_memory_stats(c, NULL, &ms, &e) != 0) {
        fprintf(stderr, "soak: GetMemoryStats failed: %s\n", e.message);
        return -1;
    }
    int64_t sum = 0;
    reserved_last = 0;
    for (size_t i = 0; i < ms.n; i++) {
        sum += ms.devices[i].stats.pool[KSM_POOL_ALL].allocated_bytes.current;
        reserved_last += ms.devices[i].stats.pool[KSM_POOL_ALL].reserved_bytes.current;
    }
    ksm_client_memory_stats_free(&ms);
    return sum;
}

static int start_daemon(const char *bin, char *dir, size_t dirlen)
{
    snprintf(dir, dirlen, "/tmp/ksm-soak-XXXXXX");
    if (mkdtemp(dir) == NULL) return -1;
    char listen[300], log[300];
    snprintf(listen, sizeof listen, "unix:%s/k.sock", dir);
    snprintf(log, sizeof log, "%s/kasminad.log", dir);
    snprintf(target, sizeof target, "%s", listen);
    daemon_pid = fork();
    if (daemon_pid < 0) return -1;
    if (daemon_pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        FILE *f = freopen(log, "w", stderr);
        (void)f;
        execl(bin, "kasminad", "--listen", listen, "--no-persist", "--no-cuda", "--log-level",
              "warn", "--workers", "4", (char *)NULL);
        _exit(127);
    }
    struct ksm_client_options o = {.deadline_ms = 20000, .wait_for_ready = true};
    ksm_client *c;
    struct ksm_client_error e;
    if (ksm_client_connect(target, &o, &c, &e) != 0) return -1;
    enum ksm_health_status st;
    int rc = ksm_client_health(c, "", &st, &e);
    ksm_client_close(c);
    if (rc != 0) fprintf(stderr, "soak: kasminad did not come up: %s (log %s)\n", e.message, log);
    return rc;
}

static void usage(void)
{
    fprintf(stderr, "usage: soak (--kasminad PATH | --target ADDR --pid PID) [--duration S] "
                    "[--threads N] [--rss-check]\n");
}

int main(int argc, char **argv)
{
    const char *bin = NULL;
    static const struct option opts[] = {{"kasminad", required_argument, NULL, 'k'},
                                         {"target", required_argument, NULL, 't'},
                                         {"pid", required_argument, NULL, 'p'},
                                         {"duration", required_argument, NULL, 'd'},
                                         {"threads", required_argument, NULL, 'n'},
                                         {"rss-check", no_argument, NULL, 'r'},
                                         {NULL, 0, NULL, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'k': bin = optarg; break;
        case 't': snprintf(target, sizeof target, "%s", optarg); break;
        case 'p': daemon_pid = (pid_t)atoi(optarg); break;
        case 'd': duration_s = atof(optarg); break;
        case 'n': n_threads = atoi(optarg); break;
        case 'r': rss_check = 1; break;
        default: usage(); return 2;
        }
    }
    if ((bin == NULL && (target[0] == '\0' || daemon_pid <= 0)) || !(duration_s >= 2) ||
        n_threads < 1 || n_threads > 64) {
        usage();
        return 2;
    }
    char dir[256] = "";
    if (bin != NULL && start_daemon(bin, dir, sizeof dir) != 0) return 1;

    /* Warm-up: every client creates its long-lived model and runs two iterations, so that every
     * cache and pool the steady state needs exists. */
    struct worker *ws = calloc((size_t)n_threads, sizeof *ws);
    struct ksm_client_options o = {.deadline_ms = 60000};
    struct ksm_client_error e;
    for (int i = 0; i < n_threads; i++) {
        struct worker *w = &ws[i];
        w->id = i;
        snprintf(w->model, sizeof w->model, "soak-%d", i);
        snprintf(w->scratch, sizeof w->scratch, "soak-scratch-%d", i);
        make_batch(&w->b, 4);
        if (ksm_client_connect(target, &o, &w->c, &e) != 0) {
            fprintf(stderr, "soak: %s\n", e.message);
            return 1;
        }
        struct ksm_model_spec spec = small_cnn((uint64_t)i + 1);
        struct ksm_model_info mi;
        CALL(ksm_client_model_create(w->c, w->model, &spec, &mi, &e));
        iteration(w);
        iteration(w);
    }
    ksm_client *probe = ws[0].c;
    int64_t alloc_base = allocated_now(probe), reserved_base = reserved_last;
    long rss_start = rss_kib();
    double t0 = now_s();
    printf("soak: %d clients for %.0f s against %s (pid %d); after warm-up: RSS %.1f MiB, "
           "allocated %lld bytes\n",
           n_threads, duration_s, target, (int)daemon_pid, (double)rss_start / 1024.0,
           (long long)alloc_base);
    fflush(stdout);

    pthread_t *th = calloc((size_t)n_threads, sizeof *th);
    for (int i = 0; i < n_threads; i++) pthread_create(&th[i], NULL, worker_main, &ws[i]);
    long rss_mid = -1, rss_max = rss_start;
    double next_report = t0 + 10;
    while (now_s() - t0 < duration_s) {
        sleep_ms(200);
        long r = rss_kib();
        if (r > rss_max) rss_max = r;
        if (rss_mid < 0 && now_s() - t0 >= duration_s / 2) rss_mid = r;
        if (now_s() >= next_report) {
            printf("soak: t=%.0f s requests %ld errors %ld RSS %.1f MiB\n", now_s() - t0,
                   atomic_load(&n_requests), atomic_load(&n_errors), (double)r / 1024.0);
            fflush(stdout);
            next_report += 10;
        }
    }
    atomic_store(&stop_flag, true);
    for (int i = 0; i < n_threads; i++) pthread_join(th[i], NULL);
    double elapsed = now_s() - t0;
    long rss_end = rss_kib();
    int64_t alloc_end = allocated_now(probe);
    int iterations = 0;
    for (int i = 0; i < n_threads; i++) iterations += ws[i].iterations;

    long requests = atomic_load(&n_requests), errors = atomic_load(&n_errors);
    long allow = rss_mid / 20 > 8 * 1024 ? rss_mid / 20 : 8 * 1024;
    bool plateau = rss_mid > 0 && rss_end >= 0 && rss_end - rss_mid <= allow;
    bool judge_rss = rss_check == 1 || (rss_check < 0 && duration_s >= 120);
    bool alloc_back = alloc_base >= 0 && alloc_end == alloc_base;
    printf("soak: %.1f s, %d iterations, %ld requests (%.0f/s), %ld errors\n", elapsed, iterations,
           requests, (double)requests / elapsed, errors);
    printf("soak: RSS start %.1f MiB, middle %.1f MiB, end %.1f MiB, max %.1f MiB (second-half "
           "growth %+.1f MiB, allowed %.1f MiB)\n",
           (double)rss_start / 1024.0, (double)rss_mid / 1024.0, (double)rss_end / 1024.0,
           (double)rss_max / 1024.0, (double)(rss_end - rss_mid) / 1024.0, (double)allow / 1024.0);
    printf("soak: allocator allocated (current) after warm-up %lld bytes, after the load %lld "
           "bytes (reserved %lld -> %lld)\n",
           (long long)alloc_base, (long long)alloc_end, (long long)reserved_base,
           (long long)reserved_last);
    if (errors > 0) printf("soak: first error: %s\n", first_error);

    for (int i = 0; i < n_threads; i++) {
        ksm_client_close(ws[i].c);
        free(ws[i].b.x.data);
        free(ws[i].b.y.data);
    }
    free(ws);
    free(th);
    int clean = 0;
    if (bin != NULL) {
        int status = 0;
        kill(daemon_pid, SIGTERM);
        waitpid(daemon_pid, &status, 0);
        clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!clean) printf("soak: kasminad did not exit cleanly (status %d)\n", status);
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (clean && system(cmd) != 0) fprintf(stderr, "soak: cannot remove %s\n", dir);
    }
    if (!judge_rss)
        printf("soak: RSS plateau not judged in a %.0f s run (use --duration 120 or more, or "
               "--rss-check)\n",
               duration_s);
    bool ok = errors == 0 && (plateau || !judge_rss) && alloc_back && (bin == NULL || clean) &&
              requests > 0;
    printf("soak: %s%s%s%s\n", ok ? "PASS" : "FAIL:", errors ? " errors" : "",
           plateau || !judge_rss ? "" : " RSS still growing",
           alloc_back ? "" : " allocator not back");
    return ok ? 0 : 1;
}
