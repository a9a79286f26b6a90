/*
 * rpc/server: kasmina.v1.Kasmina and grpc.health.v1.Health over gRPC C core.
 *
 *     struct ksm_rpc_server_config cfg = {.listen = addrs, .n_listen = 1, ...};
 *     ksm_rpc_server *s;
 *     ksm_rpc_server_start(service, &cfg, &s, err, sizeof err);  // serving
 *     ...
 *     ksm_rpc_server_drain_begin(s);        // health NOT_SERVING, new calls UNAVAILABLE
 *     while (!ksm_rpc_server_idle(s) && before the drain deadline) wait;
 *     ksm_rpc_server_free(s);               // cancels what remains, joins every thread
 *
 * Threads: one completion-queue thread receives calls and answers the cheap ones itself (health
 * checks, GetServerInfo, GetModel, GetSlotReports, and SetAlpha when no state persists: a brief
 * model lock, no device, no disk); other unary Kasmina calls go to a small worker pool (decode,
 * validate, service or engine call, encode, send) so a long forward never blocks the queue; an
 * event thread feeds WatchEvents and Health/Watch streams from the service's event log, whose
 * listener only signals it: a slow subscriber never slows the engine (it is ended with
 * RESOURCE_EXHAUSTED when it falls more than subscriber_buffer events behind).
 *
 * The layers: rpc translates protobuf to service calls (mutations: durable and published, see
 * service/service.h) and engine calls (reads of a model the service handed out), and KSM_E*
 * codes to gRPC statuses (wire/status.c). It decides nothing the service or the engine decides.
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
struct ksm_service; /* service/service.h */

struct ksm_rpc_server_config {
    const char *const *listen; /* "unix:/path" or "host:port" (TCP); at least one */
    size_t n_listen;
    bool allow_remote_tcp;    /* plaintext on a non-loopback TCP address without TLS (insecure) */
    size_t max_message_bytes; /* largest request accepted (0 = 64 MiB) */
    size_t max_reply_bytes;   /* largest reply built (0 = 64 MiB), rpc/limits.c */
    size_t max_weights_bytes; /* largest blob of a LoadWeightsStream / ExportWeightsStream, and
                               * what all weight streams in flight hold together (0 = 1 GiB),
                               * rpc/weights.c */
    bool allow_compressed_requests; /* inflate gzip/deflate requests (after authentication, at
                                     * most max_message_bytes); false: UNIMPLEMENTED */
    int workers;                    /* worker threads for unary calls (0 = 4) */
    int max_concurrent_calls;       /* unary calls in flight before RESOURCE_EXHAUSTED (0 = 256) */
    size_t subscriber_buffer;       /* events a subscriber may lag before it is ended (0 = 1024) */
    const char *version;            /* ServerInfo.version */
    /* Security (rpc/security.c). A TCP listener on a non-loopback address needs TLS; with TLS
     * configured every TCP listener uses it, Unix sockets stay plaintext (their mode guards
     * them). */
    const char *socket_group;       /* group name or number: sockets 0660 + chgrp, their
                                     * directory 0750; NULL = sockets 0600 in a 0700 directory */
    const char *tls_cert_file;      /* server certificate chain (PEM); with tls_key_file */
    const char *tls_key_file;       /* its private key (PEM) */
    const char *tls_client_ca_file; /* mTLS: require client certificates signed by this CA */
    const char *token_file;         /* bearer token; the file must be private (no group/other
                                     * bits). Every call but grpc.health.v1 then needs
                                     * "authorization: Bearer <token>" or gets UNAUTHENTICATED */
    /* Limits: exceeding one gives RESOURCE_EXHAUSTED naming the option and its value; 0 = none.
     * (The engine's limits -- models, seeds per model, memory -- are the engine's and the
     * service's: ksm_engine_config, ksm_service_config.) */
    uint32_t max_batch_rows;        /* input rows of Forward/FusedForward/Evaluate */
    uint32_t max_sequence_length;   /* T of a transformer input [B, T] */
    uint32_t max_queued_per_stream; /* compute calls queued or running per (model, stream) */
};

/* Reads the token and TLS files, then binds every listener (a Unix socket path gets its
 * directory created 0700, the socket 0600 (0660 and chgrp with socket_group) and
 * a lock file "<path>.lock" held with flock: a second daemon on the same path fails here with
 * KSM_EBUSY and a message naming the path), starts the threads and serves. The service (and its
 * engine) must outlive the server. Returns 0, KSM_EINVAL (bad address), KSM_EBUSY, KSM_EIO or
 * KSM_ENOMEM. */
int ksm_rpc_server_start(struct ksm_service *svc, const struct ksm_rpc_server_config *cfg,
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

/* Process-wide settings of the gRPC runtime for a daemon; call first thing in main(), before any
 * thread starts. Turns abseil's mutex deadlock detection off: Debian builds abseil without
 * NDEBUG, so every absl::Mutex lock taken inside gRPC (several per call) also updates a global
 * lock-order graph under a global lock, a debugging aid that cost about a tenth of a control
 * call's CPU. Harmless when the abseil symbol is not found (another build): nothing changes.
 * Also routes gRPC's own log lines (gpr_log) through kasmina's log, module "grpc". */
void ksm_rpc_runtime_init(void);

#ifdef __cplusplus
}
#endif
