/*
 * Control-RPC latency and throughput over the Unix socket: SetAlpha and GetSlotReports through
 * the C client against a real kasminad (started here on a temporary socket).
 *
 *     bench_rpc <path/to/kasminad> [seconds per phase, default 3] [python stubs dir]
 *
 * Prints p50/p99 latency at concurrency 1 and requests per second at concurrency 16. With the
 * stubs directory (build/client/python) it also starts tests/bench/py_alpha_server.py, a grpcio
 * server doing the same state update in Python, and measures it in the same invocation,
 * alternating phase by phase, and prints the ratios.
 *
 * Each phase also prints the server's CPU time per call (utime + stime of the server process
 * from /proc/<pid>/stat over the timed part of the phase, divided by the calls) and the cores
 * the server and this load generator used (CPU seconds over wall seconds). Throughput measures
 * the CPU left over on a loaded machine; CPU per call is the machine-independent efficiency.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kasmina/client.h"
#include "kasmina/errors.h"

static char target[300];
static const char *model_id = "bench";

struct result {
    double p50, p99, rps;
    double cpu_us;                     /* server CPU per call */
    double server_cores, client_cores; /* CPU seconds over wall seconds */
};
static double phase_s = 3.0;
static pid_t server_pid; /* the server of the current phase */

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

