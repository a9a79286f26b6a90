/*
 * wire/pbgather: protobuf-c unpack of a message that arrives in pieces (the slices of a gRPC byte
 * buffer), copying each big bytes field once, straight from the pieces into a buffer of its own.
 *
 * The plain way costs two copies of every tensor of a request or reply: the pieces are gathered
 * into one contiguous buffer (grpc_byte_buffer_reader_readall), then protobuf-c copies each bytes
 * field out of it into an allocation of its own. Here a first pass walks the wire format over the
 * pieces, following the message descriptors, and finds the length-delimited bytes fields of at
 * least `big` bytes; the second pass copies the rest of the message (small: ids, shapes, scalars)
 * into a contiguous buffer in which those fields are empty (their length, and the lengths of the
 * messages around them, rewritten in place with the same number of varint bytes), and each big
 * field's payload into a 64-byte-aligned malloc'd buffer. protobuf-c unpacks the small buffer;
 * the big buffers are then attached to their fields, where protobuf_c_message_free_unpacked(m,
 * NULL) frees them like any other bytes field (free()).
 *
 * Only unambiguous places are rewritten: a bytes field that is not repeated and not in a oneof,
 * inside messages reached through fields that are not in a oneof and that occur once (or are
 * repeated: the n-th occurrence is the n-th element). Anything else -- a singular field seen twice
 * (protobuf merges or overrides), a group, malformed input, more than a few big fields -- takes
 * the plain way, so the result is always what protobuf_c_message_unpack of the concatenated
 * pieces gives, aligned data aside.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One contiguous piece of a serialized message. */
struct ksm_pb_piece {
    const uint8_t *data;
    size_t len;
};

/* The threshold the server and the client use: below it, a copy costs less than the walk. */
#define KSM_PB_GATHER_MIN ((size_t)64 << 10)

/* Unpacks the message of type d serialized across pieces p[0..n) (in order; empty pieces are
 * allowed). Bytes fields of at least big bytes (big 0 = never) are copied once, into 64-byte
 * aligned buffers the message owns; *n_direct (may be NULL) = how many were. Returns the message
 * (free with protobuf_c_message_free_unpacked(m, NULL)) or NULL where protobuf_c_message_unpack
 * would fail (malformed input) or memory runs out. */
ProtobufCMessage *ksm_pb_unpack_pieces(const ProtobufCMessageDescriptor *d,
                                       const struct ksm_pb_piece *p, size_t n, size_t big,
                                       size_t *n_direct);

/* Every string field of the message of type d serialized across p[0..n) (nested messages,
 * repeated fields and map entries included) is strict UTF-8 without NUL (kasmina/text.h).
 * protobuf-c checks neither: it would hand "x\xff" to the engine, which stores it and later
 * sends it in replies and events no typed client can decode, and it cuts "a\0b" to "a". Returns
 * 0, or KSM_EINVAL with one sentence naming the field ("overrides[1].slot_id is not valid UTF-8
 * (byte 3)."). Malformed wire input returns 0: the unpack that follows refuses it. */
int ksm_pb_check_text(const ProtobufCMessageDescriptor *d, const struct ksm_pb_piece *p, size_t n,
                      char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
