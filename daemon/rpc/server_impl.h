/*
 * rpc/server internals shared by server.c (completion queue, call state machine, workers,
 * listeners), calls.c (one handler per Kasmina method) and events.c (event hub, WatchEvents,
 * Health/Watch).
 */
#pragma once

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>

#include "grpc/health/v1/health.pb-c.h"
#include "kasmina/kasmina.h"
#include "kasmina/v1/kasmina.pb-c.h"
#include "wire/convert.h"
#include "rpc/server.h"
#include "rpc/stats.h"
#include "rpc/tsan.h"
#include "service/advice.h"
#include "service/service.h"

/* A completion-queue tag: every event calls done(tag, ok) on the CQ thread. Whoever gives a tag
 * to gRPC calls KSM_TSAN_RELEASE(tag) just before (rpc/tsan.h); the CQ thread acquires it. */
struct rpc_tag {
    void (*done)(struct rpc_tag *t, bool ok);
};

enum rpc_kind {
    RPC_UNARY,
    RPC_EVENTS,
    RPC_HEALTH_CHECK,
    RPC_HEALTH_WATCH,
    RPC_UNKNOWN,
    RPC_WEIGHTS_EXPORT, /* ExportWeightsStream (rpc/weights.c) */
    RPC_WEIGHTS_LOAD,   /* LoadWeightsStream (rpc/weights.c) */
};
#define RPC_KIND_WEIGHTS(k) ((k) == RPC_WEIGHTS_EXPORT || (k) == RPC_WEIGHTS_LOAD)

/* Per-call scratch for a handler: the reply's arena, the error sentence and deferred frees of
 * engine-allocated results the reply borrows from. */
struct rpc_ctx {
    struct ksm_pb_arena arena;
    char err[256];
    struct ksm_advice advice; /* sent with a successful reply and logged (rpc/calllog.c) */
    int n_defer;
    struct {
        void (*fn)(void *);
        void *p;
    } defer[8];
};
void rpc_defer(struct rpc_ctx *cx, void (*fn)(void *), void *p);

typedef int (*rpc_handler)(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                           ProtobufCMessage **reply);

struct rpc_method {
    const char *path; /* "/kasmina.v1.Kasmina/Forward" */
    enum rpc_kind kind;
    const ProtobufCMessageDescriptor *req;
    rpc_handler fn;
    void *handle; /* grpc_server_register_method */
};

/* One call, from the posted request to the last completion. */
struct rpc_call {
    struct rpc_tag request_tag, close_tag, send_tag;
    ksm_rpc_server *srv;
    struct rpc_method *m; /* NULL for the catch-all */
    grpc_call *gc;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details; /* catch-all only */
    grpc_byte_buffer *payload;
    int cancelled; /* RECV_CLOSE_ON_SERVER */
    atomic_int refs;
    atomic_bool closed; /* the close batch completed: the call is over (finished or cancelled) */
    bool counted;       /* counts in srv->inflight */
    bool close_in_send; /* answered on the CQ thread: the send batch receives the close */
    /* reply */
    grpc_byte_buffer *reply;
    grpc_slice status_details;
    bool have_details;
    grpc_metadata trailing;
    struct ksm_advice advice;              /* the handler's, for a successful reply */
    grpc_metadata warn_md[KSM_ADVICE_MAX]; /* KSM_RPC_WARNING_MD entries (values copied) */
    int n_warn_md;
    struct rpc_call *next; /* worker queue / subscriber list */
    /* streams (events.c), protected by the hub lock */
    bool writing, finishing, listed, started, end_pending;
    uint64_t next_seq, subscribed_at;
    char model_filter[KSM_ID_MAX + 1];
    int health_sent;   /* last status sent on a Health/Watch, -1 none */
    bool health_known; /* the watched service exists */
    int64_t start_ns;  /* CLOCK_MONOTONIC at arrival (rpc/stats) */
    /* weight streams (rpc/weights.c): their state, and the tag of their RECV_MESSAGE */
    struct rpc_wstream *ws;
    struct rpc_tag recv_tag;
};

/* Call and event counters (stats.c), read by the metrics exporter through rpc/stats.h. */
struct rpc_stats {
    atomic_uint_least64_t calls[KSM_RPC_STATS_METHODS][KSM_RPC_CODES];
    atomic_uint_least64_t buckets[KSM_RPC_STATS_METHODS][KSM_RPC_LATENCY_BUCKETS + 1];
    atomic_uint_least64_t latency_sum_ns[KSM_RPC_STATS_METHODS];
    atomic_uint_least64_t events[KSM_EV_COUNT];
};

