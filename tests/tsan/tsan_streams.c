/*
 * CPU backend streams and events from many threads: each thread owns a stream and also
 * enqueues onto a shared one; host functions count, copies move data, events order streams
 * across threads (record on one, wait on another), queries and synchronizes race with the
 * workers. Checks the counts and the copied bytes.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "tsan_check.h"

#define THREADS 8
#define ROUNDS  200

static ksm_device *dev;
static ksm_stream *shared;
static ksm_event *ev[THREADS];
static atomic_int shared_count;

struct counter {
    int n; /* written only by its stream's worker; read after a synchronize */
};

static void bump(void *p) { ((struct counter *)p)->n++; }
static void bump_shared(void *p)
{
    (void)p;
    atomic_fetch_add(&shared_count, 1);
}

struct targ {
    int id;
    ksm_stream *s;
    struct counter c;
    uint8_t src[256], dst[256];
};

static void *worker(void *p)
{
    struct targ *a = p;
    for (int r = 0; r < ROUNDS; r++) {
        memset(a->src, (a->id * 31 + r) & 0xff, sizeof a->src);
        CHECK_OK(ksm_stream_memcpy_async(a->s, a->dst, a->src, sizeof a->src, KSM_COPY_H2D));
        CHECK_OK(ksm_stream_launch_host_fn(a->s, bump, &a->c));
        CHECK_OK(ksm_event_record(ev[a->id], a->s));
        /* Another thread's stream waits for ours; the shared stream waits for the neighbour. */
        CHECK_OK(ksm_stream_wait_event(shared, ev[(a->id + 1) % THREADS]));
        CHECK_OK(ksm_stream_launch_host_fn(shared, bump_shared, NULL));
        int q = ksm_event_query(ev[a->id]);
        CHECK(q == 0 || q == KSM_ENOTREADY, "event query %d", q);
        if (r % 16 == 0) CHECK_OK(ksm_event_synchronize(ev[(a->id + 3) % THREADS]));
        /* src is rewritten next round: the copy must have run. */
        CHECK_OK(ksm_stream_synchronize(a->s));
        CHECK(a->dst[0] == a->src[0] && a->dst[255] == a->src[255], "copy");
    }
    return NULL;
}

int main(void)
{
    ksm_backend *cpu;
    CHECK_OK(ksm_cpu_backend_new(2, &cpu));
    dev = ksm_backend_device(cpu, 0);
    CHECK_OK(ksm_stream_new(dev, &shared));
    static struct targ args[THREADS];
    for (int i = 0; i < THREADS; i++) {
        args[i].id = i;
        CHECK_OK(ksm_stream_new(dev, &args[i].s));
        CHECK_OK(ksm_event_new(dev, &ev[i]));
    }
    run_threads(THREADS, worker, args, sizeof args[0]);
    CHECK_OK(ksm_device_synchronize(dev));
    for (int i = 0; i < THREADS; i++) {
        CHECK(args[i].c.n == ROUNDS, "thread %d counted %d", i, args[i].c.n);
        ksm_stream_free(args[i].s);
    }
    CHECK(atomic_load(&shared_count) == THREADS * ROUNDS, "shared %d", atomic_load(&shared_count));
    ksm_stream_free(shared);
    for (int i = 0; i < THREADS; i++) ksm_event_free(ev[i]);
    ksm_backend_free(cpu);
    printf("tsan_streams: %d threads x %d rounds ok\n", THREADS, ROUNDS);
    return 0;
}
