/*
 * Control-RPC latency and throughput over the Unix socket: SetAlpha and GetSlotReports through
 * the C client against a real kasminad (started here on a temporary socket).
 *
 *     bench_rpc <path/to/kasminad> [seconds per phase, default 3]
 *
 * Prints p50/p99 latency at concurrency 1 and requests per second at concurrency 16.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kasmina/client.h"
#include "kasmina/errors.h"

static char target[300];
static double phase_s = 3.0;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

enum op { OP_SET_ALPHA, OP_REPORTS };

static int call(ksm_client *c, enum op op, int i, struct ksm_client_error *err)
{
    if (op == OP_SET_ALPHA)
        return ksm_client_set_alpha(c, "bench", "r0c1", (i % 100) / 100.0, NULL, err);
    struct ksm_slot_report r[8];
    size_t n;
    return ksm_client_slot_reports(c, "bench", "", r, 8, &n, err);
}

static void latency(enum op op, const char *name)
{
    ksm_client *c;
    struct ksm_client_error err;
    if (ksm_client_connect(target, NULL, &c, &err) != 0) {
        fprintf(stderr, "connect: %s\n", err.message);
        exit(1);
    }
    size_t cap = 1 << 20, n = 0;
    double *lat = malloc(cap * sizeof *lat);
    for (int i = 0; i < 200; i++) /* warm-up */
        call(c, op, i, &err);
    double end = now_s() + phase_s;
    while (now_s() < end && n < cap) {
        double t0 = now_s();
        if (call(c, op, (int)n, &err) != 0) {
            fprintf(stderr, "%s: %s\n", name, err.message);
            exit(1);
        }
        lat[n++] = now_s() - t0;
    }
    qsort(lat, n, sizeof *lat, cmp_double);
    printf("%-16s concurrency 1:  n %7zu  p50 %7.1f us  p99 %7.1f us\n", name, n, lat[n / 2] * 1e6,
           lat[(size_t)((double)n * 0.99)] * 1e6);
    free(lat);
    ksm_client_close(c);
}

struct worker {
    enum op op;
    double end;
    long count, errors;
    pthread_t th;
};

static void *work(void *p)
{
    struct worker *w = p;
    ksm_client *c;
    struct ksm_client_error err;
    if (ksm_client_connect(target, NULL, &c, &err) != 0) {
        w->errors++;
        return NULL;
    }
    for (int i = 0; now_s() < w->end; i++) {
        if (call(c, w->op, i, &err) != 0)
            w->errors++;
        else
            w->count++;
    }
    ksm_client_close(c);
    return NULL;
}

static void throughput(enum op op, const char *name, int threads)
{
    struct worker w[64];
    double t0 = now_s(), end = t0 + phase_s;
    for (int i = 0; i < threads; i++) {
        w[i] = (struct worker){.op = op, .end = end};
        pthread_create(&w[i].th, NULL, work, &w[i]);
    }
    long total = 0, errors = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(w[i].th, NULL);
        total += w[i].count;
        errors += w[i].errors;
    }
    double el = now_s() - t0;
    printf("%-16s concurrency %d: %8.0f requests/s  (%ld requests, %ld errors)\n", name, threads,
           (double)total / el, total, errors);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s <kasminad> [seconds]\n", argv[0]);
        return 2;
    }
    if (argc > 2) phase_s = atof(argv[2]);
    char dir[] = "/tmp/ksm-bench-XXXXXX";
    if (mkdtemp(dir) == NULL) return 1;
    char sock[256], listen_arg[300];
    snprintf(sock, sizeof sock, "%s/s.sock", dir);
    snprintf(listen_arg, sizeof listen_arg, "unix:%s", sock);
    snprintf(target, sizeof target, "unix:%s", sock);
    pid_t pid = fork();
    if (pid == 0) {
        execl(argv[1], argv[1], "--listen", listen_arg, "--no-persist", "--log-level", "warn",
              (char *)NULL);
        _exit(127);
    }
    ksm_client *c;
    struct ksm_client_error err;
    struct ksm_client_options o = {.wait_for_ready = true, .deadline_ms = 20000};
    if (ksm_client_connect(target, &o, &c, &err) != 0) return 1;
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN, .cnn = {.base_channels = 8}};
    struct ksm_model_info info;
    int rc = ksm_client_model_create(c, "bench", &spec, &info, &err);
    struct ksm_germinate_args g = {.blueprint_id = "conv_light"};
    if (rc == 0) rc = ksm_client_germinate(c, "bench", "r0c1", &g, NULL, &err);
    if (rc != 0) {
        fprintf(stderr, "setup: %s\n", err.message);
        kill(pid, SIGTERM);
        return 1;
    }
    ksm_client_close(c);
    printf("kasminad over %s, %.1f s per phase, %ld cores\n", target, phase_s,
           sysconf(_SC_NPROCESSORS_ONLN));
    latency(OP_SET_ALPHA, "SetAlpha");
    latency(OP_REPORTS, "GetSlotReports");
    throughput(OP_SET_ALPHA, "SetAlpha", 16);
    throughput(OP_REPORTS, "GetSlotReports", 16);
    kill(pid, SIGTERM);
    int st;
    waitpid(pid, &st, 0);
    unlink(sock);
    rmdir(dir);
    return 0;
}
