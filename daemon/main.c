/*
 * kasminad: the kasmina daemon.
 *
 * This stage brings up the device runtime: it loads the CUDA backend plugin if it can (any
 * failure means the CPU backend, with one log line saying why), creates a caching allocator per
 * device, logs the devices and waits on a libuv loop for SIGTERM/SIGINT (SIGHUP reopens the log
 * file). The gRPC service is added on top of this loop.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"

#ifndef KSM_VERSION
#define KSM_VERSION "0.0.0"
#endif

#define MAX_DEVICES 64

struct daemon_opts {
    int cpu_devices;
    int use_cuda; /* 1 auto, 0 off */
    const char *log_file;
    enum ksm_log_level log_level;
    size_t memory_cap;
};

struct daemon {
    struct daemon_opts opts;
    ksm_backend *cuda;
    ksm_backend *cpu;
    ksm_backend *primary; /* the backend models go to by default */
    int n_alloc;
    ksm_allocator *alloc[MAX_DEVICES * 2];
    uv_loop_t loop;
    uv_signal_t sig_term, sig_int, sig_hup;
    int signals;
};

static void usage(FILE *f)
{
    fprintf(f, "usage: kasminad [options]\n"
               "  --cpu-devices N     logical CPU devices cpu:0..cpu:N-1 (1..64, default 1)\n"
               "  --no-cuda           do not load the CUDA backend plugin\n"
               "  --memory-cap BYTES  per-device allocator cap (0 = none, default 0)\n"
               "  --log-level LEVEL   error|warn|info|debug (default info)\n"
               "  --log-file PATH     append log lines to PATH (SIGHUP reopens it)\n"
               "  --demo              accepted for the quick start (demo model: gRPC stage)\n"
               "  --version           print the version and exit\n"
               "  --help              this text\n");
}

