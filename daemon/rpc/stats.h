/*
 * rpc/stats: what the metrics exporter reads from the gRPC server. Counters are relaxed atomics
 * bumped once per call where its status is sent (rpc_call_finish) and once per lifecycle event
 * in the engine's event sink; reading them never takes a lock.
 *
 * Includes no gRPC or protobuf-c header (daemon/metrics/ uses it).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/kasmina.h"
#include "rpc/server.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KSM_RPC_CODES           17 /* grpc_status_code 0 (OK) .. 16 (UNAUTHENTICATED) */
#define KSM_RPC_LATENCY_BUCKETS 16 /* finite upper bounds; one more bucket counts +Inf */
#define KSM_RPC_STATS_METHODS   48 /* table rows counted; the last counts unknown methods */

/* Upper bounds of the latency buckets, in seconds, ascending (100 us .. 10 s). */
extern const double ksm_rpc_latency_bounds[KSM_RPC_LATENCY_BUCKETS];

struct ksm_rpc_method_stats {
    char service[48]; /* "kasmina.v1.Kasmina", "grpc.health.v1.Health", "" (unknown methods) */
    char method[48];  /* "Forward", "Check", "unknown" */
    bool streaming;   /* a server stream: counted, not timed */
    uint64_t calls[KSM_RPC_CODES];                 /* finished calls by status code */
    uint64_t buckets[KSM_RPC_LATENCY_BUCKETS + 1]; /* per bucket (not cumulative); last +Inf */
    uint64_t latency_count, latency_sum_ns;        /* unary calls timed */
};

/* Rows: every method of the table plus one for unknown methods. */
size_t ksm_rpc_server_method_count(const ksm_rpc_server *s);
/* A copy of row i (i < ksm_rpc_server_method_count()). */
void ksm_rpc_server_method_stats(ksm_rpc_server *s, size_t i, struct ksm_rpc_method_stats *out);
/* Lifecycle events seen by the event sink since start, by enum ksm_lifecycle_type. */
void ksm_rpc_server_event_counts(ksm_rpc_server *s, uint64_t out[KSM_EV_COUNT]);
/* The last (at most cap) published lifecycle events, oldest first, with their sequence numbers
 * (seqs may be NULL). Returns how many were copied. */
size_t ksm_rpc_server_recent_events(ksm_rpc_server *s, struct ksm_lifecycle_event *out,
                                    uint64_t *seqs, size_t cap);
/* "OK", "CANCELLED", ... "UNAUTHENTICATED"; "UNKNOWN" outside 0..16. */
const char *ksm_rpc_code_name(int code);

#ifdef __cplusplus
}
#endif
