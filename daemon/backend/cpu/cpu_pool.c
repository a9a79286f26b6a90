/*
 * The CPU backend's compute pool (see cpu_pool.h).
 *
 * One region at a time: the caller publishes a job under the mutex (generation++, open),
 * workers that see the new generation join it, and everybody claims chunks with one atomic
 * counter. The caller then closes the job (late workers no longer join) and waits until every
 * chunk is done and every joined worker has left, so the job's fields are never read by a
 * worker once the caller has returned.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

#include "backend/cpu/cpu_blas.h"
#include "backend/cpu/cpu_pool.h"
#include "kasmina/log.h"

struct pool {
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* a new job is open */
    pthread_cond_t done_cv; /* a worker left a job */
    int nthreads;           /* including the caller */
    atomic_bool busy;       /* a region is running */

    /* The current job: written by the caller under mu while no worker is inside a job. */
    uint64_t generation;
    bool open;
    int active;      /* workers inside the current job */
    int joined;      /* workers that joined the current job (their slots are 1..joined) */
    int max_workers; /* workers allowed to join the current job */
    ksm_cpu_range_fn fn;
    ksm_cpu_slot_fn sfn; /* instead of fn when set */
    void *ctx;
    int64_t n, chunk, nchunks;
    atomic_int_fast64_t next; /* next chunk to claim */
    atomic_int_fast64_t done; /* chunks finished */
};

static struct pool pool;
static atomic_int max_threads = 1 << 20;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void run_chunks(ksm_cpu_range_fn fn, ksm_cpu_slot_fn sfn, int slot, void *ctx, int64_t n,
                       int64_t chunk, int64_t nchunks)
{
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed);
        if (c >= nchunks) return;
        int64_t b = c * chunk, e = b + chunk < n ? b + chunk : n;
        if (sfn)
            sfn(ctx, slot, b, e);
        else
            fn(ctx, b, e);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg)
{
    (void)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (!(pool.open && pool.generation != seen)) pthread_cond_wait(&pool.work_cv, &pool.mu);
        seen = pool.generation;
        if (pool.joined >= pool.max_workers) continue; /* the job has its threads */
        pool.active++;
        const int slot = ++pool.joined;
        ksm_cpu_range_fn fn = pool.fn;
        ksm_cpu_slot_fn sfn = pool.sfn;
        void *ctx = pool.ctx;
        int64_t n = pool.n, chunk = pool.chunk, nchunks = pool.nchunks;
        pthread_mutex_unlock(&pool.mu);

        run_chunks(fn, sfn, slot, ctx, n, chunk, nchunks);

        pthread_mutex_lock(&pool.mu);
        pool.active--;
        pthread_cond_broadcast(&pool.done_cv);
    }
    return NULL;
}

static void pool_init(void)
{
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int n = cores > 0 ? (int)cores : 1;
    const char *env = getenv("KASMINA_CPU_THREADS");
    if (env != NULL && env[0] != '\0') {
        char *end = NULL;
        long v = strtol(env, &end, 10);
        if (end != env && *end == '\0' && v >= 1 && v <= 1024)
            n = (int)v;
        else
            KSM_LOGW("cpu", "KASMINA_CPU_THREADS must be an integer in [1, 1024]; using %d", n);
    }
    /* One threading layer: OpenBLAS runs each sgemm on its caller (our kernels split the work
     * over this pool), so its own threads never compete with ours for the cores. With one
     * thread, the pthreads build of OpenBLAS runs concurrent calls from several threads
     * independently (each with its own buffers); tests/unit/test_cpu_pool.c checks it.
     * (Without OpenBLAS no backend can be created, and nothing calls it.) */
    if (ksm_cpu_blas_load() == 0) ksm_cpu_blas.set_num_threads(1);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work_cv, NULL);
    pthread_cond_init(&pool.done_cv, NULL);
    atomic_init(&pool.busy, false);
    atomic_init(&pool.next, 0);
    atomic_init(&pool.done, 0);
    pool.nthreads = 1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 1; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker_main, NULL) != 0) {
            KSM_LOGW("cpu", "compute pool: only %d of %d threads could be started", pool.nthreads,
                     n);
            break;
        }
        pool.nthreads++;
    }
    pthread_attr_destroy(&attr);
}

int ksm_cpu_pool_threads(void)
{
    pthread_once(&pool_once, pool_init);
    return pool.nthreads;
}

int ksm_cpu_pool_set_max_threads(int n) { return atomic_exchange(&max_threads, n < 1 ? 1 : n); }

static void parallel_region(int64_t n, int64_t grain, int max_slots, ksm_cpu_range_fn fn,
                            ksm_cpu_slot_fn sfn, void *ctx)
{
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int threads = ksm_cpu_pool_threads();
    int limit = atomic_load(&max_threads);
    if (limit < threads) threads = limit;
    if (max_slots < threads) threads = max_slots;
    bool expected = false;
    if (threads <= 1 || n <= grain ||
        !atomic_compare_exchange_strong(&pool.busy, &expected, true)) {
        if (sfn)
            sfn(ctx, 0, 0, n);
        else
            fn(ctx, 0, n);
        return;
    }
    /* About four chunks per thread for balance, none smaller than grain. */
    int64_t chunk = (n + (int64_t)threads * 4 - 1) / ((int64_t)threads * 4);
    if (chunk < grain) chunk = grain;
    int64_t nchunks = (n + chunk - 1) / chunk;

    pthread_mutex_lock(&pool.mu);
    pool.fn = fn;
    pool.sfn = sfn;
    pool.ctx = ctx;
    pool.joined = 0;
    pool.n = n;
    pool.chunk = chunk;
    pool.nchunks = nchunks;
    pool.max_workers = threads - 1;
    atomic_store_explicit(&pool.next, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    pool.generation++;
    pool.open = true;
    pthread_cond_broadcast(&pool.work_cv);
    pthread_mutex_unlock(&pool.mu);

    run_chunks(fn, sfn, 0, ctx, n, chunk, nchunks);

    pthread_mutex_lock(&pool.mu);
    pool.open = false;
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks || pool.active > 0)
        pthread_cond_wait(&pool.done_cv, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    atomic_store(&pool.busy, false);
}

void ksm_cpu_parallel_for(int64_t n, int64_t grain, ksm_cpu_range_fn fn, void *ctx)
{
    parallel_region(n, grain, 1 << 30, fn, NULL, ctx);
}

void ksm_cpu_parallel_for_slots(int64_t n, int64_t grain, int max_slots, ksm_cpu_slot_fn fn,
                                void *ctx)
{
    parallel_region(n, grain, max_slots < 1 ? 1 : max_slots, NULL, fn, ctx);
}