/* Parses an integer option in [lo, hi]; on failure prints one sentence naming the option. */
static int parse_int_opt(const char *name, const char *arg, long long lo, long long hi,
                         long long *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(arg, &end, 10);
    if (errno != 0 || end == arg || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "kasminad: option --%s must be an integer in [%lld, %lld], got '%s'\n",
                name, lo, hi, arg);
        return KSM_EINVAL;
    }
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, struct daemon_opts *o)
{
    enum { OPT_CPU = 1000, OPT_NOCUDA, OPT_CAP, OPT_LEVEL, OPT_LOGFILE, OPT_DEMO, OPT_VERSION };
    static const struct option longopts[] = {
        {"cpu-devices", required_argument, NULL, OPT_CPU},
        {"no-cuda", no_argument, NULL, OPT_NOCUDA},
        {"memory-cap", required_argument, NULL, OPT_CAP},
        {"log-level", required_argument, NULL, OPT_LEVEL},
        {"log-file", required_argument, NULL, OPT_LOGFILE},
        {"demo", no_argument, NULL, OPT_DEMO},
        {"version", no_argument, NULL, OPT_VERSION},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    o->cpu_devices = 1;
    o->use_cuda = 1;
    o->log_level = KSM_LOG_INFO;
    const char *env = getenv("KASMINA_CPU_DEVICES");
    long long v;
    if (env != NULL &&
        parse_int_opt("cpu-devices (KASMINA_CPU_DEVICES)", env, 1, MAX_DEVICES, &v) == 0)
        o->cpu_devices = (int)v;
    else if (env != NULL)
        return 2;
    int c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_CPU:
            if (parse_int_opt("cpu-devices", optarg, 1, MAX_DEVICES, &v) != 0) return 2;
            o->cpu_devices = (int)v;
            break;
        case OPT_NOCUDA: o->use_cuda = 0; break;
        case OPT_CAP:
            if (parse_int_opt("memory-cap", optarg, 0, LLONG_MAX, &v) != 0) return 2;
            o->memory_cap = (size_t)v;
            break;
        case OPT_LEVEL:
            if (ksm_log_level_parse(optarg, &o->log_level) != 0) {
                fprintf(stderr,
                        "kasminad: option --log-level must be one of error|warn|info|debug, "
                        "got '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case OPT_LOGFILE: o->log_file = optarg; break;
        case OPT_DEMO: break;
        case OPT_VERSION: printf("kasminad %s\n", KSM_VERSION); return 1;
        case 'h': usage(stdout); return 1;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kasminad: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    return 0;
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct daemon *d = h->data;
    if (signum == SIGHUP) {
        int rc = ksm_log_reopen();
        if (rc != 0)
            KSM_LOGW("main", "log reopen failed: %s", ksm_strerror(rc));
        else
            KSM_LOGI("main", "log reopened");
        return;
    }
    d->signals++;
    KSM_LOGI("main", "received %s, shutting down", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    /* Nothing is in flight at this stage: stop the loop at once. */
    uv_stop(&d->loop);
}

static void log_device(ksm_device *dev, ksm_allocator *a)
{
    size_t free_b = 0, total_b = 0;
    ksm_device_mem_info(dev, &free_b, &total_b);
    struct ksm_mem_stats st;
    ksm_alloc_get_stats(a, &st);
    KSM_LOGI("main", "device %s: %.1f GiB total, %.1f GiB free, allocator cap %s",
             ksm_device_name(dev), (double)total_b / (1u << 30), (double)free_b / (1u << 30),
             st.memory_cap_bytes ? "set" : "none");
}

static int add_allocators(struct daemon *d, ksm_backend *b)
{
    struct ksm_alloc_config cfg = {.memory_cap = d->opts.memory_cap};
    for (int i = 0; i < ksm_backend_device_count(b); i++) {
        ksm_device *dev = ksm_backend_device(b, i);
        if (d->n_alloc == (int)(sizeof d->alloc / sizeof d->alloc[0])) {
            KSM_LOGW("main", "more than %d devices: %s and later ones are not used", d->n_alloc,
                     ksm_device_name(dev));
            return 0;
        }
        int rc = ksm_allocator_new(dev, &cfg, &d->alloc[d->n_alloc]);
        if (rc != 0) {
            KSM_LOGE("main", "allocator for %s: %s", ksm_device_name(dev), ksm_strerror(rc));
            return rc;
        }
        log_device(dev, d->alloc[d->n_alloc]);
        d->n_alloc++;
    }
    return 0;
}

static void close_walk_cb(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

int main(int argc, char **argv)
{
    static struct daemon d;
    int prc = parse_args(argc, argv, &d.opts);
    if (prc == 1) return 0;
    if (prc != 0) return 2;
    ksm_log_set_level(d.opts.log_level);
    if (d.opts.log_file != NULL) {
        int rc = ksm_log_open_file(d.opts.log_file);
        if (rc != 0) {
            fprintf(stderr, "kasminad: option --log-file: cannot open '%s': %s\n", d.opts.log_file,
                    ksm_strerror(rc));
            return 2;
        }
    }
    KSM_LOGI("main", "kasminad %s starting (pid %d)", KSM_VERSION, (int)getpid());

    int rc = 0;
    if (d.opts.use_cuda) {
        char why[512];
        rc = ksm_cuda_backend_load(NULL, &d.cuda, why, sizeof why);
        if (rc != 0) {
            KSM_LOGW("main", "CUDA backend unavailable (%s): %s; falling back to the CPU backend",
                     ksm_err_name(rc), why);
            d.cuda = NULL;
        } else {
            KSM_LOGI("main", "CUDA backend loaded: %d device(s)", ksm_backend_device_count(d.cuda));
        }
    } else {
        KSM_LOGI("main", "CUDA backend disabled (--no-cuda); using the CPU backend");
    }
    rc = ksm_cpu_backend_new(d.opts.cpu_devices, &d.cpu);
    if (rc != 0) {
        KSM_LOGE("main", "CPU backend: %s", ksm_strerror(rc));
        goto out_free_cuda;
    }
    d.primary = d.cuda != NULL ? d.cuda : d.cpu;
    KSM_LOGI("main", "primary backend: %s", ksm_backend_name(d.primary));
    if (d.cuda != NULL && (rc = add_allocators(&d, d.cuda)) != 0) goto out_free_allocators;
    if ((rc = add_allocators(&d, d.cpu)) != 0) goto out_free_allocators;

    uv_loop_init(&d.loop);
    uv_signal_t *sigs[] = {&d.sig_term, &d.sig_int, &d.sig_hup};
    int signums[] = {SIGTERM, SIGINT, SIGHUP};
    for (int i = 0; i < 3; i++) {
        uv_signal_init(&d.loop, sigs[i]);
        sigs[i]->data = &d;
        uv_signal_start(sigs[i], on_signal, signums[i]);
    }
    KSM_LOGI("main", "kasminad ready");
    uv_run(&d.loop, UV_RUN_DEFAULT);

    uv_walk(&d.loop, close_walk_cb, NULL);
    uv_run(&d.loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&d.loop) != 0) KSM_LOGW("main", "event loop closed with live handles");
    KSM_LOGI("main", "kasminad stopped");
    rc = 0;

out_free_allocators:
    for (int i = d.n_alloc - 1; i >= 0; i--) ksm_allocator_free(d.alloc[i]);
    ksm_backend_free(d.cpu);
out_free_cuda:
    ksm_backend_free(d.cuda);
    ksm_log_open_file(NULL);
    return rc == 0 ? 0 : 1;
}
