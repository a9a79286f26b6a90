/*
 * kasmina tensors.
 *
 * A ksm_tensor is a small value type: a typed, shaped, strided view on device memory. It owns
 * no memory; buffers come from the caching allocator (alloc.h) and outlive the views on them.
 * Shapes and strides count elements (not bytes); strides may be 0 to broadcast a dimension.
 * Layout follows PyTorch: CNN activations are NCHW, transformer activations [B, T, D].
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KSM_MAX_DIMS 6

typedef struct ksm_device ksm_device;

enum ksm_dtype {
    KSM_DTYPE_F32 = 0,
    KSM_DTYPE_F16 = 1,
    KSM_DTYPE_BF16 = 2,
    KSM_DTYPE_I64 = 3,
    KSM_DTYPE_I32 = 4,
    KSM_DTYPE_COUNT
};

typedef struct ksm_tensor {
    void *data;      /* first element, on dev (already offset into its buffer) */
    ksm_device *dev; /* where data lives; NULL for host memory in tests and io */
    enum ksm_dtype dtype;
    int ndim; /* 0..KSM_MAX_DIMS; 0 = scalar */
    int64_t shape[KSM_MAX_DIMS];
    int64_t stride[KSM_MAX_DIMS]; /* in elements */
} ksm_tensor;

/* Bytes per element of dtype (0 for an invalid dtype). */
size_t ksm_dtype_size(enum ksm_dtype dtype);

/* "F32", "F16", "BF16", "I64", "I32" (safetensors spelling); NULL for an invalid dtype. */
const char *ksm_dtype_name(enum ksm_dtype dtype);

/* Parses a safetensors dtype string. Returns 0 or KSM_EDTYPE. */
int ksm_dtype_parse(const char *s, enum ksm_dtype *out);

/* Initialises *t as a contiguous (row-major) view of data. Validates ndim, dims >= 0, dtype
 * and that the element count does not overflow. Returns 0 or KSM_EINVAL/KSM_EOVERFLOW. */
int ksm_tensor_init(ksm_tensor *t, ksm_device *dev, void *data, enum ksm_dtype dtype, int ndim,
                    const int64_t *shape);

/* Number of elements (product of shape; 1 for a scalar). */
int64_t ksm_tensor_numel(const ksm_tensor *t);

/* Bytes spanned by a contiguous tensor of this shape (numel * dtype size). */
size_t ksm_tensor_nbytes(const ksm_tensor *t);

/* True when the strides are the row-major strides of the shape (size-1 dims ignored). */
bool ksm_tensor_is_contiguous(const ksm_tensor *t);

/* True when shapes (and ndim) are equal. */
bool ksm_tensor_same_shape(const ksm_tensor *a, const ksm_tensor *b);

/* Views. They only rewrite shape/stride/data of *out; no memory is touched.
 * reshape requires a contiguous tensor and the same element count.
 * permute reorders dimensions (perm is a permutation of 0..ndim-1).
 * narrow keeps [start, start+len) of dimension dim.
 * expand broadcasts size-1 dimensions to shape (stride 0); ndim may grow on the left.
 * All return 0, KSM_EINVAL or KSM_ESHAPE. */
int ksm_tensor_reshape(ksm_tensor *out, const ksm_tensor *t, int ndim, const int64_t *shape);
int ksm_tensor_permute(ksm_tensor *out, const ksm_tensor *t, const int *perm);
int ksm_tensor_narrow(ksm_tensor *out, const ksm_tensor *t, int dim, int64_t start, int64_t len);
int ksm_tensor_expand(ksm_tensor *out, const ksm_tensor *t, int ndim, const int64_t *shape);

/* Formats "F32[2,3,4]" into buf (for error messages and logs). Returns buf. */
char *ksm_tensor_describe(const ksm_tensor *t, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
