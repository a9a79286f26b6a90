/*
 * libkasmina-client: a synchronous C client for kasminad (kasmina.v1 over gRPC).
 *
 * The API hides gRPC and protobuf-c: arguments and results are the engine's plain structs
 * (kasmina.h) where they exist, so a program can move between the embedded engine and the daemon
 * with few changes.
 *
 *     ksm_client *c;
 *     struct ksm_client_error e;
 *     if (ksm_client_connect("unix:/run/kasmina/kasminad.sock", NULL, &c, &e) != 0)
 *         fprintf(stderr, "%s\n", e.message);
 *     struct ksm_slot_report r;
 *     struct ksm_germinate_args g = {.blueprint_id = "conv_light"};
 *     int rc = ksm_client_germinate(c, "m1", "r0c1", &g, &r, &e);
 *     if (rc == KSM_ESTAGE) ... // e.message is the server's sentence, e.grpc_status 9
 *     ksm_client_close(c);
 *
 * Conventions:
 * - Every call returns 0 or a negative KSM_E* code. The server sends the code's name with its
 *   status (trailing metadata "kasmina-error"), so the code is the one the engine returned; when
 *   it does not (a transport failure, a status made by gRPC itself), the code is derived from
 *   the gRPC status (ksm_client_code_from_grpc): DEADLINE_EXCEEDED gives KSM_ETIMEDOUT,
 *   UNAVAILABLE KSM_ENOTREADY, CANCELLED KSM_ECANCELED, UNIMPLEMENTED KSM_ENOSYS, NOT_FOUND
 *   KSM_ENOMODEL, FAILED_PRECONDITION KSM_ESTAGE, INVALID_ARGUMENT KSM_EINVAL, ...
 * - The last argument of every call, struct ksm_client_error *err, may be NULL. On failure it
 *   receives the code, the gRPC status and the server's one-sentence message; on success it is
 *   reset (code 0, grpc_status 0, empty message).
 * - Every unary call has a deadline: the client's default (ksm_client_options.deadline_ms) or
 *   the one set with ksm_client_set_deadline(). An expired deadline gives KSM_ETIMEDOUT.
 * - A client may be used from several threads at once; each call is independent.
 * - Results that own memory have a _free function; _free on a zeroed struct does nothing.
 *   Tensors in results are host tensors (dev NULL) whose data is malloc'd: ksm_host_tensor_free.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kasmina/training.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ksm_client ksm_client;

/* ---- Connection ---- */

#define KSM_CLIENT_DEFAULT_DEADLINE_MS 30000u
#define KSM_CLIENT_DEFAULT_MAX_MESSAGE (64u << 20)

struct ksm_client_options {
    uint32_t deadline_ms;     /* default per-call deadline; 0 = KSM_CLIENT_DEFAULT_DEADLINE_MS */
    const char *bearer_token; /* sent as "authorization: Bearer <token>"; NULL = none */
    size_t max_message_bytes; /* largest message sent or received; 0 = 64 MiB */
    bool wait_for_ready;      /* wait (up to the deadline) for the server to come up instead of
                               * failing at once with KSM_ENOTREADY */
    /* TLS (PEM files). tls false = insecure channel, for unix sockets and loopback. */
    bool tls;
    const char *tls_ca_file;   /* NULL = gRPC's default roots */
    const char *tls_cert_file; /* client certificate for mTLS (with tls_key_file); NULL = none */
    const char *tls_key_file;
};

struct ksm_client_error {
    int code;          /* KSM_E*, equal to the call's return value */
    int grpc_status;   /* grpc_status_code; 0 = OK */
    char message[512]; /* the server's status message, or a local sentence */
    /* On success: the server's warnings about the request (trailing metadata "kasmina-warning",
     * docs/logging.md#warnings), one per line; empty when there were none. */
    char warnings[1024];
};

/* target: "unix:/path/to.sock", "unix:///path", "host:port" or "dns:///host:port". opts may be
 * NULL (defaults). Creates the channel; it does not contact the server (the first call does).
 * *out is freed with ksm_client_close(). Returns 0, KSM_EINVAL (bad target or options),
 * -errno (an unreadable TLS file) or KSM_ENOMEM. Thread-safe. */
int ksm_client_connect(const char *target, const struct ksm_client_options *opts, ksm_client **out,
                       struct ksm_client_error *err);
/* Closes the channel. No call may be in flight. NULL is a no-op. */
void ksm_client_close(ksm_client *c);
/* Changes the default deadline of later unary calls (0 = the connect-time default). */
void ksm_client_set_deadline(ksm_client *c, uint32_t deadline_ms);
const char *ksm_client_target(const ksm_client *c);

