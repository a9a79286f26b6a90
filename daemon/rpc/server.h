/*
 * rpc/server: kasmina.v1.Kasmina and grpc.health.v1.Health over gRPC C core.
 *
 *     struct ksm_rpc_server_config cfg = {.listen = addrs, .n_listen = 1, ...};
 *     ksm_rpc_server *s;
 *     ksm_rpc_server_start(engine, &cfg, &s, err, sizeof err);   // serving
 *     ...
 *     ksm_rpc_server_drain_begin(s);        // health NOT_SERVING, new calls UNAVAILABLE
 *     while (!ksm_rpc_server_idle(s) && before the drain deadline) wait;
 *     ksm_rpc_server_free(s);               // cancels what remains, joins every thread
 *
 * Threads: one completion-queue thread receives calls and decodes nothing heavier than a
 * health check; unary Kasmina calls go to a small worker pool (decode, validate, engine call,
 * encode, send) so a long forward never blocks the queue; an event thread feeds WatchEvents and
 * Health/Watch streams from the event hub. The engine's event sink only copies the event into
 * the hub's ring and signals: a slow subscriber never slows the engine (it is ended with
 * RESOURCE_EXHAUSTED when it falls more than subscriber_buffer events behind).
 *
 * Only daemon/rpc/ includes gRPC or protobuf-c headers; this one includes neither.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/kasmina.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ksm_rpc_server ksm_rpc_server;
struct ksm_persist; /* io/persist.h */

struct ksm_rpc_server_config {
    const char *const *listen; /* "unix:/path" or "host:port" (TCP); at least one */
    size_t n_listen;
    bool allow_remote_tcp;       /* accept a non-loopback TCP address (no TLS yet) */
    size_t max_message_bytes;    /* largest request accepted (0 = 64 MiB) */
    int workers;                 /* worker threads for unary calls (0 = 4) */
    int max_concurrent_calls;    /* unary calls in flight before RESOURCE_EXHAUSTED (0 = 256) */
    size_t event_ring;           /* events kept for WatchEvents resume (0 = 4096) */
    size_t subscriber_buffer;    /* events a subscriber may lag before it is ended (0 = 1024) */
    const char *version;         /* ServerInfo.version */
    struct ksm_persist *persist; /* NULL: no state on disk; else every mutation is journalled
                                  * before its reply (borrowed, outlives the server) */
};

/* Binds every listener (a Unix socket path gets its directory created 0700, the socket 0600 and
 * a lock file "<path>.lock" held with flock: a second daemon on the same path fails here with
 * KSM_EBUSY and a message naming the path), starts the threads and serves. The engine must
 * outlive the server. Returns 0, KSM_EINVAL (bad address), KSM_EBUSY, KSM_EIO or KSM_ENOMEM. */
int ksm_rpc_server_start(ksm_engine *e, const struct ksm_rpc_server_config *cfg,
                         ksm_rpc_server **out, char *err, size_t errlen);

/* Health as reported by grpc.health.v1 (SERVING / NOT_SERVING); Watch streams see changes. */
void ksm_rpc_server_set_serving(ksm_rpc_server *s, bool serving);

/* Starts draining: health NOT_SERVING, new Kasmina calls get UNAVAILABLE, calls in flight run
 * to completion. Thread-safe, idempotent. */
void ksm_rpc_server_drain_begin(ksm_rpc_server *s);
/* Unary calls in flight (queued or running). */
int ksm_rpc_server_inflight(ksm_rpc_server *s);

/* Stops the server: cancels every call still open (streams included), waits for running engine
 * calls to return, joins the threads, unlinks the Unix sockets and releases the locks. NULL is a
 * no-op. */
void ksm_rpc_server_free(ksm_rpc_server *s);

#ifdef __cplusplus
}
#endif
