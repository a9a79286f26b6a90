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

#include "grpc/health/v1/health.pb-c.h"
#include "kasmina/kasmina.h"
#include "kasmina/v1/kasmina.pb-c.h"
#include "rpc/convert.h"
#include "rpc/server.h"

/* A completion-queue tag: every event calls done(tag, ok) on the CQ thread. */
struct rpc_tag {
    void (*done)(struct rpc_tag *t, bool ok);
};

enum rpc_kind { RPC_UNARY, RPC_EVENTS, RPC_HEALTH_CHECK, RPC_HEALTH_WATCH, RPC_UNKNOWN };

/* Per-call scratch for a handler: the reply's arena, the error sentence and deferred frees of
 * engine-allocated results the reply borrows from. */
struct rpc_ctx {
    struct ksm_pb_arena arena;
    char err[256];
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
    /* reply */
    grpc_byte_buffer *reply;
    grpc_slice status_details;
    bool have_details;
    grpc_metadata trailing;
    struct rpc_call *next; /* worker queue / subscriber list */
    /* streams (events.c), protected by the hub lock */
    bool writing, finishing, listed, started, end_pending;
    uint64_t next_seq, subscribed_at;
    char model_filter[KSM_ID_MAX + 1];
    int health_sent;   /* last status sent on a Health/Watch, -1 none */
    bool health_known; /* the watched service exists */
};

struct rpc_hub; /* events.c */

struct ksm_rpc_server {
    ksm_engine *engine;
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
    atomic_int inflight;   /* unary calls accepted and not yet answered */
    atomic_int live_calls; /* rpc_call structs alive */
    pthread_mutex_t lock;  /* worker queue, live-call wait */
    pthread_cond_t cond;
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
};

/* server.c */
void rpc_call_unref(struct rpc_call *c);
/* Sends status (with message and, on error, the kasmina-error trailing metadata) and optionally
 * a reply; the batch's completion drops the handling reference. Sends initial metadata unless the
 * stream already did. */
void rpc_call_finish(struct rpc_call *c, const ProtobufCMessage *reply, int err, const char *errmsg,
                     grpc_status_code code_override);
/* Packs msg into a byte buffer (NULL on OOM). */
grpc_byte_buffer *rpc_pack(const ProtobufCMessage *msg);
bool rpc_deadline_passed(const struct rpc_call *c);

/* calls.c */
extern struct rpc_method rpc_methods[];
extern const size_t rpc_n_methods;

/* events.c */
int rpc_hub_new(ksm_rpc_server *s, struct rpc_hub **out);
void rpc_hub_free(struct rpc_hub *h); /* after every stream has ended */
void rpc_hub_engine_event(void *ud, const struct ksm_lifecycle_event *ev);
/* A new WatchEvents / Health.Watch call (CQ thread): takes over the handling reference. */
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
