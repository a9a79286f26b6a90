/*
 * safetensors reader and writer (https://github.com/huggingface/safetensors format):
 *
 *     u64 little-endian N | N bytes of JSON header | data
 *
 * The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
 * relative to the start of the data section) plus an optional "__metadata__" object of string
 * values. Supported dtypes: F32, F16, BF16, I64, I32.
 *
 * The reader validates everything before it returns a file: the header length against the file
 * size, the JSON (parsed with jansson), every dtype, that every shape's byte size equals its
 * offsets' span, that offsets are in range and that no two tensors overlap. Failures return
 * KSM_EFORMAT (or KSM_EDTYPE for an unknown dtype, -errno for I/O) and one sentence in errbuf.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "kasmina/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ksm_st_file ksm_st_file;

/* A tensor of a file (host memory). data points into the file's buffer: valid until
 * ksm_st_close(). data may be unaligned: copy it before typed access. */
struct ksm_st_tensor {
    const char *name;
    enum ksm_dtype dtype;
    int ndim;
    int64_t shape[KSM_MAX_DIMS];
    const void *data;
    size_t nbytes;
};

/* Reads and validates path. errbuf may be NULL. */
int ksm_st_open(const char *path, ksm_st_file **out, char *errbuf, size_t errlen);
/* Parses a file image in memory; the bytes are copied, buf may be freed afterwards. */
int ksm_st_parse(const void *buf, size_t len, ksm_st_file **out, char *errbuf, size_t errlen);
/* NULL is a no-op. */
void ksm_st_close(ksm_st_file *f);

size_t ksm_st_count(const ksm_st_file *f);
/* Tensors in data-offset order. NULL when i is out of range. */
const struct ksm_st_tensor *ksm_st_get(const ksm_st_file *f, size_t i);
/* NULL when there is no tensor of that name. */
const struct ksm_st_tensor *ksm_st_find(const ksm_st_file *f, const char *name);
/* A "__metadata__" value, or NULL. */
const char *ksm_st_metadata(const ksm_st_file *f, const char *key);
/* The i-th "__metadata__" key in byte order, or NULL past the last one. */
const char *ksm_st_metadata_key(const ksm_st_file *f, size_t i);

/* Writes tensors (host memory, nbytes each = numel * dtype size) and optional metadata (n_meta
 * key/value pairs, meta[2i] the key and meta[2i+1] the value) to path atomically: a temporary
 * file in the same directory, fsync, rename, fsync of the directory. Names must be unique and
 * non-empty. Returns 0, KSM_EINVAL or -errno. */
int ksm_st_write(const char *path, const struct ksm_st_tensor *tensors, size_t n,
                 const char *const *meta, size_t n_meta);
/* Same encoding into a malloc'd buffer (*out, *len; free with free()). */
int ksm_st_serialize(const struct ksm_st_tensor *tensors, size_t n, const char *const *meta,
                     size_t n_meta, void **out, size_t *len);

/* ---- Self-checksum (kasmina state blobs: io/persist snapshots) ----
 *
 * A blob serialised with a __metadata__ entry key = KSM_ST_CRC_PLACEHOLDER can be sealed: the
 * placeholder's 8 characters are replaced in place by the CRC32C (8 lowercase hex digits) of the
 * whole blob as it was with the placeholder. The checksum covers every byte, header and data, so
 * a flipped bit anywhere shows; the blob stays a plain safetensors file. */
#define KSM_ST_CRC_PLACEHOLDER "00000000"

/* Seals buf in place. KSM_EINVAL when buf has no (or more than one) "key":"00000000" entry in
 * its header. */
int ksm_st_crc32c_seal(void *buf, size_t len, const char *key);
/* Checks a sealed blob. 0 when the checksum matches; KSM_ENOENT when the header has no such key
 * (a blob from a writer that did not seal it); KSM_EFORMAT when it does not match or is malformed
 * (*stored and *actual, each may be NULL, receive the two values; 0 when not parsed). */
int ksm_st_crc32c_check(const void *buf, size_t len, const char *key, uint32_t *stored,
                        uint32_t *actual);

#ifdef __cplusplus
}
#endif
