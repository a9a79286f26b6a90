/*
 * kasminad: the kasmina daemon.
 *
 * Reads its configuration (kasminad config: file, KASMINA_* environment, flags), starts the engine
 * (the CUDA backend plugin if it can, else the CPU backend, with one log line saying why),
 * optionally creates the demo model, serves kasmina.v1 and grpc.health.v1 over gRPC (rpc/server)
 * and waits on a libuv loop for signals:
 *   SIGTERM/SIGINT  health NOT_SERVING, new calls UNAVAILABLE, calls in flight finish until
 *                   drain-timeout, then the rest are cancelled and kasminad exits 0;
 *   a second one    exits at once (status 1);
 *   SIGHUP          reopens the log file.
 * Under systemd (Type=notify) it sends READY=1 once it accepts calls, STOPPING=1 at drain start
 * and WATCHDOG=1 every WATCHDOG_USEC/2 (notify/notify.h; no-ops without libsystemd).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"
#include "io/persist.h"
#include "service/service.h"
#ifdef KSM_WITH_FAULTS
#include "faults.h"
#endif
#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kasmina/log.h"
#include "metrics/metrics.h"
#include "notify/notify.h"
#include "rpc/server.h"

#ifndef KSM_VERSION
#define KSM_VERSION "0.0.0"
#endif

struct daemon {
    struct ksm_config cfg;
    ksm_engine *engine;
    ksm_rpc_server *rpc;
    ksm_persist *persist;
    ksm_service *service;
    ksm_backend *fault_cpu, *fault_backend; /* kasminad_faults only */
    ksm_metrics *metrics;                   /* NULL unless --metrics-listen */
    uv_loop_t loop;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t drain_timer, health_timer, watchdog_timer;
    uint64_t drain_deadline_ms;
    bool device_failed;
    int signals;
};

static void on_drain_tick(uv_timer_t *t)
{
    struct daemon *d = t->data;
    int n = ksm_rpc_server_inflight(d->rpc);
    if (n == 0) {
        KSM_LOGI("main", "drained: no call in flight");
        uv_stop(&d->loop);
    } else if (uv_now(&d->loop) >= d->drain_deadline_ms) {
        KSM_LOGW("main", "drain timeout: cancelling %d call(s) still in flight", n);
        uv_stop(&d->loop);
    }
}

/* A device that reported an asynchronous error makes the daemon NOT_SERVING (health Check and
 * Watch); lifecycle state stays readable. */
static void on_health_tick(uv_timer_t *t)
{
    struct daemon *d = t->data;
    char why[256];
    if (!d->device_failed && ksm_engine_health(d->engine, why, sizeof why) != 0) {
        d->device_failed = true;
        KSM_LOGE("main", "health NOT_SERVING: %s", why);
        ksm_rpc_server_set_serving(d->rpc, false);
    }
}

static void on_watchdog_tick(uv_timer_t *t)
{
    (void)t;
    ksm_notify_watchdog();
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
    const char *name = signum == SIGTERM ? "SIGTERM" : "SIGINT";
    if (d->signals++ > 0) {
        KSM_LOGW("main", "received %s again: exiting at once", name);
        _exit(1);
    }
    KSM_LOGI("main", "received %s, shutting down (drain up to %.1f s)", name, d->cfg.drain_timeout);
    ksm_notify_stopping();
    ksm_rpc_server_drain_begin(d->rpc);
    d->drain_deadline_ms = uv_now(&d->loop) + (uint64_t)(d->cfg.drain_timeout * 1000.0);
    uv_timer_start(&d->drain_timer, on_drain_tick, 0, 20);
}

