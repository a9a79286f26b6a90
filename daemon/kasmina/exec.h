/*
 * Execution context of one forward: the stream it enqueues on and a bump arena for every
 * temporary (activations, scratch). Forward code in host.c and blueprint.c is straight-line C
 * that allocates temporaries from the arena and enqueues ops with KSM_EXEC().
 *
 * A model runs each forward twice the first time it sees an input shape on a stream: once in
 * measure mode (nothing is enqueued, data pointers are fake, only the arena's high-water mark
 * is tallied), then for real on an arena of exactly that size, which the plan keeps. Every later
 * forward at that shape reuses the arena: no device allocation in steady state.
 *
 * ksm_exec_mark()/ksm_exec_release() free temporaries stack-wise; reuse is safe because the ops
 * on one stream run in order.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "kasmina/backend.h"
#include "kasmina/tensor.h"

#define KSM_EXEC_ALIGN 64

struct ksm_exec {
    ksm_stream *stream;
    ksm_device *dev;
    bool measure; /* sizing pass: enqueue nothing */
    char *base;   /* arena (NULL in measure mode) */
    size_t cap;   /* arena bytes (ignored in measure mode) */
    size_t off;   /* next free byte */
    size_t high;  /* high-water mark of off */
    /* Where ksm_host_forward_from() writes its logits instead of its arena tensor (ignored in
     * measure mode, so the plan's arena is the same either way), or NULL. Set by a forward on
     * a host-memory device to the caller's output buffer: the result needs no copy. */
    void *logits_dst;
};

/* Initialises e. base/cap: the arena (base NULL and measure true for a sizing pass). */
void ksm_exec_init(struct ksm_exec *e, ksm_stream *s, bool measure, void *base, size_t cap);

/* A contiguous temporary of the given shape from the arena. KSM_EDEVMEM when the arena is too
 * small (a plan sized for another shape: a bug), KSM_EINVAL for a bad shape. */
int ksm_exec_tensor(struct ksm_exec *e, ksm_tensor *t, enum ksm_dtype dtype, int ndim,
                    const int64_t *shape);
/* Raw scratch bytes (conv2d workspace); *out NULL when bytes is 0. */
int ksm_exec_scratch(struct ksm_exec *e, size_t bytes, void **out);

static inline size_t ksm_exec_mark(const struct ksm_exec *e) { return e->off; }
static inline void ksm_exec_release(struct ksm_exec *e, size_t mark) { e->off = mark; }

/* Enqueue an op unless measuring; return its error from the enclosing function. */
#define KSM_EXEC(e, call)                                                                          \
    do {                                                                                           \
        if (!(e)->measure) {                                                                       \
            int ksm_exec_rc_ = (call);                                                             \
            if (ksm_exec_rc_ < 0) return ksm_exec_rc_;                                             \
        }                                                                                          \
    } while (0)