/* The daemon's default listen address: unix:$XDG_RUNTIME_DIR/kasmina/kasminad.sock, or
 * unix:/run/kasmina/kasminad.sock for root or without XDG_RUNTIME_DIR. Writes into buf. */
const char *ksm_client_default_target(char *buf, size_t len);

/* gRPC status -> KSM_E* as described above (for callers that only have a status code), and
 * KSM_E* -> the gRPC status the server sends for it. Both are the server's status table. */
int ksm_client_code_from_grpc(int grpc_status);
int ksm_client_grpc_from_code(int code);
/* "OK", "INVALID_ARGUMENT", ... ("UNKNOWN" for values outside the enum). */
const char *ksm_client_grpc_status_name(int grpc_status);

/* ---- Server ---- */

struct ksm_client_device {
    char name[32]; /* "cpu:0", "cuda:0" */
    char kind[16]; /* "cpu" | "cuda" */
    char description[160];
    uint64_t total_bytes, memory_cap_bytes;
};

struct ksm_client_server_info {
    char name[32];
    char version[32];
    bool ready;
    char **extensions; /* malloc'd strings */
    size_t n_extensions;
    struct ksm_client_device *devices;
    size_t n_devices;
    char **cnn_blueprints;
    size_t n_cnn_blueprints;
    char **transformer_blueprints;
    size_t n_transformer_blueprints;
};
void ksm_client_server_info_free(struct ksm_client_server_info *info);

int ksm_client_server_info(ksm_client *c, struct ksm_client_server_info *out,
                           struct ksm_client_error *err);

enum ksm_health_status {
    KSM_HEALTH_UNKNOWN = 0,
    KSM_HEALTH_SERVING = 1,
    KSM_HEALTH_NOT_SERVING = 2,
    KSM_HEALTH_SERVICE_UNKNOWN = 3
};
/* grpc.health.v1.Health/Check. service NULL/"" = the whole server, "kasmina.v1.Kasmina" the
 * service. */
int ksm_client_health(ksm_client *c, const char *service, enum ksm_health_status *out,
                      struct ksm_client_error *err);
const char *ksm_health_status_name(enum ksm_health_status s); /* "SERVING", ... */

/* ---- Models ---- */

/* id NULL/"" = the server assigns one. spec as for ksm_engine_model_create. */
int ksm_client_model_create(ksm_client *c, const char *model_id, const struct ksm_model_spec *spec,
                            struct ksm_model_info *out, struct ksm_client_error *err);
int ksm_client_model_get(ksm_client *c, const char *model_id, struct ksm_model_info *out,
                         struct ksm_client_error *err);
/* *out is a malloc'd array of *n models in creation order: free(*out). */
int ksm_client_model_list(ksm_client *c, struct ksm_model_info **out, size_t *n,
                          struct ksm_client_error *err);
/* freed_bytes may be NULL. */
int ksm_client_model_delete(ksm_client *c, const char *model_id, uint64_t *freed_bytes,
                            struct ksm_client_error *err);
/* A safetensors blob (esper state_dict names). r may be NULL. Streams when the blob is large
 * (as ksm_client_load_weights_ex with KSM_CLIENT_STREAM_AUTO). */
int ksm_client_load_weights(ksm_client *c, const char *model_id, const void *buf, size_t len,
                            bool strict, struct ksm_load_result *r, struct ksm_client_error *err);
/* *buf is malloc'd. Streams when the blob is large (KSM_CLIENT_STREAM_AUTO). */
int ksm_client_export_weights(ksm_client *c, const char *model_id, void **buf, size_t *len,
                              struct ksm_client_error *err);

/* How weights travel: the unary LoadWeights / ExportWeights carry the whole blob in one message,
 * bounded by the daemon's max-message-bytes / max-reply-bytes and the client's
 * max_message_bytes (64 MiB each by default); LoadWeightsStream / ExportWeightsStream move any
 * size in CRC-32-checked chunks (the daemon's max-weights-bytes bounds them, 1 GiB by default).
 * AUTO: a load streams when the request would not fit the client's limit, and retries streamed
 * when the daemon refuses it for its size; an export streams (its size is known only once the
 * daemon exported), unary with a daemon that lacks ExportWeightsStream. */
enum ksm_client_stream_mode {
    KSM_CLIENT_STREAM_AUTO = 0,
    KSM_CLIENT_STREAM_NEVER,  /* the unary call only */
    KSM_CLIENT_STREAM_ALWAYS, /* the streaming call only */
};

