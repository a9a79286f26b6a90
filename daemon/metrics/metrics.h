/*
 * metrics: the opt-in HTTP listener of kasminad (--metrics-listen ADDR), served from the daemon's
 * libuv loop:
 *   GET /metrics       Prometheus text exposition format 0.0.4 (docs/metrics.md lists every family)
 *   GET /status.json   the same state as one JSON document (the status page polls it)
 *   GET /              a self-contained HTML status page (inline CSS and JS, no external assets)
 *
 *     struct ksm_metrics_config mc = {.listen = "127.0.0.1:9464", .version = "0.1.0"};
 *     ksm_metrics *m;
 *     ksm_metrics_start(loop, engine, rpc, &mc, &m, err, sizeof err);   // serving
 *     ...
 *     ksm_metrics_stop(m);   // before the rpc server is freed; handles close on the loop
 *
 * Engine state (device memory, allocator statistics, models, slot reports, cache counters) is
 * sampled on a loop timer (every sample_interval_s) into a snapshot; a request renders that
 * snapshot plus the rpc server's atomic counters, so a scrape never queries a device or takes a
 * model lock, however often it comes.
 */
#pragma once

#include <stddef.h>
#include <uv.h>

#include "kasmina/kasmina.h"
#include "rpc/server.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ksm_metrics ksm_metrics;

struct ksm_metrics_config {
    const char *listen;       /* "host:port", ":port" (= 127.0.0.1:port), "[::1]:port"; port 0 =
                               * any free port (ksm_metrics_port tells which) */
    bool allow_remote;        /* a non-loopback address is refused (KSM_EINVAL) unless set: the
                               * exporter serves model ids and statistics without credentials */
    const char *version;      /* kasmina_build_info{version} */
    const char *commit;       /* kasmina_build_info{commit}; NULL = the configure-time commit */
    double sample_interval_s; /* engine sampling period; 0 = 1 s */
};

/* Binds the listener and starts serving on loop. rpc may be NULL (no rpc/event families). The
 * engine and rpc server must outlive the exporter. Returns 0, KSM_EINVAL (bad address, message
 * in err), KSM_EBUSY (address in use), KSM_EIO or KSM_ENOMEM. */
int ksm_metrics_start(uv_loop_t *loop, ksm_engine *e, ksm_rpc_server *rpc,
                      const struct ksm_metrics_config *cfg, ksm_metrics **out, char *err,
                      size_t errlen);
/* The bound TCP port. */
int ksm_metrics_port(const ksm_metrics *m);
/* Stops the HTTP daemon (open connections are closed) and closes the loop handles; the memory
 * goes in their close callbacks, so the loop must run once more (as kasminad's shutdown walk
 * does). NULL is a no-op. */
void ksm_metrics_stop(ksm_metrics *m);

#ifdef __cplusplus
}
#endif