struct rpc_hub;        /* events.c */
struct rpc_stream_use; /* limits.c */

struct ksm_rpc_server {
    ksm_service *service; /* mutations, the event log */
    bool owns_service;    /* rpc_server_offline_new made it */
    ksm_engine *engine;   /* reads: ksm_service_engine(service) */
    struct ksm_rpc_server_config cfg;
    grpc_server *server;
    grpc_completion_queue *cq;
    pthread_t cq_thread;
    bool cq_started;
    struct rpc_tag shutdown_tag;
    atomic_bool shutdown_seen;
    atomic_bool shutting_down; /* grpc_server_shutdown_and_notify called */
    atomic_bool draining;
    atomic_bool serving;
    atomic_int inflight;      /* unary calls accepted and not yet answered */
    atomic_int live_calls;    /* rpc_call structs alive */
    pthread_mutex_t lock;     /* worker queue, live-call wait */
    pthread_cond_t q_cond;    /* a call was queued, or workers_stop */
    pthread_cond_t idle_cond; /* shutdown_seen, or a call ended while shutting_down */
    struct rpc_call *q_head, *q_tail;
    bool workers_stop;
    int n_workers;
    pthread_t *workers;
    struct rpc_hub *hub;
    /* listeners */
    size_t n_unix;
    char **unix_paths;
    int *lock_fds;
    int64_t started_ns;
    /* security.c: secrets read at start-up (wiped on free) */
    char *token; /* "Bearer"-less token; NULL = no token required */
    size_t token_len;
    char *tls_cert_pem, *tls_key_pem, *tls_ca_pem;
    bool have_gid;
    unsigned sock_gid;
    _Atomic int64_t auth_log_sec;              /* CLOCK_MONOTONIC second + 1 of the last */
    atomic_uint_least64_t auth_log_suppressed; /* refusal line; refusals not logged since */
    /* limits.c */
    pthread_mutex_t limits_lock; /* stream uses */
    struct rpc_stream_use *stream_uses;
    struct rpc_stats stats;
    atomic_size_t weights_bytes;             /* rpc/weights.c: weight streams' blobs in flight */
    bool inline_call[KSM_RPC_STATS_METHODS]; /* by rpc_methods index: runs on the CQ thread */
    /* calllog.c: warn lines of failed calls and warnings, per method (rows as in stats) */
    struct ksm_log_ratelimit warn_log[KSM_RPC_STATS_METHODS];
};

/* server.c */
void rpc_call_unref(struct rpc_call *c);
/* Hands the call to a worker (rpc_weights_run for a weight stream); false once the workers
 * stopped (shutdown): the caller answers the call itself. */
bool rpc_enqueue(ksm_rpc_server *s, struct rpc_call *c);
/* Sends status (with message and, on error, the kasmina-error trailing metadata) and optionally
 * a reply; the batch's completion drops the handling reference. Sends initial metadata unless the
 * stream already did. */
void rpc_call_finish(struct rpc_call *c, const ProtobufCMessage *reply, int err, const char *errmsg,
                     grpc_status_code code_override);
/* Packs msg into a byte buffer (NULL on OOM). */
grpc_byte_buffer *rpc_pack(const ProtobufCMessage *msg);
bool rpc_deadline_passed(const struct rpc_call *c);

/* security.c */
/* Reads the token file and the TLS files named in s->cfg; one line in err naming the option. */
int rpc_security_init(ksm_rpc_server *s, char *err, size_t errlen);
/* listeners.c: binds addr (unix:/path or host:port) to the server, before it starts. */
int rpc_add_listener(ksm_rpc_server *s, const char *addr, char *err, size_t errlen);
void rpc_security_fini(ksm_rpc_server *s);
/* Credentials for a listener: TLS (mTLS with a client CA) for TCP when configured, else
 * insecure. NULL with err set when a non-loopback TCP address has no TLS. */
grpc_server_credentials *rpc_listener_creds(ksm_rpc_server *s, const char *addr, bool tcp,
                                            bool loopback, char *err, size_t errlen);
/* Applies the socket mode (0600, or 0660 + chgrp) to a bound Unix socket and, with a group, to
 * its directory (0750 + chgrp, when the daemon owns it). */
