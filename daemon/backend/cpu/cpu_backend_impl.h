/*
 * CPU backend internals that tests (and the fault-injecting fake backend) may use.
 *
 * The CPU backend runs each stream as an in-order task queue drained by one worker thread.
 * Events number their records: `recorded` is bumped by each record, whose sequence number stays
 * in the event's pending set until its task has run. A wait enqueues a task that blocks the
 * worker until the record captured when the wait was enqueued has left the pending set (records
 * on different streams complete in any order, so a later one completing first releases nothing).
 *
 * Sticky errors: the first failing task (an op whose kernel returns nonzero, or an injected
 * failure) sets the stream's sticky error. From then on every enqueue and every synchronize or
 * query of the stream returns it. Copies, memsets and ops already queued behind the failure are
 * skipped; host functions already queued still run (they are often completion notifications,
 * and skipping them would strand whoever waits on them); event records and waits still run so
 * that other streams never hang on a failed one.
 */
#pragma once

#include "backend/backend_impl.h"

#ifdef __cplusplus
extern "C" {
#endif

/* True when s is a stream of the CPU backend. */
bool ksm_cpu_stream_is_cpu(const ksm_stream *s);

/* Test hook: enqueues a task on CPU stream s that fails with err (a negative KSM_E* code), as an
 * op whose kernel failed would. Returns 0, KSM_EINVAL (not a CPU stream, err >= 0) or the
 * stream's sticky error. */
int ksm_cpu_stream_inject_error(ksm_stream *s, int err);

#ifdef __cplusplus
}
#endif