static void log_devices(ksm_engine *e, bool cuda_wanted)
{
    int n = ksm_engine_device_count(e);
    bool have_cuda = false;
    for (int i = 0; i < n; i++) {
        ksm_device *dev = ksm_engine_device(e, i);
        size_t free_b = 0, total_b = 0;
        ksm_device_mem_info(dev, &free_b, &total_b);
        struct ksm_mem_stats st = {0};
        ksm_allocator *a = ksm_engine_allocator(e, dev);
        if (a != NULL) ksm_alloc_get_stats(a, &st);
        if (ksm_device_kind(dev) == KSM_DEVICE_CUDA) have_cuda = true;
        KSM_LOGI("main", "device %s: %.1f GiB total, %.1f GiB free, allocator cap %s",
                 ksm_device_name(dev), (double)total_b / (1u << 30), (double)free_b / (1u << 30),
                 st.memory_cap_bytes ? "set" : "none");
    }
    if (!have_cuda && cuda_wanted)
        KSM_LOGW("main", "no CUDA device: falling back to the CPU backend");
    else if (!cuda_wanted)
        KSM_LOGI("main", "CUDA backend disabled (--no-cuda); using the CPU backend");
    ksm_device *def = ksm_engine_default_device(e);
    KSM_LOGI("main", "primary backend: %s (default device %s)",
             ksm_device_kind(def) == KSM_DEVICE_CUDA ? "cuda" : "cpu", ksm_device_name(def));
}

static int create_demo(ksm_service *svc)
{
    static const char *const slots[] = {"r0c0", "r0c1", "r0c2"};
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN, .slots = slots, .n_slots = 3};
    spec.cnn.pool_layers = -1;
    ksm_model *m = NULL;
    char err[512] = "";
    if (ksm_service_model_get(svc, "demo", &m, NULL, 0) == 0) { /* restored from the state dir */
        ksm_model_unref(m);
        return 0;
    }
    int rc = ksm_service_model_create(svc, "demo", &spec, &m, err, sizeof err);
    if (rc != 0) {
        KSM_LOGE("main", "--demo: cannot create model \"demo\": %s (%s)", err, ksm_err_name(rc));
        return rc;
    }
    ksm_model_unref(m);
    KSM_LOGI("main", "demo model \"demo\" created (CNN host, slots r0c0 r0c1 r0c2)");
    return 0;
}

/* The default listener: $XDG_RUNTIME_DIR/kasmina/kasminad.sock, /run/kasmina/kasminad.sock as
 * root, else /tmp/kasmina-UID/kasminad.sock. */
static char *default_listen(void)
{
    char buf[512];
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (geteuid() == 0 && (xdg == NULL || xdg[0] == '\0'))
        snprintf(buf, sizeof buf, "unix:/run/kasmina/kasminad.sock");
    else if (xdg != NULL && xdg[0] == '/')
        snprintf(buf, sizeof buf, "unix:%s/kasmina/kasminad.sock", xdg);
    else
        snprintf(buf, sizeof buf, "unix:/tmp/kasmina-%d/kasminad.sock", (int)geteuid());
    return strdup(buf);
}

/* The default state directory (docs/weights.md#state-on-disk): $XDG_STATE_HOME/kasmina,
 * /var/lib/kasmina as root, else ~/.local/state/kasmina. */
static char *default_state_dir(void)
{
    char buf[4096];
    const char *xdg = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
    if (xdg != NULL && xdg[0] == '/')
        snprintf(buf, sizeof buf, "%s/kasmina", xdg);
    else if (geteuid() == 0 || home == NULL || home[0] != '/')
        snprintf(buf, sizeof buf, "/var/lib/kasmina");
    else
        snprintf(buf, sizeof buf, "%s/.local/state/kasmina", home);
    return strdup(buf);
}