int rpc_socket_secure(ksm_rpc_server *s, const char *path, char *err, size_t errlen);
/* True when the call may proceed: grpc.health.v1 always may; with a token, everything else needs
 * a matching "authorization: Bearer <token>" (compared in constant time). On false the call was
 * answered with UNAUTHENTICATED. */
bool rpc_authorize(ksm_rpc_server *s, struct rpc_call *c);

/* inflate.c: compressed request payloads (gRPC's decompression filter is off, see there). */
/* True when the call's request payload arrived compressed. */
bool rpc_payload_compressed(const struct rpc_call *c);
/* Replaces a compressed c->payload by its inflation, at most min(cap, max-message-bytes) bytes,
 * once the call is authorised. 0 (also for an uncompressed payload), or with one sentence in why:
 * KSM_ENOSYS (allow-compressed-requests is off, or an algorithm other than gzip/deflate),
 * KSM_ELIMIT (it inflates beyond the cap; nothing past the cap was inflated), KSM_EINVAL (corrupt
 * or truncated data), KSM_ENOMEM. */
int rpc_payload_inflate(ksm_rpc_server *s, struct rpc_call *c, size_t cap, char *why,
                        size_t whylen);
/* The cap for requests inflated on the completion-queue thread (health checks, which need no
 * token, and stream requests): a few bytes each when legitimate. */
#define RPC_SMALL_REQUEST_MAX ((size_t)64 << 10)

/* limits.c (each returns 0 or KSM_ELIMIT with one sentence naming the option in cx->err) */
int rpc_limit_input(ksm_rpc_server *s, const ksm_tensor *input, struct rpc_ctx *cx);
/* max-reply-bytes: KSM_ELIMIT when a reply of `bytes` (what: "logits", "weights", ...) is over
 * it. The _logits form predicts a Forward/FusedForward/Evaluate reply from the input's shape and
 * the model's classes (vocab_size x T for a transformer), out_dtype a kasmina.v1 DType, copies
 * the configs whose logits are returned (0: none); the _evaluate form an Evaluate reply (explicit
 * configs counted, the standard set as one); the _export form an ExportWeights reply from the
 * model's parameter count (the host's only when with_host). Call them before the engine runs. */
int rpc_limit_reply(ksm_rpc_server *s, uint64_t bytes, const char *what, struct rpc_ctx *cx);
int rpc_limit_reply_logits(ksm_rpc_server *s, ksm_model *m, const ksm_tensor *input, int out_dtype,
                           size_t copies, struct rpc_ctx *cx);
int rpc_limit_reply_evaluate(ksm_rpc_server *s, ksm_model *m, const struct ksm_evaluate_args *ea,
                             struct rpc_ctx *cx);
int rpc_limit_reply_export(ksm_rpc_server *s, ksm_model *m, bool with_host, struct rpc_ctx *cx);
/* The max-reply-bytes sentence for an ExportWeights reply (it names ExportWeightsStream). */
int rpc_limit_reply_weights(ksm_rpc_server *s, uint64_t bytes, struct rpc_ctx *cx);
/* Counts a compute call on (model, stream) until the reply is sent (deferred release). */
int rpc_limit_stream_enter(ksm_rpc_server *s, const char *model_id, const char *stream,
                           struct rpc_ctx *cx);
void rpc_limits_fini(ksm_rpc_server *s);
/* stats.c: a call arrived / its status is being sent; an engine event was emitted. */
void rpc_stats_call_start(struct rpc_call *c);
void rpc_stats_call_end(struct rpc_call *c, grpc_status_code code);
void rpc_stats_event(ksm_rpc_server *s, const struct ksm_lifecycle_event *ev);
/* calllog.c: the log lines of a call whose status is being sent (docs/logging.md): at debug one
 * line with method, status and latency; at warn a failed call's status and message and the
 * call's advice (rate-limited per method: RPC_WARN_BURST lines, then RPC_WARN_PER_S a second,
 * with a "suppressed N" line); advice of level info at info. msg: the status message sent. */
void rpc_log_call(struct rpc_call *c, grpc_status_code code, int err, const char *msg);
#define RPC_WARN_BURST 10.0
#define RPC_WARN_PER_S 1.0
/* Sends an already packed reply (buf malloc'd, owned from here on; NULL for none). */
void rpc_call_finish_bytes(struct rpc_call *c, uint8_t *buf, size_t len, int err,
                           const char *errmsg, grpc_status_code code_override);
