/* Tensor views: shapes, strides and the dtype table. No memory is touched here. */
#include <stdio.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/tensor.h"

static const struct {
    const char *name;
    size_t size;
} dtype_table[KSM_DTYPE_COUNT] = {
    [KSM_DTYPE_F32] = {"F32", 4}, [KSM_DTYPE_F16] = {"F16", 2}, [KSM_DTYPE_BF16] = {"BF16", 2},
    [KSM_DTYPE_I64] = {"I64", 8}, [KSM_DTYPE_I32] = {"I32", 4},
};

static bool dtype_valid(enum ksm_dtype d) { return (unsigned)d < KSM_DTYPE_COUNT; }

/* A hand-made tensor may carry any ndim: views check it before indexing the arrays. */
static bool ndim_valid(const ksm_tensor *t) { return t->ndim >= 0 && t->ndim <= KSM_MAX_DIMS; }

size_t ksm_dtype_size(enum ksm_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_table[dtype].size : 0;
}

const char *ksm_dtype_name(enum ksm_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_table[dtype].name : NULL;
}

int ksm_dtype_parse(const char *s, enum ksm_dtype *out)
{
    if (s == NULL || out == NULL) return KSM_EINVAL;
    for (int i = 0; i < KSM_DTYPE_COUNT; i++) {
        if (strcmp(s, dtype_table[i].name) == 0) {
            *out = (enum ksm_dtype)i;
            return 0;
        }
    }
    return KSM_EDTYPE;
}

static void contiguous_strides(ksm_tensor *t)
{
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        t->stride[i] = st;
        st *= t->shape[i] > 0 ? t->shape[i] : 1;
    }
}

/* Checks dims >= 0 and that the element count (and its byte size) fits in int64. */
static int check_shape(int ndim, const int64_t *shape, enum ksm_dtype dtype)
{
    if (ndim < 0 || ndim > KSM_MAX_DIMS) return KSM_EINVAL;
    if (ndim > 0 && shape == NULL) return KSM_EINVAL;
    int64_t n = 1;
    const int64_t limit = INT64_MAX / 8;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return KSM_EINVAL;
        if (shape[i] != 0 && n > limit / shape[i]) return KSM_EOVERFLOW;
        n *= shape[i];
    }
    (void)dtype;
    return 0;
}

int ksm_tensor_init(ksm_tensor *t, ksm_device *dev, void *data, enum ksm_dtype dtype, int ndim,
                    const int64_t *shape)
{
    if (t == NULL || !dtype_valid(dtype)) return KSM_EINVAL;
    int rc = check_shape(ndim, shape, dtype);
    if (rc != 0) return rc;
    memset(t, 0, sizeof *t);
    t->data = data;
    t->dev = dev;
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    contiguous_strides(t);
    return 0;
}

int64_t ksm_tensor_numel(const ksm_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

size_t ksm_tensor_nbytes(const ksm_tensor *t)
{
    return (size_t)ksm_tensor_numel(t) * ksm_dtype_size(t->dtype);
}

bool ksm_tensor_is_contiguous(const ksm_tensor *t)
{
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] == 0) return true;
        if (t->shape[i] != 1 && t->stride[i] != st) return false;
        st *= t->shape[i];
    }
    return true;
}

bool ksm_tensor_same_shape(const ksm_tensor *a, const ksm_tensor *b)
{
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return false;
    return true;
}

int ksm_tensor_reshape(ksm_tensor *out, const ksm_tensor *t, int ndim, const int64_t *shape)
{
    if (out == NULL || t == NULL || !ndim_valid(t)) return KSM_EINVAL;
    int rc = check_shape(ndim, shape, t->dtype);
    if (rc != 0) return rc;
    if (!ksm_tensor_is_contiguous(t)) return KSM_EINVAL;
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    if (n != ksm_tensor_numel(t)) return KSM_ESHAPE;
    ksm_tensor r = *t;
    r.ndim = ndim;
    for (int i = 0; i < ndim; i++) r.shape[i] = shape[i];
    for (int i = ndim; i < KSM_MAX_DIMS; i++) r.shape[i] = r.stride[i] = 0;
    contiguous_strides(&r);
    *out = r;
    return 0;
}

int ksm_tensor_permute(ksm_tensor *out, const ksm_tensor *t, const int *perm)
{
    if (out == NULL || t == NULL || !ndim_valid(t) || (t->ndim > 0 && perm == NULL))
        return KSM_EINVAL;
    bool seen[KSM_MAX_DIMS] = {false};
    for (int i = 0; i < t->ndim; i++) {
        if (perm[i] < 0 || perm[i] >= t->ndim || seen[perm[i]]) return KSM_EINVAL;
        seen[perm[i]] = true;
    }
    ksm_tensor r = *t;
    for (int i = 0; i < t->ndim; i++) {
        r.shape[i] = t->shape[perm[i]];
        r.stride[i] = t->stride[perm[i]];
    }
    *out = r;
    return 0;
}

int ksm_tensor_narrow(ksm_tensor *out, const ksm_tensor *t, int dim, int64_t start, int64_t len)
{
    if (out == NULL || t == NULL || !ndim_valid(t) || dim < 0 || dim >= t->ndim) return KSM_EINVAL;
    if (start < 0 || len < 0 || start > t->shape[dim] || len > t->shape[dim] - start)
        return KSM_EINVAL;
    ksm_tensor r = *t;
    if (r.data != NULL && len > 0)
        r.data = (char *)r.data + start * t->stride[dim] * (int64_t)ksm_dtype_size(t->dtype);
    r.shape[dim] = len;
    *out = r;
    return 0;
}

int ksm_tensor_expand(ksm_tensor *out, const ksm_tensor *t, int ndim, const int64_t *shape)
{
    if (out == NULL || t == NULL || !ndim_valid(t) || ndim < t->ndim || ndim > KSM_MAX_DIMS)
        return KSM_EINVAL;
    int rc = check_shape(ndim, shape, t->dtype);
    if (rc != 0) return rc;
    ksm_tensor r = *t;
    int off = ndim - t->ndim;
    for (int i = 0; i < ndim; i++) {
        int j = i - off;
        if (j < 0) {
            r.shape[i] = shape[i];
            r.stride[i] = 0;
        } else if (t->shape[j] == shape[i]) {
            r.shape[i] = shape[i];
            r.stride[i] = t->stride[j];
        } else if (t->shape[j] == 1) {
            r.shape[i] = shape[i];
            r.stride[i] = 0;
        } else {
            return KSM_ESHAPE;
        }
    }
    for (int i = ndim; i < KSM_MAX_DIMS; i++) r.shape[i] = r.stride[i] = 0;
    r.ndim = ndim;
    *out = r;
    return 0;
}

char *ksm_tensor_describe(const ksm_tensor *t, char *buf, size_t len)
{
    if (buf == NULL || len == 0) return buf;
    if (t == NULL || !ndim_valid(t)) {
        snprintf(buf, len, t == NULL ? "(null)" : "(bad ndim)");
        return buf;
    }
    const char *dn = ksm_dtype_name(t->dtype);
    size_t used = (size_t)snprintf(buf, len, "%s[", dn ? dn : "?");
    for (int i = 0; i < t->ndim && used < len; i++)
        used +=
            (size_t)snprintf(buf + used, len - used, i ? ",%lld" : "%lld", (long long)t->shape[i]);
    if (used < len) snprintf(buf + used, len - used, "]");
    return buf;
}
