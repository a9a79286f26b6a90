/* Execution context: bump arena for the temporaries of one forward (exec.h). */
#include "kasmina/exec.h"

#include <stdint.h>

#include "kasmina/errors.h"

void ksm_exec_init(struct ksm_exec *e, ksm_stream *s, bool measure, void *base, size_t cap)
{
    e->stream = s;
    e->dev = s ? ksm_stream_device(s) : NULL;
    e->measure = measure;
    e->base = measure ? NULL : base;
    e->cap = measure ? SIZE_MAX : cap;
    e->off = 0;
    e->high = 0;
    e->logits_dst = NULL;
}

static int exec_take(struct ksm_exec *e, size_t bytes, void **out)
{
    size_t off = (e->off + KSM_EXEC_ALIGN - 1) & ~(size_t)(KSM_EXEC_ALIGN - 1);
    if (bytes > SIZE_MAX - off - KSM_EXEC_ALIGN) return KSM_EINVAL;
    size_t end = off + ((bytes + KSM_EXEC_ALIGN - 1) & ~(size_t)(KSM_EXEC_ALIGN - 1));
    if (!e->measure && end > e->cap) return KSM_EDEVMEM;
    /* In measure mode hand out distinct, aligned, never-dereferenced addresses. */
    *out = e->measure ? (void *)(uintptr_t)(KSM_EXEC_ALIGN + off) : e->base + off;
    e->off = end;
    if (end > e->high) e->high = end;
    return 0;
}

int ksm_exec_tensor(struct ksm_exec *e, ksm_tensor *t, enum ksm_dtype dtype, int ndim,
                    const int64_t *shape)
{
    int rc = ksm_tensor_init(t, e->dev, NULL, dtype, ndim, shape);
    if (rc < 0) return rc;
    void *p;
    rc = exec_take(e, ksm_tensor_nbytes(t), &p);
    if (rc < 0) return rc;
    t->data = p;
    return 0;
}

int ksm_exec_scratch(struct ksm_exec *e, size_t bytes, void **out)
{
    *out = NULL;
    if (bytes == 0) return 0;
    return exec_take(e, bytes, out);
}