/* Fills the zero fields of cfg with the server's defaults (as ksm_rpc_server_start does). */
void rpc_config_defaults(struct ksm_rpc_server_config *cfg);

/* calls.c */
extern struct rpc_method rpc_methods[];
extern const size_t rpc_n_methods;

/* dispatch.c: one unary call without the network (the workers and the fuzzers use it).
 * Unpacks req as rpc_methods[method_index]'s request, runs its handler and packs the reply
 * into *reply (malloc'd, free(); NULL with *reply_len 0 when the handler gave no message).
 * Returns 0, or a KSM_E* code with one sentence in err (KSM_EINVAL for undecodable bytes,
 * KSM_ENOSYS for an index that is not a unary Kasmina method). */
int rpc_dispatch_bytes(ksm_rpc_server *s, size_t method_index, const uint8_t *req, size_t len,
                       uint8_t **reply, size_t *reply_len, char *err, size_t errlen);
/* The same for a request in pieces (a gRPC byte buffer's slices): tensors and other bytes fields
 * of at least rpc_gather_min bytes are copied once, from the pieces into aligned buffers of their
 * own (wire/pbgather.h), rather than gathered and then copied again by protobuf-c. */
struct ksm_pb_piece;
int rpc_dispatch_pieces(ksm_rpc_server *s, size_t method_index, const struct ksm_pb_piece *req,
                        size_t n, uint8_t **reply, size_t *reply_len, char *err, size_t errlen);
/* rpc_dispatch_pieces that also hands out the handler's advice (service/advice.h) for a call
 * that succeeded (advice may be NULL; it is zeroed first). The server's workers call this. */
int rpc_dispatch_call(ksm_rpc_server *s, size_t method_index, const struct ksm_pb_piece *req,
                      size_t n, uint8_t **reply, size_t *reply_len, struct ksm_advice *advice,
                      char *err, size_t errlen);
/* KSM_PB_GATHER_MIN; the fuzzers lower it to 1 so that every input takes that path. */
extern size_t rpc_gather_min;
/* Index of a method path in rpc_methods, or -1. */
int rpc_method_index(const char *path);
/* A server with no gRPC, no listener and no thread, serving e through rpc_dispatch_bytes only
 * (fuzzers, tests). cfg may be NULL (defaults); its listen addresses are ignored. */
int rpc_server_offline_new(ksm_engine *e, const struct ksm_rpc_server_config *cfg,
                           ksm_rpc_server **out);
void rpc_server_offline_free(ksm_rpc_server *s);

/* weights.c: LoadWeightsStream and ExportWeightsStream. */
/* A worker's turn on the stream: its start, or the chunk just received (c->payload). */
void rpc_weights_run(ksm_rpc_server *s, struct rpc_call *c);
/* A send batch of the stream completed (completion-queue thread): true when the stream went on
 * (the next chunk, or the status, is on its way); false for the status batch, which the caller
 * completes like a unary call's. */
bool rpc_weights_sent(struct rpc_call *c, bool ok);
/* Frees the stream's state and releases its share of max-weights-bytes (call_free). */
void rpc_weights_free(struct rpc_call *c);

/* events.c */
int rpc_hub_new(ksm_rpc_server *s, struct rpc_hub **out);
void rpc_hub_free(struct rpc_hub *h); /* after every stream has ended */
void rpc_hub_watch_events(ksm_rpc_server *s, struct rpc_call *c, const ProtobufCMessage *req);
void rpc_hub_watch_health(ksm_rpc_server *s, struct rpc_call *c, const ProtobufCMessage *req);
/* Completion of a stream's send batch / close batch (CQ thread). */
void rpc_hub_stream_sent(struct rpc_call *c, bool ok);
void rpc_hub_stream_closed(struct rpc_call *c);
/* Health changed, or the server is stopping: wake the event thread. */
void rpc_hub_kick(struct rpc_hub *h);
/* Ends every stream with UNAVAILABLE (shutdown). */
void rpc_hub_end_all(struct rpc_hub *h);
/* Waits until every stream has ended; false after timeout_ms. */
bool rpc_hub_wait_empty(struct rpc_hub *h, int timeout_ms);
uint64_t rpc_hub_last_sequence(struct rpc_hub *h);
/* Health status of a service name: SERVING/NOT_SERVING, or -1 for an unknown service. */
int rpc_health_status(ksm_rpc_server *s, const char *service);