/* Locks the state directory and restores its models into the engine (before serving). */
static int open_state(struct daemon *d)
{
    if (d->cfg.no_persist) {
        KSM_LOGI("main", "--no-persist: no state is kept on disk");
        return 0;
    }
    if (d->cfg.state_dir == NULL) d->cfg.state_dir = default_state_dir();
    char err[1024] = "";
    struct ksm_persist_config pc = {
        .dir = d->cfg.state_dir,
        .compact_records = (uint32_t)d->cfg.journal_records,
        .compact_bytes = d->cfg.journal_bytes,
        .strict_restore = d->cfg.strict_restore,
    };
    size_t n = 0;
    int rc = ksm_persist_open(&pc, &d->persist, err, sizeof err);
    if (rc == 0) rc = ksm_persist_restore(d->persist, d->engine, &n, err, sizeof err);
    if (rc != 0) {
        KSM_LOGE("main", "state: %s (%s)", err, ksm_err_name(rc));
        fprintf(stderr, "kasminad: %s\n", err);
        return rc;
    }
    size_t nq = 0;
    const struct ksm_persist_quarantine *q = ksm_persist_quarantined(d->persist, &nq);
    KSM_LOGI("main", "state-dir %s: %zu model(s) restored, %zu quarantined", d->cfg.state_dir, n,
             nq);
    for (size_t i = 0; i < nq; i++)
        KSM_LOGW("main",
                 "model %s is quarantined (not served; ListModels reports it): %s; files in %s",
                 q[i].id, q[i].reason, q[i].moved_to);
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
    ksm_rpc_runtime_init();
    int rc = ksm_config_load(&d.cfg, argc, argv, KSM_VERSION);
    if (rc == 1) return 0;
    if (rc != 0) return 2;
    enum ksm_log_level level = KSM_LOG_INFO;
    ksm_log_level_parse(d.cfg.log_level, &level);
    ksm_log_set_level(level);
    enum ksm_log_format format = KSM_LOG_FORMAT_TEXT;
    ksm_log_format_parse(d.cfg.log_format, &format);
    ksm_log_set_format(format);
    if (d.cfg.log_file != NULL && (rc = ksm_log_open_file(d.cfg.log_file)) != 0) {
        fprintf(stderr, "kasminad: option --log-file: cannot open '%s': %s\n", d.cfg.log_file,
                ksm_strerror(rc));
        ksm_config_fini(&d.cfg);
        return 2;
    }
    if (d.cfg.n_listen == 0) d.cfg.listen[d.cfg.n_listen++] = default_listen();
    KSM_LOGI("main", "kasminad %s starting (pid %d)", KSM_VERSION, (int)getpid());

    int exit_code = 1;
    char err[512] = "";
    struct ksm_engine_config ec = {
        .cpu_devices = d.cfg.cpu_devices,
        .enable_cuda = !d.cfg.no_cuda,
        .memory_cap = d.cfg.memory_cap,
        .max_models = (uint32_t)d.cfg.max_models,
        .max_seeds_per_model = (uint32_t)d.cfg.max_seeds_per_model,
    };
    if (d.cfg.fault_injection != NULL && d.cfg.fault_injection[0] != '\0') {
#ifdef KSM_WITH_FAULTS /* kasminad_faults, the test build (tests/helpers/faults.h) */
        rc = ksm_test_faults_new(d.cfg.fault_injection, &d.fault_cpu, &d.fault_backend, err,
                                 sizeof err);
        if (rc != 0) {
            fprintf(stderr, "kasminad: option --fault-injection: %s\n", err);
            goto out_config;
        }
        ec.backend = d.fault_backend;
#else
        fprintf(stderr, "kasminad: option --fault-injection is for the test build "
                        "(kasminad_faults); this kasminad injects no faults\n");
        rc = KSM_EINVAL;
        goto out_config;
#endif
    }
    rc = ksm_engine_new(&ec, &d.engine, err, sizeof err);
    if (rc != 0) {
        KSM_LOGE("main", "engine: %s (%s)", err, ksm_err_name(rc));
        goto out_config;
    }
    log_devices(d.engine, !d.cfg.no_cuda);
    if (open_state(&d) != 0) goto out_engine;
    struct ksm_service_config sc = {
        .engine = d.engine,
        .persist = d.persist,
        .event_ring = d.cfg.event_ring,
        .max_models = (uint32_t)d.cfg.max_models,
        .max_seeds_per_model = (uint32_t)d.cfg.max_seeds_per_model,
        .memory_cap = d.cfg.memory_cap,
        .checkpoint_interval = (uint64_t)d.cfg.checkpoint_interval,
    };
    if ((rc = ksm_service_new(&sc, &d.service)) != 0) {
        KSM_LOGE("main", "service: %s", ksm_strerror(rc));
        goto out_engine;
    }
    if (d.cfg.demo && create_demo(d.service) != 0) goto out_engine;

    struct ksm_rpc_server_config rc_cfg = {
        .listen = (const char *const *)d.cfg.listen,
        .n_listen = d.cfg.n_listen,
        .allow_remote_tcp = d.cfg.allow_remote_tcp,
        .max_message_bytes = d.cfg.max_message_bytes,
        .max_reply_bytes = d.cfg.max_reply_bytes,
        .max_weights_bytes = d.cfg.max_weights_bytes,
        .allow_compressed_requests = d.cfg.allow_compressed_requests,
        .workers = d.cfg.workers,
        .max_concurrent_calls = d.cfg.max_concurrent_calls,
        .subscriber_buffer = d.cfg.subscriber_buffer,
        .version = KSM_VERSION,
        .socket_group = d.cfg.socket_group,
        .tls_cert_file = d.cfg.tls_cert,
        .tls_key_file = d.cfg.tls_key,
        .tls_client_ca_file = d.cfg.tls_client_ca,
        .token_file = d.cfg.token_file,
        .max_batch_rows = (uint32_t)d.cfg.max_batch_rows,
        .max_sequence_length = (uint32_t)d.cfg.max_sequence_length,
        .max_queued_per_stream = (uint32_t)d.cfg.max_queued_per_stream,
    };
    rc = ksm_rpc_server_start(d.service, &rc_cfg, &d.rpc, err, sizeof err);
    if (rc != 0) {
        KSM_LOGE("main", "%s", err);
        fprintf(stderr, "kasminad: %s\n", err);
        goto out_engine;
    }

    uv_loop_init(&d.loop);
    uv_signal_t *sigs[] = {&d.sig_term, &d.sig_int, &d.sig_hup};
    int signums[] = {SIGTERM, SIGINT, SIGHUP};
    for (int i = 0; i < 3; i++) {
        uv_signal_init(&d.loop, sigs[i]);
        sigs[i]->data = &d;
        uv_signal_start(sigs[i], on_signal, signums[i]);
    }
    uv_timer_init(&d.loop, &d.drain_timer);
    d.drain_timer.data = &d;
    uv_timer_init(&d.loop, &d.health_timer);
    d.health_timer.data = &d;
    uv_timer_start(&d.health_timer, on_health_tick, 250, 250);
    uint64_t wd_usec = ksm_notify_watchdog_usec();
    uv_timer_init(&d.loop, &d.watchdog_timer);
    if (wd_usec > 0) {
        uint64_t every_ms = wd_usec / 2000 > 0 ? wd_usec / 2000 : 1;
        uv_timer_start(&d.watchdog_timer, on_watchdog_tick, 0, every_ms);
        KSM_LOGI("main", "systemd watchdog: WATCHDOG=1 every %llu ms",
                 (unsigned long long)every_ms);
    }
    if (d.cfg.metrics_listen != NULL) {
        struct ksm_metrics_config mc = {.listen = d.cfg.metrics_listen,
                                        .allow_remote = d.cfg.metrics_allow_remote,
                                        .version = KSM_VERSION};
        rc = ksm_metrics_start(&d.loop, d.engine, d.rpc, &mc, &d.metrics, err, sizeof err);
        if (rc != 0) {
            KSM_LOGE("main", "%s", err);
            fprintf(stderr, "kasminad: %s\n", err);
        }
    }
    if (rc == 0) {
        KSM_LOGI("main", "kasminad ready");
        ksm_notify_ready("serving");
        uv_run(&d.loop, UV_RUN_DEFAULT);
    }

    ksm_metrics_stop(d.metrics);
    ksm_rpc_server_free(d.rpc);
    uv_walk(&d.loop, close_walk_cb, NULL);
    uv_run(&d.loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&d.loop) != 0) KSM_LOGW("main", "event loop closed with live handles");
    exit_code = rc == 0 ? 0 : 1;

out_engine:
    ksm_service_free(d.service);
    ksm_engine_free(d.engine);
    ksm_backend_free(d.fault_backend); /* after the engine, before the backend it wraps */
    ksm_backend_free(d.fault_cpu);
    ksm_persist_close(d.persist);
    if (exit_code == 0) KSM_LOGI("main", "kasminad stopped");
out_config:
    ksm_config_fini(&d.cfg);
    ksm_log_open_file(NULL);
    return exit_code;
}
