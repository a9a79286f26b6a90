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
 * The concurrency-16 phases run twice: with 16 threads each calling through its own ksm_client
 * (the C client library, synchronous: a thread per call in flight), and with a lighter
 * asynchronous generator (ASYNC_THREADS threads, each with one channel and one completion queue,
 * keeping 16 / ASYNC_THREADS calls in flight through gRPC C core, replies unpacked and checked).
 * Both servers are driven by the same generator in the same way in each phase.
 *
 * Each phase also prints the server's CPU time per call (utime + stime of the server process
 * from /proc/<pid>/stat over the timed part of the phase, divided by the calls) and the cores
 * the server and this load generator used (CPU seconds over wall seconds). Throughput measures
 * the CPU left over on a loaded machine; CPU per call is the machine-independent efficiency.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "kasmina/client.h"
#include "kasmina/errors.h"
#include "kasmina/v1/kasmina.pb-c.h"

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

/* ---- The asynchronous generator ---- */

#define ASYNC_THREADS 2

struct acall {
    grpc_call *call;
    grpc_byte_buffer *send, *recv;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
};

struct agen {
    enum op op;
    int inflight;
    double end;
    long count, errors;
    pthread_t th;
};

static grpc_byte_buffer *pack_request(enum op op, int i)
{
    uint8_t buf[256];
    size_t n;
    if (op == OP_SET_ALPHA) {
        Kasmina__V1__SetAlphaRequest r = KASMINA__V1__SET_ALPHA_REQUEST__INIT;
        r.model_id = (char *)model_id;
        r.slot_id = "r0c1";
        r.alpha = (float)((i % 100) / 100.0);
        n = protobuf_c_message_pack(&r.base, buf);
    } else {
        Kasmina__V1__GetSlotReportsRequest r = KASMINA__V1__GET_SLOT_REPORTS_REQUEST__INIT;
        r.model_id = (char *)model_id;
        r.slot_id = "";
        n = protobuf_c_message_pack(&r.base, buf);
    }
    grpc_slice sl = grpc_slice_from_copied_buffer((const char *)buf, n);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

static void acall_start(struct acall *a, grpc_channel *ch, void *method, grpc_completion_queue *cq,
                        enum op op, int i)
{
    memset(a, 0, sizeof *a);
    grpc_metadata_array_init(&a->init_md);
    grpc_metadata_array_init(&a->trail_md);
    a->details = grpc_empty_slice();
    gpr_timespec deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(20000, GPR_TIMESPAN));
    a->call = grpc_channel_create_registered_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method,
                                                  deadline, NULL);
    a->send = pack_request(op, i);
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].flags = GRPC_INITIAL_METADATA_WAIT_FOR_READY;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = a->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &a->init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &a->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &a->trail_md;
    ops[5].data.recv_status_on_client.status = &a->status;
    ops[5].data.recv_status_on_client.status_details = &a->details;
    if (grpc_call_start_batch(a->call, ops, 6, a, NULL) != GRPC_CALL_OK) {
        fprintf(stderr, "async generator: grpc_call_start_batch failed\n");
        exit(1);
    }
}

/* The reply is unpacked (as a client would) and checked; true when the call succeeded. */
static bool acall_finish(struct acall *a, enum op op)
{
    bool ok = a->status == GRPC_STATUS_OK && a->recv != NULL;
    if (ok) {
        grpc_byte_buffer_reader r;
        ok = grpc_byte_buffer_reader_init(&r, a->recv) != 0;
        if (ok) {
            grpc_slice all = grpc_byte_buffer_reader_readall(&r);
            grpc_byte_buffer_reader_destroy(&r);
            const ProtobufCMessageDescriptor *d = op == OP_SET_ALPHA
                                                      ? &kasmina__v1__slot_report__descriptor
                                                      : &kasmina__v1__slot_reports__descriptor;
            ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(all),
                                                            GRPC_SLICE_START_PTR(all));
            grpc_slice_unref(all);
            ok = m != NULL;
            if (m != NULL) protobuf_c_message_free_unpacked(m, NULL);
        }
    }
    grpc_byte_buffer_destroy(a->send);
    if (a->recv != NULL) grpc_byte_buffer_destroy(a->recv);
    grpc_metadata_array_destroy(&a->init_md);
    grpc_metadata_array_destroy(&a->trail_md);
    grpc_slice_unref(a->details);
    grpc_call_unref(a->call);
    return ok;
}

