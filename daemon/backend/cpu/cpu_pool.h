/*
 * The CPU backend's compute threads: one process-wide pool that op kernels use to split work.
 *
 * ksm_cpu_parallel_for(n, grain, fn, ctx) calls fn(ctx, begin, end) over disjoint ranges that
 * cover [0, n) exactly once, on the calling thread and the pool's workers, and returns when all
 * ranges are done. Ranges hold at least grain items (except the last). Only one parallel region
 * runs at a time: a call made while another region is running (from another stream's worker, or
 * nested inside fn) runs serially on its caller, so streams never oversubscribe the machine and
 * never deadlock on the pool.
 *
 * The pool has $KASMINA_CPU_THREADS threads in all (default: the number of online cores;
 * 1 disables it), created on first use. It is the backend's only threading layer: creating it
 * sets OpenBLAS to one thread (openblas_set_num_threads(1)), and the GEMM, linear and
 * convolution kernels split their work into single-threaded sgemm calls run on the pool.
 */
#pragma once

#include <stdint.h>

typedef void (*ksm_cpu_range_fn)(void *ctx, int64_t begin, int64_t end);

void ksm_cpu_parallel_for(int64_t n, int64_t grain, ksm_cpu_range_fn fn, void *ctx);

/* Per-thread scratch: fn(ctx, slot, begin, end) as above, where slot in [0, max_slots) is
 * distinct among the threads running the region at once (one thread's ranges all see the same
 * slot), so each can use its own slice of a workspace. At most max_slots threads take part. */
typedef void (*ksm_cpu_slot_fn)(void *ctx, int slot, int64_t begin, int64_t end);

void ksm_cpu_parallel_for_slots(int64_t n, int64_t grain, int max_slots, ksm_cpu_slot_fn fn,
                                void *ctx);

/* Threads a parallel region may use (the caller included); >= 1. */
int ksm_cpu_pool_threads(void);

/* Limits the threads of later regions to n (>= 1; 1 = serial) without changing the pool;
 * values above the pool's size use the whole pool. Returns the previous limit. For tests (a
 * serial run is the oracle of a parallel one) and for operators sharing a machine. */
int ksm_cpu_pool_set_max_threads(int n);
