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

#ifdef __cplusplus
}
#endif