struct ksm_client_weights_options {
    enum ksm_client_stream_mode stream;
    /* Export: n_slots > 0 exports only these slots' tensors and extra state, plus the host's
     * tensors when include_host (esper's Governor snapshots); 0 exports everything. */
    const char *const *slots;
    size_t n_slots;
    bool include_host;
    size_t chunk_bytes; /* data bytes per chunk of either stream; 0 = 2 MiB (less when the
                         * client's max_message_bytes is smaller) */
    /* Streams: called after each chunk with the bytes moved so far and the total; a non-zero
     * return cancels the call (nothing is loaded) and becomes the return value (use a positive
     * value to tell it from an error). NULL = none. */
    int (*progress)(void *ud, uint64_t done, uint64_t total);
    void *progress_ud;
};

/* o may be NULL (AUTO, everything). Same results as ksm_client_load_weights /
 * ksm_client_export_weights. A streamed load whose chunk fails its checksum on the way gives
 * KSM_EBADMSG (DATA_LOSS); one whose stream ends early or is cancelled changes nothing. */
int ksm_client_load_weights_ex(ksm_client *c, const char *model_id, const void *buf, size_t len,
                               bool strict, const struct ksm_client_weights_options *o,
                               struct ksm_load_result *r, struct ksm_client_error *err);
int ksm_client_export_weights_ex(ksm_client *c, const char *model_id,
                                 const struct ksm_client_weights_options *o, void **buf,
                                 size_t *len, struct ksm_client_error *err);
/* device NULL/"" = keep; dtype -1 = keep. out may be NULL. */
int ksm_client_model_move(ksm_client *c, const char *model_id, const char *device, int dtype,
                          struct ksm_model_info *out, struct ksm_client_error *err);

/* ---- Seed lifecycle. report / gate may be NULL where they are outputs. ---- */

int ksm_client_germinate(ksm_client *c, const char *model_id, const char *slot_id,
                         const struct ksm_germinate_args *a, struct ksm_slot_report *report,
                         struct ksm_client_error *err);
int ksm_client_advance(ksm_client *c, const char *model_id, const char *slot_id,
                       enum ksm_stage target, struct ksm_gate_result *gate,
                       struct ksm_slot_report *report, struct ksm_client_error *err);
/* reason/initiator NULL = "" (the server's defaults). */
int ksm_client_prune(ksm_client *c, const char *model_id, const char *slot_id, const char *reason,
                     const char *initiator, bool *accepted, struct ksm_slot_report *report,
                     struct ksm_client_error *err);
int ksm_client_schedule_prune(ksm_client *c, const char *model_id, const char *slot_id,
                              uint32_t steps, enum ksm_alpha_curve curve, bool has_steepness,
                              double steepness, const char *reason, const char *initiator,
                              bool *accepted, struct ksm_slot_report *report,
                              struct ksm_client_error *err);
int ksm_client_set_alpha_target(ksm_client *c, const char *model_id, const char *slot_id,
                                double alpha_target, uint32_t steps, enum ksm_alpha_curve curve,
                                bool has_steepness, double steepness,
                                enum ksm_alpha_algorithm algorithm, bool *accepted,
                                struct ksm_slot_report *report, struct ksm_client_error *err);
int ksm_client_set_alpha(ksm_client *c, const char *model_id, const char *slot_id, double alpha,
                         struct ksm_slot_report *report, struct ksm_client_error *err);
/* slot_id NULL/"" = every slot. reports (cap entries, may be NULL) receive the ticked slots'
 * reports; *n (may be NULL) the number the server sent. */
int ksm_client_step_epoch(ksm_client *c, const char *model_id, const char *slot_id,
                          struct ksm_slot_report *reports, size_t cap, size_t *n,
                          struct ksm_client_error *err);
int ksm_client_record_metrics(ksm_client *c, const char *model_id, const char *slot_id,
                              const struct ksm_metrics_update *u, struct ksm_slot_report *report,
                              struct ksm_client_error *err);
/* ConfigureSlot: per-slot settings (isolate_gradients, auto_forward_gates; unset ones keep their
 * value). slot_id NULL/"" = every slot. reports (cap entries, may be NULL) receive the configured
 * slots' reports; *n (may be NULL) the number the server sent. */
int ksm_client_configure_slot(ksm_client *c, const char *model_id, const char *slot_id,
                              const struct ksm_slot_settings *s, struct ksm_slot_report *reports,
                              size_t cap, size_t *n, struct ksm_client_error *err);
/* slot_id NULL/"" = every slot, row-major. */
int ksm_client_slot_reports(ksm_client *c, const char *model_id, const char *slot_id,
                            struct ksm_slot_report *reports, size_t cap, size_t *n,
                            struct ksm_client_error *err);

