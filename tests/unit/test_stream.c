/*
 * The CPU backend's streams and events: ordering, cross-stream waits, event queries,
 * synchronization, many concurrent streams and sticky errors.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend/cpu/cpu_backend_impl.h"
#include "fake_backend.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"
#include "kasmina/tensor.h"

TestSuite(stream, .timeout = 30);

// ---- Helpers ----

/* A gate: a host fn that blocks its stream until the test opens it. */
struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int open;
    int entered;
};

static void gate_init(struct gate *g)
{
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->open = 0;
    g->entered = 0;
}

static void gate_fn(void *arg)
{
    struct gate *g = arg;
    pthread_mutex_lock(&g->mu);
    g->entered = 1;
    pthread_cond_broadcast(&g->cv);
    while (!g->open) pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

static void gate_open(struct gate *g)
{
    pthread_mutex_lock(&g->mu);
    g->open = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* Waits until the stream's worker is blocked inside gate_fn. */
static void gate_wait_entered(struct gate *g)
{
    pthread_mutex_lock(&g->mu);
    while (!g->entered) pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct log {
    int n;
    int v[4096];
};

struct log_entry {
    struct log *log;
    int value;
};

static void log_append(void *arg)
{
    struct log_entry *e = arg;
    e->log->v[e->log->n++] = e->value;
}

static ksm_backend *cpu;
static ksm_device *dev;

static void setup_cpu(void)
{
    cr_assert_eq(ksm_cpu_backend_new(2, &cpu), 0);
    dev = ksm_backend_device(cpu, 0);
    cr_assert_not_null(dev);
}

static void teardown_cpu(void) { ksm_backend_free(cpu); }

// ---- Backend and devices ----

Test(stream, cpu_backend_rejects_bad_device_counts)
{
    ksm_backend *b = NULL;
    cr_expect_eq(ksm_cpu_backend_new(0, &b), KSM_EINVAL);
    cr_expect_eq(ksm_cpu_backend_new(65, &b), KSM_EINVAL);
    cr_expect_eq(ksm_cpu_backend_new(1, NULL), KSM_EINVAL);
    cr_assert_eq(ksm_cpu_backend_new(64, &b), 0);
    cr_expect_eq(ksm_backend_device_count(b), 64);
    cr_expect_str_eq(ksm_device_name(ksm_backend_device(b, 63)), "cpu:63");
    ksm_backend_free(b);
}

Test(stream, cpu_devices_are_named_and_host_visible, .init = setup_cpu, .fini = teardown_cpu)
{
    cr_expect_str_eq(ksm_backend_name(cpu), "cpu");
    cr_expect_eq(ksm_backend_device_count(cpu), 2);
    ksm_device *d1 = ksm_backend_device(cpu, 1);
    cr_expect_str_eq(ksm_device_name(dev), "cpu:0");
    cr_expect_str_eq(ksm_device_name(d1), "cpu:1");
    cr_expect_eq(ksm_device_index(d1), 1);
    cr_expect_eq(ksm_device_kind(dev), KSM_DEVICE_CPU);
    cr_expect(ksm_device_is_host(dev));
    cr_expect_null(ksm_backend_device(cpu, 2));
    size_t free_b = 0, total_b = 0;
    cr_assert_eq(ksm_device_mem_info(dev, &free_b, &total_b), 0);
    cr_expect_gt(total_b, (size_t)0);
    cr_expect_leq(free_b, total_b);
}

Test(stream, device_malloc_is_aligned_and_writable, .init = setup_cpu, .fini = teardown_cpu)
{
    size_t sizes[] = {1, 100, 4096, 3u << 20};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        void *p = NULL;
        cr_assert_eq(ksm_device_malloc(dev, sizes[i], &p), 0);
        cr_expect_eq((uintptr_t)p % 256, 0, "size %zu not 256-aligned", sizes[i]);
        memset(p, 0xab, sizes[i]);
        ksm_device_free(dev, p);
    }
}

Test(stream, stream_ids_are_unique, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *a, *b;
    cr_assert_eq(ksm_stream_new(dev, &a), 0);
    cr_assert_eq(ksm_stream_new(ksm_backend_device(cpu, 1), &b), 0);
    cr_expect_neq(ksm_stream_id(a), ksm_stream_id(b));
    cr_expect_neq(ksm_stream_id(a), 0);
    cr_expect_eq(ksm_stream_device(a), dev);
    ksm_stream_free(a);
    ksm_stream_free(b);
}

// ---- Ordering ----

Test(stream, runs_host_fns_in_enqueue_order, .init = setup_cpu, .fini = teardown_cpu)
{
    enum { N = 2000 }; /* more than the ring's initial size: growth keeps the order */
    static struct log log;
    static struct log_entry entries[N];
    ksm_stream *s;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    struct gate g;
    gate_init(&g);
    /* Hold the worker so that the whole queue is pending at once (the ring must grow). */
    cr_assert_eq(ksm_stream_launch_host_fn(s, gate_fn, &g), 0);
    for (int i = 0; i < N; i++) {
        entries[i] = (struct log_entry){&log, i};
        cr_assert_eq(ksm_stream_launch_host_fn(s, log_append, &entries[i]), 0);
    }
    cr_expect_eq(ksm_stream_query(s), KSM_ENOTREADY);
    gate_open(&g);
    cr_assert_eq(ksm_stream_synchronize(s), 0);
    cr_assert_eq(log.n, N);
    for (int i = 0; i < N; i++) cr_assert_eq(log.v[i], i, "entry %d is %d", i, log.v[i]);
    cr_expect_eq(ksm_stream_query(s), 0);
    ksm_stream_free(s);
}

struct copy_check {
    const unsigned char *buf;
    size_t n;
    int all_ok;
    unsigned char want;
};

static void copy_check_fn(void *arg)
{
    struct copy_check *c = arg;
    c->all_ok = 1;
    for (size_t i = 0; i < c->n; i++)
        if (c->buf[i] != c->want) c->all_ok = 0;
}

Test(stream, copies_and_memsets_run_in_order, .init = setup_cpu, .fini = teardown_cpu)
{
    enum { N = 1 << 16 };
    ksm_stream *s;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    unsigned char *d1, *d2;
    cr_assert_eq(ksm_device_malloc(dev, N, (void **)&d1), 0);
    cr_assert_eq(ksm_device_malloc(dev, N, (void **)&d2), 0);
    static unsigned char host[N], back[N];
    memset(host, 7, N);
    struct gate g;
    gate_init(&g);
    cr_assert_eq(ksm_stream_launch_host_fn(s, gate_fn, &g), 0);
    cr_assert_eq(ksm_stream_memset_async(s, d1, 1, N), 0);
    struct copy_check c1 = {d1, N, 0, 1};
    cr_assert_eq(ksm_stream_launch_host_fn(s, copy_check_fn, &c1), 0);
    cr_assert_eq(ksm_stream_memcpy_async(s, d1, host, N, KSM_COPY_H2D), 0);
    cr_assert_eq(ksm_stream_memcpy_async(s, d2, d1, N, KSM_COPY_D2D), 0);
    cr_assert_eq(ksm_stream_memcpy_async(s, back, d2, N, KSM_COPY_D2H), 0);
    /* Nothing has run yet: the stream is asynchronous to the host. */
    cr_expect_eq(back[0], 0);
    gate_open(&g);
    cr_assert_eq(ksm_stream_synchronize(s), 0);
    cr_expect_eq(c1.all_ok, 1, "memset not visible to the next task");
    cr_expect_eq(memcmp(back, host, N), 0);
    ksm_device_free(dev, d1);
    ksm_device_free(dev, d2);
    ksm_stream_free(s);
}

Test(stream, op_launch_runs_in_stream_order, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *s;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    float *buf;
    cr_assert_eq(ksm_device_malloc(dev, 64 * sizeof(float), (void **)&buf), 0);
    for (int i = 0; i < 64; i++) buf[i] = -1.0f;
    ksm_tensor t;
    int64_t shape[1] = {64};
    cr_assert_eq(ksm_tensor_init(&t, dev, buf, KSM_DTYPE_F32, 1, shape), 0);
    struct gate g;
    gate_init(&g);
    cr_assert_eq(ksm_stream_launch_host_fn(s, gate_fn, &g), 0);
    cr_assert_eq(ksm_op_fill(s, &t, 2.5), 0);
    gate_wait_entered(&g);
    cr_expect_eq(buf[0], -1.0f, "the op ran before the work queued ahead of it");
    gate_open(&g);
    cr_assert_eq(ksm_stream_synchronize(s), 0);
    for (int i = 0; i < 64; i++) cr_assert_eq(buf[i], 2.5f);
    ksm_device_free(dev, buf);
    ksm_stream_free(s);
}

// ---- Synchronize ----

struct slow {
    int ms;
    int done;
};

static void slow_fn(void *arg)
{
    struct slow *w = arg;
    sleep_ms(w->ms);
    w->done = 1;
}

Test(stream, synchronize_waits_for_queued_work, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *s;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    struct slow w = {300, 0};
    double t0 = now_s();
    cr_assert_eq(ksm_stream_launch_host_fn(s, slow_fn, &w), 0);
    cr_expect_lt(now_s() - t0, 0.25, "enqueue waited for the work");
    cr_assert_eq(ksm_stream_synchronize(s), 0);
    cr_expect_eq(w.done, 1);
    cr_expect_geq(now_s() - t0, 0.29);
    ksm_stream_free(s);
}

Test(stream, stream_free_waits_for_queued_work, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *s;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    struct slow w = {100, 0};
    cr_assert_eq(ksm_stream_launch_host_fn(s, slow_fn, &w), 0);
    ksm_stream_free(s);
    cr_expect_eq(w.done, 1);
}

Test(stream, device_synchronize_waits_for_its_streams_only, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *a, *b, *other;
    cr_assert_eq(ksm_stream_new(dev, &a), 0);
    cr_assert_eq(ksm_stream_new(dev, &b), 0);
    cr_assert_eq(ksm_stream_new(ksm_backend_device(cpu, 1), &other), 0);
    struct slow wa = {80, 0}, wb = {120, 0};
    struct gate g;
    gate_init(&g);
    cr_assert_eq(ksm_stream_launch_host_fn(other, gate_fn, &g), 0); /* cpu:1 stays busy */
    cr_assert_eq(ksm_stream_launch_host_fn(a, slow_fn, &wa), 0);
    cr_assert_eq(ksm_stream_launch_host_fn(b, slow_fn, &wb), 0);
    cr_assert_eq(ksm_device_synchronize(dev), 0);
    cr_expect_eq(wa.done, 1);
    cr_expect_eq(wb.done, 1);
    cr_expect_eq(ksm_stream_query(other), KSM_ENOTREADY);
    gate_open(&g);
    cr_expect_eq(ksm_device_synchronize(ksm_backend_device(cpu, 1)), 0);
    cr_expect_eq(ksm_stream_query(other), 0);
    ksm_stream_free(a);
    ksm_stream_free(b);
    ksm_stream_free(other);
}

// ---- Events ----

struct observe {
    const int *flag;
    int seen;
};

static void set_flag_slowly(void *arg)
{
    sleep_ms(200);
    *(int *)arg = 1;
}

static void observe_fn(void *arg)
{
    struct observe *o = arg;
    o->seen = *o->flag;
}

Test(stream, wait_event_orders_work_across_streams, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *a, *b;
    ksm_event *ev;
    cr_assert_eq(ksm_stream_new(dev, &a), 0);
    cr_assert_eq(ksm_stream_new(dev, &b), 0);
    cr_assert_eq(ksm_event_new(dev, &ev), 0);
    int flag = 0;
    struct observe o = {&flag, -1};
    cr_assert_eq(ksm_stream_launch_host_fn(a, set_flag_slowly, &flag), 0);
    cr_assert_eq(ksm_event_record(ev, a), 0);
    cr_assert_eq(ksm_stream_wait_event(b, ev), 0);
    cr_assert_eq(ksm_stream_launch_host_fn(b, observe_fn, &o), 0);
    cr_assert_eq(ksm_stream_synchronize(b), 0);
    cr_expect_eq(o.seen, 1, "stream B ran before the event it waits on");
    cr_assert_eq(ksm_stream_synchronize(a), 0);
    ksm_event_free(ev);
    ksm_stream_free(a);
    ksm_stream_free(b);
}

Test(stream, wait_captures_the_record_at_wait_time, .init = setup_cpu, .fini = teardown_cpu)
{
    /* B waits on the first record; a later re-record on a blocked stream must not hold B. */
    ksm_stream *a, *b, *c;
    ksm_event *ev;
    cr_assert_eq(ksm_stream_new(dev, &a), 0);
    cr_assert_eq(ksm_stream_new(dev, &b), 0);
    cr_assert_eq(ksm_stream_new(dev, &c), 0);
    cr_assert_eq(ksm_event_new(dev, &ev), 0);
    cr_assert_eq(ksm_event_record(ev, a), 0);
    cr_assert_eq(ksm_stream_synchronize(a), 0);
    struct gate g;
    gate_init(&g);
    cr_assert_eq(ksm_stream_wait_event(b, ev), 0); /* captures record #1: complete */
    cr_assert_eq(ksm_stream_launch_host_fn(c, gate_fn, &g), 0);
    cr_assert_eq(ksm_event_record(ev, c), 0); /* record #2: blocked behind the gate */
    cr_expect_eq(ksm_event_query(ev), KSM_ENOTREADY);
    cr_assert_eq(ksm_stream_synchronize(b), 0); /* would hang if it captured #2 */
    gate_open(&g);
    cr_assert_eq(ksm_event_synchronize(ev), 0);
    cr_expect_eq(ksm_event_query(ev), 0);
    ksm_event_free(ev);
    ksm_stream_free(a);
    ksm_stream_free(b);
    ksm_stream_free(c);
}

static void mark_fn(void *arg) { atomic_store((atomic_int *)arg, 1); }

Test(stream, a_later_record_completing_first_does_not_release_an_earlier_capture, .init = setup_cpu,
     .fini = teardown_cpu)
{
    /* B waits on record #1 (A, blocked); record #2 on idle C completes first. B must still wait
     * for A's work, and so must a host synchronize that captured #1. */
    ksm_stream *a, *b, *c;
    ksm_event *ev;
    cr_assert_eq(ksm_stream_new(dev, &a), 0);
    cr_assert_eq(ksm_stream_new(dev, &b), 0);
    cr_assert_eq(ksm_stream_new(dev, &c), 0);
    cr_assert_eq(ksm_event_new(dev, &ev), 0);
    struct gate g;
    gate_init(&g);
    atomic_int b_ran = 0;
    cr_assert_eq(ksm_stream_launch_host_fn(a, gate_fn, &g), 0);
    cr_assert_eq(ksm_event_record(ev, a), 0);      /* #1: blocked behind the gate */
    cr_assert_eq(ksm_stream_wait_event(b, ev), 0); /* captures #1 */
    cr_assert_eq(ksm_stream_launch_host_fn(b, mark_fn, &b_ran), 0);
    cr_assert_eq(ksm_event_record(ev, c), 0); /* #2: nothing before it */
    cr_assert_eq(ksm_stream_synchronize(c), 0);
    cr_expect_eq(ksm_event_query(ev), 0, "the latest capture (#2) is complete");
    sleep_ms(50);
    cr_expect_eq(atomic_load(&b_ran), 0, "B ran before the record it waits on (#1) completed");
    cr_expect_eq(ksm_stream_query(b), KSM_ENOTREADY);
    gate_open(&g);
    cr_assert_eq(ksm_stream_synchronize(b), 0);
    cr_expect_eq(atomic_load(&b_ran), 1);
    ksm_event_free(ev);
    ksm_stream_free(a);
    ksm_stream_free(b);
    ksm_stream_free(c);
}

Test(stream, event_query_reports_progress, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *s;
    ksm_event *ev;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    cr_assert_eq(ksm_event_new(dev, &ev), 0);
    cr_expect_eq(ksm_event_query(ev), 0, "a never-recorded event is complete");
    cr_expect_eq(ksm_event_synchronize(ev), 0);
    struct gate g;
    gate_init(&g);
    cr_assert_eq(ksm_stream_launch_host_fn(s, gate_fn, &g), 0);
    cr_assert_eq(ksm_event_record(ev, s), 0);
    gate_wait_entered(&g);
    cr_expect_eq(ksm_event_query(ev), KSM_ENOTREADY);
    cr_expect_eq(ksm_stream_query(s), KSM_ENOTREADY);
    gate_open(&g);
    cr_assert_eq(ksm_event_synchronize(ev), 0);
    cr_expect_eq(ksm_event_query(ev), 0);
    /* A re-record captures new work. */
    gate_init(&g);
    cr_assert_eq(ksm_stream_launch_host_fn(s, gate_fn, &g), 0);
    cr_assert_eq(ksm_event_record(ev, s), 0);
    cr_expect_eq(ksm_event_query(ev), KSM_ENOTREADY);
    gate_open(&g);
    cr_assert_eq(ksm_stream_synchronize(s), 0);
    cr_expect_eq(ksm_event_query(ev), 0);
    ksm_event_free(ev);
    ksm_stream_free(s);
}

Test(stream, waiting_on_a_never_recorded_event_is_a_no_op, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *s;
    ksm_event *ev;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    cr_assert_eq(ksm_event_new(dev, &ev), 0);
    cr_assert_eq(ksm_stream_wait_event(s, ev), 0);
    struct slow w = {1, 0};
    cr_assert_eq(ksm_stream_launch_host_fn(s, slow_fn, &w), 0);
    cr_assert_eq(ksm_stream_synchronize(s), 0);
    cr_expect_eq(w.done, 1);
    ksm_event_free(ev);
    ksm_stream_free(s);
}

Test(stream, event_may_be_freed_while_its_record_is_queued, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *s;
    ksm_event *ev;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    cr_assert_eq(ksm_event_new(dev, &ev), 0);
    struct gate g;
    gate_init(&g);
    cr_assert_eq(ksm_stream_launch_host_fn(s, gate_fn, &g), 0);
    cr_assert_eq(ksm_event_record(ev, s), 0);
    ksm_event_free(ev); /* the queued record keeps it alive (ASan checks the rest) */
    gate_open(&g);
    cr_expect_eq(ksm_stream_synchronize(s), 0);
    ksm_stream_free(s);
}

Test(stream, events_reject_streams_of_other_devices, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *s;
    ksm_event *ev;
    cr_assert_eq(ksm_stream_new(ksm_backend_device(cpu, 1), &s), 0);
    cr_assert_eq(ksm_event_new(dev, &ev), 0);
    cr_expect_eq(ksm_event_record(ev, s), KSM_EINVAL);
    cr_expect_eq(ksm_stream_wait_event(s, ev), KSM_EINVAL);
    ksm_event_free(ev);
    ksm_stream_free(s);
}

// ---- Many streams ----

enum { MANY = 32 };

struct barrier_arg {
    pthread_mutex_t *mu;
    pthread_cond_t *cv;
    int *arrived;
    int *timed_out;
};

/* Every stream's worker waits here until all MANY have arrived: only possible when the streams
 * really run concurrently. Gives up after 10 s so a serialising bug fails instead of hanging. */
static void barrier_fn(void *arg)
{
    struct barrier_arg *b = arg;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 10;
    pthread_mutex_lock(b->mu);
    (*b->arrived)++;
    pthread_cond_broadcast(b->cv);
    while (*b->arrived < MANY && !*b->timed_out)
        if (pthread_cond_timedwait(b->cv, b->mu, &dl) != 0) *b->timed_out = 1;
    pthread_mutex_unlock(b->mu);
}

static void bump(void *arg) { (*(int *)arg)++; }

Test(stream, many_streams_run_concurrently_and_chain_through_events, .init = setup_cpu,
     .fini = teardown_cpu)
{
    ksm_stream *s[MANY];
    ksm_event *ev[MANY];
    static int counters[MANY];
    static struct log chain;
    static struct log_entry chain_e[MANY];
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    int arrived = 0, timed_out = 0;
    struct barrier_arg barg = {&mu, &cv, &arrived, &timed_out};

    for (int i = 0; i < MANY; i++) {
        cr_assert_eq(ksm_stream_new(dev, &s[i]), 0);
        cr_assert_eq(ksm_event_new(dev, &ev[i]), 0);
    }
    for (int i = 0; i < MANY; i++) {
        cr_assert_eq(ksm_stream_launch_host_fn(s[i], barrier_fn, &barg), 0);
        for (int k = 0; k < 100; k++)
            cr_assert_eq(ksm_stream_launch_host_fn(s[i], bump, &counters[i]), 0);
    }
    /* A chain: stream i appends i only after stream i-1 has appended. All streams are held
     * at the barrier until every one has arrived, so without the waits they would race. */
    for (int i = 0; i < MANY; i++) {
        if (i > 0) cr_assert_eq(ksm_stream_wait_event(s[i], ev[i - 1]), 0);
        chain_e[i] = (struct log_entry){&chain, i};
        cr_assert_eq(ksm_stream_launch_host_fn(s[i], log_append, &chain_e[i]), 0);
        cr_assert_eq(ksm_event_record(ev[i], s[i]), 0);
    }
    cr_assert_eq(ksm_device_synchronize(dev), 0);
    cr_expect_eq(timed_out, 0, "the streams did not run concurrently");
    cr_expect_eq(arrived, MANY);
    for (int i = 0; i < MANY; i++) cr_expect_eq(counters[i], 100, "stream %d", i);
    cr_assert_eq(chain.n, MANY);
    for (int i = 0; i < MANY; i++) cr_expect_eq(chain.v[i], i);
    for (int i = 0; i < MANY; i++) {
        cr_expect_eq(ksm_event_query(ev[i]), 0);
        ksm_event_free(ev[i]);
        ksm_stream_free(s[i]);
    }
}

struct hammer {
    ksm_stream *s;
    int *counter;
    int n;
};

static void *hammer_thread(void *arg)
{
    struct hammer *h = arg;
    for (int i = 0; i < h->n; i++) ksm_stream_launch_host_fn(h->s, bump, h->counter);
    return NULL;
}

Test(stream, enqueue_from_several_threads_loses_nothing, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *s;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    int counter = 0;
    pthread_t th[4];
    struct hammer h = {s, &counter, 5000};
    for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, hammer_thread, &h);
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    cr_assert_eq(ksm_stream_synchronize(s), 0);
    cr_expect_eq(counter, 20000);
    ksm_stream_free(s);
}

// ---- Sticky errors ----

Test(stream, failing_op_sets_a_sticky_error, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_stream *s, *other;
    cr_assert_eq(ksm_stream_new(dev, &s), 0);
    cr_assert_eq(ksm_stream_new(dev, &other), 0);
    unsigned char *buf;
    cr_assert_eq(ksm_device_malloc(dev, 256, (void **)&buf), 0);
    memset(buf, 0, 256);

    /* A fill of a dtype the kernels do not know: ops.c would reject it, so go straight to the
     * stream (the kernel returns KSM_EUNSUPPORTED when it runs). */
    struct ksm_op op;
    memset(&op, 0, sizeof op);
    op.type = KSM_OP_FILL;
    op.dst.data = buf;
    op.dst.dev = dev;
    op.dst.dtype = KSM_DTYPE_COUNT;
    op.dst.ndim = 1;
    op.dst.shape[0] = 4;
    op.dst.stride[0] = 1;

    struct gate g;
    gate_init(&g);
    struct slow after = {0, 0};
    cr_assert_eq(ksm_stream_launch_host_fn(s, gate_fn, &g), 0);
    cr_assert_eq(ksm_stream_launch(s, &op), 0); /* fails later, when it runs */
    cr_assert_eq(ksm_stream_memset_async(s, buf, 0x5a, 256), 0);
    cr_assert_eq(ksm_stream_launch_host_fn(s, slow_fn, &after), 0);
    cr_expect_eq(ksm_stream_query(s), KSM_ENOTREADY);
    gate_open(&g);

    cr_expect_eq(ksm_stream_synchronize(s), KSM_EUNSUPPORTED);
    cr_expect_eq(buf[0], 0, "work queued behind the failure ran");
    cr_expect_eq(after.done, 1, "host fns queued behind the failure still run");
    /* Every later call reports it. */
    cr_expect_eq(ksm_stream_synchronize(s), KSM_EUNSUPPORTED);
    cr_expect_eq(ksm_stream_query(s), KSM_EUNSUPPORTED);
    cr_expect_eq(ksm_stream_memset_async(s, buf, 1, 16), KSM_EUNSUPPORTED);
    cr_expect_eq(ksm_stream_launch_host_fn(s, bump, &after.done), KSM_EUNSUPPORTED);
    ksm_event *ev;
    cr_assert_eq(ksm_event_new(dev, &ev), 0);
    cr_expect_eq(ksm_event_record(ev, s), KSM_EUNSUPPORTED);
    cr_expect_eq(ksm_stream_wait_event(s, ev), KSM_EUNSUPPORTED);
    cr_expect_eq(ksm_device_synchronize(dev), KSM_EUNSUPPORTED);
    cr_expect_eq(after.done, 1);
    /* Other streams are unaffected. */
    cr_expect_eq(ksm_stream_memset_async(other, buf, 3, 16), 0);
    cr_expect_eq(ksm_stream_synchronize(other), 0);
    cr_expect_eq(buf[0], 3);
    ksm_event_free(ev);
    ksm_device_free(dev, buf);
    ksm_stream_free(s);
    ksm_stream_free(other);
}

Test(stream, injected_error_is_sticky_and_events_still_complete, .init = setup_cpu,
     .fini = teardown_cpu)
{
    ksm_stream *a, *b;
    ksm_event *ev;
    cr_assert_eq(ksm_stream_new(dev, &a), 0);
    cr_assert_eq(ksm_stream_new(dev, &b), 0);
    cr_assert_eq(ksm_event_new(dev, &ev), 0);
    struct gate g;
    gate_init(&g);
    cr_assert_eq(ksm_stream_launch_host_fn(a, gate_fn, &g), 0);
    cr_assert_eq(ksm_cpu_stream_inject_error(a, KSM_EDEVICE), 0);
    cr_assert_eq(ksm_event_record(ev, a), 0); /* queued before the failure happens */
    cr_assert_eq(ksm_stream_wait_event(b, ev), 0);
    gate_open(&g);
    /* B must not hang on an event behind A's failure. */
    cr_expect_eq(ksm_stream_synchronize(b), 0);
    cr_expect_eq(ksm_event_query(ev), 0);
    cr_expect_eq(ksm_stream_synchronize(a), KSM_EDEVICE);
    cr_expect_eq(ksm_cpu_stream_inject_error(a, KSM_EIO), KSM_EDEVICE);
    cr_expect_eq(ksm_cpu_stream_inject_error(b, 1), KSM_EINVAL);
    ksm_event_free(ev);
    ksm_stream_free(a);
    ksm_stream_free(b);
}

// ---- The fake backend ----

Test(stream, fake_device_in_sticky_error_fails_every_operation, .init = setup_cpu,
     .fini = teardown_cpu)
{
    ksm_backend *fb;
    cr_assert_eq(ksm_fake_backend_new(dev, &fb), 0);
    ksm_device *fd = ksm_backend_device(fb, 0);
    cr_expect_eq(ksm_device_kind(fd), KSM_DEVICE_FAKE);
    cr_expect_str_eq(ksm_device_name(fd), "fake:0");
    ksm_stream *s;
    ksm_event *ev;
    cr_assert_eq(ksm_stream_new(fd, &s), 0);
    cr_assert_eq(ksm_event_new(fd, &ev), 0);
    cr_expect_eq(ksm_stream_id(s), ksm_stream_id(ksm_fake_stream_inner(s)));
    int counter = 0;
    cr_assert_eq(ksm_stream_launch_host_fn(s, bump, &counter), 0);
    cr_assert_eq(ksm_event_record(ev, s), 0);
    cr_assert_eq(ksm_stream_synchronize(s), 0);
    cr_expect_eq(counter, 1);
    void *p;
    cr_assert_eq(ksm_device_malloc(fd, 1024, &p), 0);

    ksm_fake_set_sticky_error(fd, KSM_EDEVICE);
    cr_expect_eq(ksm_stream_launch_host_fn(s, bump, &counter), KSM_EDEVICE);
    cr_expect_eq(ksm_stream_memset_async(s, p, 0, 16), KSM_EDEVICE);
    cr_expect_eq(ksm_stream_memcpy_async(s, p, &counter, sizeof counter, KSM_COPY_H2D),
                 KSM_EDEVICE);
    ksm_tensor t;
    int64_t shape[1] = {4};
    cr_assert_eq(ksm_tensor_init(&t, fd, p, KSM_DTYPE_F32, 1, shape), 0);
    cr_expect_eq(ksm_op_fill(s, &t, 1.0), KSM_EDEVICE);
    cr_expect_eq(ksm_event_record(ev, s), KSM_EDEVICE);
    cr_expect_eq(ksm_stream_wait_event(s, ev), KSM_EDEVICE);
    cr_expect_eq(ksm_stream_synchronize(s), KSM_EDEVICE);
    cr_expect_eq(ksm_stream_query(s), KSM_EDEVICE);
    cr_expect_eq(ksm_device_synchronize(fd), KSM_EDEVICE);
    void *q = NULL;
    cr_expect_eq(ksm_device_malloc(fd, 1024, &q), KSM_EDEVICE);
    cr_expect_eq(counter, 1);

    ksm_fake_set_sticky_error(fd, 0);
    cr_expect_eq(ksm_stream_synchronize(s), 0);
    ksm_device_free(fd, p);
    struct ksm_fake_counters c;
    ksm_fake_get_counters(fd, &c);
    cr_expect_eq(c.malloc_calls, 2);
    cr_expect_eq(c.malloc_failed, 1);
    cr_expect_eq(c.free_calls, 1);
    cr_expect_eq(c.live_bytes, 0);
    ksm_event_free(ev);
    ksm_stream_free(s);
    ksm_backend_free(fb);
}

Test(stream, fake_device_fails_the_nth_malloc_once, .init = setup_cpu, .fini = teardown_cpu)
{
    ksm_backend *fb;
    cr_assert_eq(ksm_fake_backend_new(dev, &fb), 0);
    ksm_device *fd = ksm_backend_device(fb, 0);
    void *p[4] = {0};
    ksm_fake_fail_malloc_nth(fd, 3);
    cr_expect_eq(ksm_device_malloc(fd, 512, &p[0]), 0);
    cr_expect_eq(ksm_device_malloc(fd, 512, &p[1]), 0);
    cr_expect_eq(ksm_device_malloc(fd, 512, &p[2]), KSM_EDEVMEM);
    cr_expect_eq(ksm_device_malloc(fd, 512, &p[3]), 0);
    ksm_fake_set_mem_limit(fd, 2048); /* 1536 bytes are live */
    void *r = NULL;
    cr_expect_eq(ksm_device_malloc(fd, 1024, &r), KSM_EDEVMEM);
    cr_expect_eq(ksm_device_malloc(fd, 512, &r), 0);
    ksm_device_free(fd, r);
    ksm_device_free(fd, p[0]);
    ksm_device_free(fd, p[1]);
    ksm_device_free(fd, p[3]);
    ksm_backend_free(fb);
}