/* utime + stime of a whole process (every thread, live or exited), in seconds. */
static double proc_cpu_s(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* Fields after "(comm)": state is field 3, utime 14, stime 15. */
    const char *p = strrchr(buf, ')');
    unsigned long long ut = 0, st = 0;
    if (p == NULL ||
        sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return 0;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static double self_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CPU use over a timed part of a phase. */
struct cpu_mark {
    double wall, server, client;
};

static struct cpu_mark cpu_mark(void)
{
    return (struct cpu_mark){now_s(), proc_cpu_s(server_pid), self_cpu_s()};
}

static void cpu_account(struct result *r, struct cpu_mark a, struct cpu_mark b, long calls)
{
    double wall = b.wall - a.wall;
    r->cpu_us = calls > 0 ? (b.server - a.server) / (double)calls * 1e6 : 0;
    r->server_cores = wall > 0 ? (b.server - a.server) / wall : 0;
    r->client_cores = wall > 0 ? (b.client - a.client) / wall : 0;
    printf("%-26s   server CPU %6.1f us per call; cores used: server %.2f, load generator %.2f\n",
           "", r->cpu_us, r->server_cores, r->client_cores);
}

enum op { OP_SET_ALPHA, OP_REPORTS };

static int call(ksm_client *c, enum op op, int i, struct ksm_client_error *err)
{
    if (op == OP_SET_ALPHA)
        return ksm_client_set_alpha(c, model_id, "r0c1", (i % 100) / 100.0, NULL, err);
    struct ksm_slot_report r[8];
    size_t n;
    return ksm_client_slot_reports(c, model_id, "", r, 8, &n, err);
}

static struct result latency(enum op op, const char *name)
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
    struct cpu_mark mark = cpu_mark();
    double end = mark.wall + phase_s;
    while (now_s() < end && n < cap) {
        double t0 = now_s();
        if (call(c, op, (int)n, &err) != 0) {
            fprintf(stderr, "%s: %s\n", name, err.message);
            exit(1);
        }
        lat[n++] = now_s() - t0;
    }
    struct result res = {0};
    struct cpu_mark done = cpu_mark();
    qsort(lat, n, sizeof *lat, cmp_double);
    res.p50 = lat[n / 2] * 1e6;
    res.p99 = lat[(size_t)((double)n * 0.99)] * 1e6;
    printf("%-26s concurrency 1:  n %7zu  p50 %7.1f us  p99 %7.1f us\n", name, n, res.p50, res.p99);
    cpu_account(&res, mark, done, (long)n);
    free(lat);
    ksm_client_close(c);
    return res;
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

static struct result throughput(enum op op, const char *name, int threads)
{
    struct worker w[64];
    struct cpu_mark mark = cpu_mark();
    double t0 = mark.wall, end = t0 + phase_s;
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
    struct cpu_mark done = cpu_mark();
    double el = done.wall - t0;
    printf("%-26s concurrency %d: %8.0f requests/s  (%ld requests, %ld errors)\n", name, threads,
           (double)total / el, total, errors);
    struct result res = {.rps = errors ? 0 : (double)total / el};
    cpu_account(&res, mark, done, total);
    return res;
}

static pid_t spawn(char *const argv[])
{
    pid_t pid = fork();
    if (pid == 0) {
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s <kasminad> [seconds] [python stubs dir]\n", argv[0]);
        return 2;
    }
    if (argc > 2) phase_s = atof(argv[2]);
    const char *stubs = argc > 3 ? argv[3] : NULL;
    char dir[] = "/tmp/ksm-bench-XXXXXX";
    if (mkdtemp(dir) == NULL) return 1;
    char sock[256], listen_arg[300], ktarget[300], pysock[256], ptarget[300];
    snprintf(sock, sizeof sock, "%s/s.sock", dir);
    snprintf(pysock, sizeof pysock, "%s/py.sock", dir);
    snprintf(listen_arg, sizeof listen_arg, "unix:%s", sock);
    snprintf(ktarget, sizeof ktarget, "unix:%s", sock);
    snprintf(ptarget, sizeof ptarget, "unix:%s", pysock);
    char *kargv[] = {argv[1], "--listen", listen_arg, "--no-persist", "--log-level", "warn", NULL};
    pid_t pid = spawn(kargv), pypid = -1;
    if (stubs) {
        char script[512];
        snprintf(script, sizeof script, "%s/tests/bench/py_alpha_server.py", KSM_SOURCE_DIR);
        char *pargv[] = {"/usr/bin/python3", script, (char *)stubs, pysock, "16", NULL};
        pypid = spawn(pargv);
    }
    snprintf(target, sizeof target, "%s", ktarget);
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
    if (stubs) { /* wait for the Python server */
        snprintf(target, sizeof target, "%s", ptarget);
        if (ksm_client_connect(target, &o, &c, &err) != 0 ||
            ksm_client_set_alpha(c, "bench", "r0c1", 0.5, NULL, &err) != 0) {
            fprintf(stderr, "python server: %s\n", err.message);
            stubs = NULL;
        }
        ksm_client_close(c);
    }
    printf("over Unix sockets, %.1f s per phase, %ld cores\n", phase_s,
           sysconf(_SC_NPROCESSORS_ONLN));
    struct result k[4], p[4];
    for (int phase = 0; phase < 4; phase++) {
        for (int side = 0; side < (stubs ? 2 : 1); side++) {
            snprintf(target, sizeof target, "%s", side ? ptarget : ktarget);
            server_pid = side ? pypid : pid;
            const char *who = side ? "python-grpcio" : "kasminad";
            char name[64];
            struct result *r = side ? &p[phase] : &k[phase];
            enum op op = phase % 2 ? OP_REPORTS : OP_SET_ALPHA;
            snprintf(name, sizeof name, "%s %s", who, op == OP_SET_ALPHA ? "SetAlpha" : "Reports");
            *r = phase < 2 ? latency(op, name) : throughput(op, name, 16);
        }
    }
    if (stubs) {
        printf("\nkasminad / python-grpcio: SetAlpha p50 %.2fx lower, throughput at 16 %.1fx; "
               "GetSlotReports p50 %.2fx lower, throughput at 16 %.1fx\n",
               p[0].p50 / k[0].p50, k[2].rps / p[2].rps, p[1].p50 / k[1].p50, k[3].rps / p[3].rps);
        printf("server CPU per call at concurrency 16: SetAlpha %.1f us vs %.1f us (%.1fx less); "
               "GetSlotReports %.1f us vs %.1f us (%.1fx less)\n",
               k[2].cpu_us, p[2].cpu_us, p[2].cpu_us / k[2].cpu_us, k[3].cpu_us, p[3].cpu_us,
               p[3].cpu_us / k[3].cpu_us);
        kill(pypid, SIGTERM);
        waitpid(pypid, NULL, 0);
        unlink(pysock);
    }
    kill(pid, SIGTERM);
    int st;
    waitpid(pid, &st, 0);
    unlink(sock);
    rmdir(dir);
    return 0;
}