static void *agen_main(void *p)
{
    struct agen *g = p;
    /* A channel of its own (its own connection: no shared subchannel) and a queue per thread. */
    grpc_arg arg = {
        .type = GRPC_ARG_INTEGER, .key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, .value.integer = 1};
    grpc_channel_args ca = {.num_args = 1, .args = &arg};
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(target, creds, &ca);
    grpc_channel_credentials_release(creds);
    void *method =
        grpc_channel_register_call(ch,
                                   g->op == OP_SET_ALPHA ? "/kasmina.v1.Kasmina/SetAlpha"
                                                         : "/kasmina.v1.Kasmina/GetSlotReports",
                                   NULL, NULL);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    struct acall *calls = calloc((size_t)g->inflight, sizeof *calls);
    int i = 0, live = 0;
    for (; i < g->inflight; i++, live++) acall_start(&calls[i], ch, method, cq, g->op, i);
    while (live > 0) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type != GRPC_OP_COMPLETE) break;
        struct acall *a = ev.tag;
        bool ok = ev.success && acall_finish(a, g->op);
        double t = now_s();
        if (t < g->end) {
            if (ok)
                g->count++;
            else
                g->errors++;
            acall_start(a, ch, method, cq, g->op, i++);
        } else {
            live--;
        }
    }
    free(calls);
    grpc_channel_destroy(ch);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    return NULL;
}

static struct result throughput_async(enum op op, const char *name, int inflight)
{
    struct agen g[ASYNC_THREADS];
    struct cpu_mark mark = cpu_mark();
    double end = mark.wall + phase_s;
    for (int i = 0; i < ASYNC_THREADS; i++) {
        g[i] = (struct agen){.op = op, .inflight = inflight / ASYNC_THREADS, .end = end};
        pthread_create(&g[i].th, NULL, agen_main, &g[i]);
    }
    long total = 0, errors = 0;
    for (int i = 0; i < ASYNC_THREADS; i++) {
        pthread_join(g[i].th, NULL);
        total += g[i].count;
        errors += g[i].errors;
    }
    /* Calls still in flight at the end ran past it: the phase is the first phase_s seconds. */
    struct cpu_mark done = cpu_mark();
    printf("%-26s concurrency %d async: %8.0f requests/s  (%ld requests, %ld errors)\n", name,
           inflight, (double)total / phase_s, total, errors);
    struct result res = {.rps = errors ? 0 : (double)total / phase_s};
    cpu_account(&res, mark, done, total);
    return res;
}

/* The generator's own gRPC without abseil's mutex deadlock detection (on in Debian's abseil), as
 * kasminad runs (ksm_rpc_runtime_init): a lighter generator for both servers alike. */
static void no_deadlock_detection(void)
{
    void *sym = dlsym(RTLD_DEFAULT,
                      "_ZN4absl7debian329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE");
    if (sym != NULL) {
        void (*set_mode)(int);
        memcpy(&set_mode, &sym, sizeof set_mode);
        set_mode(0); /* absl::OnDeadlockCycle::kIgnore */
    }
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
    no_deadlock_detection();
    grpc_init();
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
    struct result k[6], p[6];
    for (int phase = 0; phase < 6; phase++) {
        for (int side = 0; side < (stubs ? 2 : 1); side++) {
            snprintf(target, sizeof target, "%s", side ? ptarget : ktarget);
            server_pid = side ? pypid : pid;
            const char *who = side ? "python-grpcio" : "kasminad";
            char name[64];
            struct result *r = side ? &p[phase] : &k[phase];
            enum op op = phase % 2 ? OP_REPORTS : OP_SET_ALPHA;
            snprintf(name, sizeof name, "%s %s", who, op == OP_SET_ALPHA ? "SetAlpha" : "Reports");
            *r = phase < 2   ? latency(op, name)
                 : phase < 4 ? throughput(op, name, 16)
                             : throughput_async(op, name, 16);
        }
    }
    if (stubs) {
        printf("\nkasminad / python-grpcio: SetAlpha p50 %.2fx lower, throughput at 16 %.1fx "
               "(async generator %.1fx); GetSlotReports p50 %.2fx lower, throughput at 16 %.1fx "
               "(async %.1fx)\n",
               p[0].p50 / k[0].p50, k[2].rps / p[2].rps, k[4].rps / p[4].rps, p[1].p50 / k[1].p50,
               k[3].rps / p[3].rps, k[5].rps / p[5].rps);
        printf("server CPU per call at concurrency 16 (async generator): SetAlpha %.1f us vs "
               "%.1f us (%.1fx less); GetSlotReports %.1f us vs %.1f us (%.1fx less)\n",
               k[4].cpu_us, p[4].cpu_us, p[4].cpu_us / k[4].cpu_us, k[5].cpu_us, p[5].cpu_us,
               p[5].cpu_us / k[5].cpu_us);
        kill(pypid, SIGTERM);
        waitpid(pypid, NULL, 0);
        unlink(pysock);
    }
    kill(pid, SIGTERM);
    int st;
    waitpid(pid, &st, 0);
    unlink(sock);
    rmdir(dir);
    grpc_shutdown();
    return 0;
}