/* WatchEvents. cb receives each event with its sequence number, in emission order, on the
 * calling thread; a non-zero return ends the stream and becomes the return value of
 * ksm_client_watch_events (use a positive value to tell it from an error). model_id NULL/"" = all
 * models. idle_ms > 0 ends the stream (return 0) once no event has arrived for idle_ms
 * milliseconds; 0 waits forever. A stream the server ends returns its status (0 for OK). The
 * stream has no deadline. */
typedef int (*ksm_client_event_cb)(void *ud, uint64_t sequence,
                                   const struct ksm_lifecycle_event *ev);
int ksm_client_watch_events(ksm_client *c, const char *model_id, uint64_t after_sequence,
                            uint32_t idle_ms, ksm_client_event_cb cb, void *ud,
                            struct ksm_client_error *err);

/* ---- Compute ---- */

/* Forward when a->n_overrides == 0 and !a->fused, FusedForward otherwise. a->input is a host
 * tensor (contiguous). r->output is malloc'd (ksm_host_tensor_free). */
int ksm_client_forward(ksm_client *c, const char *model_id, const struct ksm_forward_args *a,
                       struct ksm_forward_result *r, struct ksm_client_error *err);
/* a->shapley is not available over the wire (KSM_EINVAL); a->attribution is
 * (docs/evaluate.md#attribution). r: ksm_evaluate_result_free. */
int ksm_client_evaluate(ksm_client *c, const char *model_id, const struct ksm_evaluate_args *a,
                        struct ksm_evaluate_result *r, struct ksm_client_error *err);

/* ---- Training (docs/training.md) ---- */

/* ConfigureTraining: cfg NULL reads the configuration in force (and reset_optimizer_state may
 * still drop the momentum buffers); else every field of cfg is sent. *out (may be NULL) receives
 * the configuration now in force, *train_step (may be NULL) the steps applied. */
int ksm_client_configure_training(ksm_client *c, const char *model_id,
                                  const struct ksm_training_config *cfg, bool reset_optimizer_state,
                                  struct ksm_training_config *out, uint64_t *train_step,
                                  struct ksm_client_error *err);
/* One TrainStep: a->input and a->targets (I64) are host tensors (contiguous). */
int ksm_client_train_step(ksm_client *c, const char *model_id, const struct ksm_train_args *a,
                          struct ksm_train_result *r, struct ksm_client_error *err);

/* A model's entry of a Checkpoint reply: the train_step now durable. */
struct ksm_client_checkpoint {
    char model_id[KSM_ID_MAX + 1];
    uint64_t train_step;
};
/* Checkpoint: makes the training progress of model_id (NULL/"" = every model) durable (weights,
 * BatchNorm buffers, momentum buffers, train_step). *out is malloc'd (free(*out)), one entry per
 * model checkpointed, *n of them. FAILED_PRECONDITION (KSM_ESTAGE) from a daemon run with
 * --no-persist. */
int ksm_client_checkpoint(ksm_client *c, const char *model_id, struct ksm_client_checkpoint **out,
                          size_t *n, struct ksm_client_error *err);

/* ---- Statistics ---- */

struct ksm_client_model_bytes {
    char model_id[KSM_ID_MAX + 1];
    uint64_t bytes;
};

struct ksm_client_device_memory {
    char device[32];
    struct ksm_mem_stats stats;
    struct ksm_client_model_bytes *per_model; /* malloc'd */
    size_t n_per_model;
};

struct ksm_client_memory_stats {
    struct ksm_client_device_memory *devices; /* malloc'd */
    size_t n;
};
void ksm_client_memory_stats_free(struct ksm_client_memory_stats *s);

/* device NULL/"" = every device. */
int ksm_client_memory_stats(ksm_client *c, const char *device, struct ksm_client_memory_stats *out,
                            struct ksm_client_error *err);
/* Releases cached unused device blocks; out (may be NULL) receives the stats afterwards. */
int ksm_client_empty_cache(ksm_client *c, const char *device, struct ksm_client_memory_stats *out,
                           struct ksm_client_error *err);

struct ksm_client_cache_counters {
    char model_id[KSM_ID_MAX + 1];
    struct ksm_cache_counters c;
};
/* model_id NULL/"" = every model. *out is malloc'd: free(*out). */
int ksm_client_cache_stats(ksm_client *c, const char *model_id,
                           struct ksm_client_cache_counters **out, size_t *n,
                           struct ksm_client_error *err);

#ifdef __cplusplus
}
#endif
