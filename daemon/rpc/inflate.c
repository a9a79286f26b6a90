/*
 * rpc/inflate: compressed requests, inflated by kasminad itself.
 *
 * gRPC's own decompression filter inflates a whole message before anything else looks at it: a
 * 0.6 MB gzip frame of zeros became 629 MB in memory before the size limit or the bearer token
 * was checked. The server therefore turns that filter off (grpc.per_message_decompression = 0)
 * and receives the payload still compressed (grpc_byte_buffer data.raw.compression set). Such a
 * payload is refused (UNIMPLEMENTED naming allow-compressed-requests) unless that option is set;
 * then, after the call was authorised, it is inflated here with zlib into slices of its own, and
 * the inflation stops as soon as it would pass the cap (max-message-bytes: RESOURCE_EXHAUSTED).
 * grpc_byte_buffer_reader_init must never see a compressed buffer: it inflates without a limit.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <zlib.h>

#include "kasmina/errors.h"
#include "rpc/server_impl.h"

#define CHUNK ((size_t)1 << 20) /* output slice size */

/* Output slices are mapped pages of their own, not malloc'd: freed, they go back to the system at
 * once, where a worker's malloc arena would keep up to the cap of every bomb it inflated. */
static void unmap(void *p, size_t len) { munmap(p, len); }

static bool new_chunk(size_t len, grpc_slice *out)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    *out = grpc_slice_new_with_len(p, len, unmap);
    return true;
}

bool rpc_payload_compressed(const struct rpc_call *c)
{
    return c->payload != NULL && c->payload->data.raw.compression != GRPC_COMPRESS_NONE;
}

/* Inflates the compressed slices of in into *out (a new raw byte buffer); at most cap bytes. */
static int inflate_capped(grpc_byte_buffer *in, bool gzip, size_t cap, grpc_byte_buffer **out,
                          char *why, size_t whylen)
{
    z_stream z;
    memset(&z, 0, sizeof z);
    /* As gRPC writes them: "gzip" is RFC 1952, "deflate" the zlib format of RFC 1950. */
    if (inflateInit2(&z, 15 | (gzip ? 16 : 0)) != Z_OK) {
        snprintf(why, whylen, "The request could not be inflated: out of host memory.");
        return KSM_ENOMEM;
    }
    grpc_slice_buffer *sb = &in->data.raw.slice_buffer;
    size_t n_out = 0, cap_out = 0, total = 0;
    grpc_slice *outs = NULL;
    int rc = 0, zr = Z_OK;
    for (size_t i = 0; i < sb->count && zr != Z_STREAM_END && rc == 0; i++) {
        z.next_in = GRPC_SLICE_START_PTR(sb->slices[i]);
        z.avail_in = (uInt)GRPC_SLICE_LENGTH(sb->slices[i]);
        while (rc == 0 && (z.avail_in > 0 || z.avail_out == 0) && zr != Z_STREAM_END) {
            if (z.avail_out == 0) {
                if (total >= cap) { /* full, and the stream is not over: it inflates further */
                    rc = KSM_ELIMIT;
                    break;
                }
                if (n_out == cap_out) {
                    cap_out = cap_out ? 2 * cap_out : 16;
                    grpc_slice *no = realloc(outs, cap_out * sizeof *no);
                    if (no == NULL) {
                        rc = KSM_ENOMEM;
                        break;
                    }
                    outs = no;
                }
                /* One byte more than the cap's remainder: filling it proves the overflow. */
                size_t want = cap - total + 1 < CHUNK ? cap - total + 1 : CHUNK;
                if (!new_chunk(want, &outs[n_out])) {
                    rc = KSM_ENOMEM;
                    break;
                }
                z.next_out = GRPC_SLICE_START_PTR(outs[n_out]);
                z.avail_out = (uInt)want;
                n_out++;
            }
            size_t before = z.avail_out;
            zr = inflate(&z, Z_NO_FLUSH);
            total += before - z.avail_out;
            if (total > cap)
                rc = KSM_ELIMIT;
            else if (zr == Z_MEM_ERROR)
                rc = KSM_ENOMEM;
            else if (zr != Z_OK && zr != Z_STREAM_END && zr != Z_BUF_ERROR)
                rc = KSM_EINVAL;
            else if (zr == Z_BUF_ERROR && z.avail_in > 0 && z.avail_out > 0)
                rc = KSM_EINVAL;
        }
    }
    if (rc == 0 && zr != Z_STREAM_END) rc = KSM_EINVAL; /* truncated */
    if (rc == 0 && z.avail_in > 0) rc = KSM_EINVAL;     /* bytes after the end of the stream */
    inflateEnd(&z);
    if (rc == 0) {
        /* Trim the last slice to what was written. */
        if (n_out > 0) {
            size_t used = GRPC_SLICE_LENGTH(outs[n_out - 1]) - z.avail_out;
            grpc_slice t = grpc_slice_sub(outs[n_out - 1], 0, used);
            grpc_slice_unref(outs[n_out - 1]);
            outs[n_out - 1] = t;
        }
        *out = grpc_raw_byte_buffer_create(outs, n_out);
        if (*out == NULL) rc = KSM_ENOMEM;
    }
    for (size_t i = 0; i < n_out; i++) grpc_slice_unref(outs[i]);
    free(outs);
    switch (rc) {
    case 0: break;
    case KSM_ELIMIT: break; /* the caller names the limit */
    case KSM_ENOMEM:
        snprintf(why, whylen, "The request could not be inflated: out of host memory.");
        break;
    default:
        snprintf(why, whylen, "The request's %s data is corrupt or truncated.",
                 gzip ? "gzip" : "deflate");
        rc = KSM_EINVAL;
        break;
    }
    return rc;
}

int rpc_payload_inflate(ksm_rpc_server *s, struct rpc_call *c, size_t cap, char *why, size_t whylen)
{
    if (!rpc_payload_compressed(c)) return 0;
    grpc_compression_algorithm alg = c->payload->data.raw.compression;
    if (!s->cfg.allow_compressed_requests) {
        snprintf(why, whylen,
                 "Compressed requests are refused: send it uncompressed, or start kasminad with "
                 "--allow-compressed-requests.");
        return KSM_ENOSYS;
    }
    if (alg != GRPC_COMPRESS_GZIP && alg != GRPC_COMPRESS_DEFLATE) {
        snprintf(why, whylen,
                 "The request's compression (algorithm %d) is not supported; use "
                 "gzip or deflate.",
                 (int)alg);
        return KSM_ENOSYS;
    }
    grpc_byte_buffer *plain = NULL;
    size_t max = s->cfg.max_message_bytes;
    int rc = inflate_capped(c->payload, alg == GRPC_COMPRESS_GZIP, cap < max ? cap : max, &plain,
                            why, whylen);
    if (rc == KSM_ELIMIT && cap < max)
        snprintf(why, whylen,
                 "The compressed request inflates to more than %zu bytes, the most a %s request "
                 "may (max-message-bytes = %zu).",
                 cap, c->m != NULL ? c->m->path : "", max);
    else if (rc == KSM_ELIMIT)
        snprintf(why, whylen,
                 "The compressed request inflates to more than %zu bytes; max-message-bytes = "
                 "%zu.",
                 max, max);
    if (rc != 0) return rc;
    grpc_byte_buffer_destroy(c->payload);
    c->payload = plain;
    return 0;
}
