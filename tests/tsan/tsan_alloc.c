/*
 * The caching allocator under concurrency: threads allocate on their own stream, write through
 * the stream, mark the block used by a neighbour's stream (record_stream; that stream writes it
 * after an event) and hand it over a
 * queue to another thread, which frees it (a cross-stream, deferred free); meanwhile a thread
 * reads the statistics, empties the cache and moves the memory cap.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "tsan_check.h"

#define THREADS 6
#define ROUNDS  300

static ksm_allocator *alloc;
static ksm_stream *streams[THREADS];
static ksm_event *events[THREADS];
static atomic_bool stop;

/* One slot per thread: the pointer a neighbour left for it to free. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static void *handoff[THREADS];

static void *worker(void *p)
{
    int id = *(int *)p;
    ksm_stream *s = streams[id];
    for (int r = 0; r < ROUNDS; r++) {
        size_t size = (size_t)(64 + ((id * 7919 + r * 104729) % 3) * (r % 2 ? 1u << 20 : 700));
        void *ptr = NULL;
        int rc = ksm_alloc_malloc(alloc, size, s, &ptr);
        CHECK(rc == 0 || rc == KSM_EDEVMEM, "malloc %d", rc);
        if (rc != 0) continue;
        CHECK_OK(ksm_stream_memset_async(s, ptr, id, size));
        CHECK_OK(ksm_alloc_record_stream(alloc, ptr, streams[(id + 1) % THREADS]));
        /* The neighbour's stream writes it too, after ours (an event orders the two). */
        CHECK_OK(ksm_event_record(events[id], s));
        CHECK_OK(ksm_stream_wait_event(streams[(id + 1) % THREADS], events[id]));
        CHECK_OK(ksm_stream_memset_async(streams[(id + 1) % THREADS], ptr, id + 1, 16));
        void *mine = NULL;
        pthread_mutex_lock(&mu);
        mine = handoff[id];
        handoff[id] = NULL;
        void *old = handoff[(id + 2) % THREADS];
        handoff[(id + 2) % THREADS] = ptr;
        pthread_mutex_unlock(&mu);
        if (old != NULL) CHECK_OK(ksm_alloc_free(alloc, old));
        if (mine != NULL) CHECK_OK(ksm_alloc_free(alloc, mine));
    }
    return NULL;
}

static void *stats(void *p)
{
    (void)p;
    uint64_t n = 0;
    while (!atomic_load(&stop)) {
        struct ksm_mem_stats st;
        ksm_alloc_get_stats(alloc, &st);
        n += st.num_device_alloc;
        if (n % 7 == 0) CHECK_OK(ksm_alloc_empty_cache(alloc));
        if (n % 5 == 0) CHECK_OK(ksm_alloc_set_memory_cap(alloc, n % 2 ? 0 : 256u << 20));
        ksm_alloc_reset_peak_stats(alloc);
    }
    return NULL;
}

int main(void)
{
    ksm_backend *cpu;
    CHECK_OK(ksm_cpu_backend_new(1, &cpu));
    ksm_device *dev = ksm_backend_device(cpu, 0);
    CHECK_OK(ksm_allocator_new(dev, NULL, &alloc));
    int ids[THREADS];
    for (int i = 0; i < THREADS; i++) {
        ids[i] = i;
        CHECK_OK(ksm_stream_new(dev, &streams[i]));
        CHECK_OK(ksm_event_new(dev, &events[i]));
    }
    pthread_t st;
    CHECK_OK(pthread_create(&st, NULL, stats, NULL));
    run_threads(THREADS, worker, ids, sizeof ids[0]);
    atomic_store(&stop, true);
    CHECK_OK(pthread_join(st, NULL));
    for (int i = 0; i < THREADS; i++)
        if (handoff[i] != NULL) CHECK_OK(ksm_alloc_free(alloc, handoff[i]));
    CHECK_OK(ksm_device_synchronize(dev));
    CHECK_OK(ksm_alloc_empty_cache(alloc));
    struct ksm_mem_stats s;
    ksm_alloc_get_stats(alloc, &s);
    CHECK(s.pool[0].allocated_bytes.current == 0, "%llu bytes still allocated",
          (unsigned long long)s.pool[0].allocated_bytes.current);
    for (int i = 0; i < THREADS; i++) {
        ksm_stream_free(streams[i]);
        ksm_event_free(events[i]);
    }
    ksm_allocator_destroy(alloc);
    ksm_backend_free(cpu);
    printf("tsan_alloc: %d threads x %d rounds ok, %llu deferred frees\n", THREADS, ROUNDS,
           (unsigned long long)s.deferred_frees);
    return 0;
}
