/*
 * Internals of libkasmina-client: the gRPC transport (channel.c) shared by the RPC wrappers
 * (calls.c). Only client/lib includes this header.
 */
#pragma once

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include "kasmina/client.h"

struct ksm_client {
    grpc_channel *channel;
    char *target;
    char *authorization; /* "Bearer <token>" or NULL */
    uint32_t connect_deadline_ms;
    _Atomic uint32_t deadline_ms;
    size_t max_message;
    bool wait_for_ready;
};

/* Fills *err (may be NULL) with code, gRPC status and a formatted message; returns code. */
int ksmc_fail(struct ksm_client_error *err, int code, int grpc_status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Resets *err (may be NULL) to success. */
void ksmc_ok(struct ksm_client_error *err);

/* One unary call of method ("/kasmina.v1.Kasmina/Germinate"): packs req, waits for the reply
 * up to the client's deadline and unpacks it with reply_desc into *reply (free with
 * protobuf_c_message_free_unpacked(m, NULL); its bytes fields are malloc'd, so a caller may take
 * one over, leaving the field empty). Returns 0 or the mapped KSM_E* code (err filled). */
int ksmc_unary(ksm_client *c, const char *method, const ProtobufCMessage *req,
               const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
               struct ksm_client_error *err);

/* A server-streaming call: msg_cb is called with each unpacked message (borrowed; freed after
 * the callback returns). A non-zero return cancels the stream and is returned. idle_ms > 0
 * cancels the stream after that long without a message and returns 0. with_deadline: the whole
 * stream has the client's call deadline (else none). */
typedef int (*ksmc_stream_cb)(void *ud, const ProtobufCMessage *msg);
int ksmc_server_stream(ksm_client *c, const char *method, const ProtobufCMessage *req,
                       const ProtobufCMessageDescriptor *reply_desc, uint32_t idle_ms,
                       bool with_deadline, ksmc_stream_cb msg_cb, void *ud,
                       struct ksm_client_error *err);

/* A client-streaming call under the client's deadline: next_cb packs the next request message
 * into *bb (a byte buffer the caller then destroys) and returns 1, or returns 0 after the last,
 * or a non-zero other value, which cancels the call and is returned. The reply is unpacked into
 * *reply as for ksmc_unary. A server that ends the call early (an error status) stops the
 * sending: its status is returned. */
typedef int (*ksmc_next_cb)(void *ud, grpc_byte_buffer **bb);
int ksmc_client_stream(ksm_client *c, const char *method, ksmc_next_cb next_cb, void *ud,
                       const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
                       struct ksm_client_error *err);

/* The unary LoadWeights / ExportWeights (calls.c); weights.c adds the streams and the choice. */
int ksmc_load_weights_unary(ksm_client *c, const char *model_id, const void *buf, size_t len,
                            bool strict, struct ksm_load_result *r, struct ksm_client_error *err);
int ksmc_export_weights_unary(ksm_client *c, const char *model_id, const char *const *slots,
                              size_t n_slots, bool include_host, void **buf, size_t *len,
                              struct ksm_client_error *err);

/* Bounded string copy that always terminates (dst of size n > 0). NULL src gives "". */
void ksmc_strlcpy(char *dst, const char *src, size_t n);
