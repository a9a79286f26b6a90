/*
 * A fault-injecting device for tests: wraps one real device (normally a CPU device) and passes
 * every call through, except where a fault has been armed.
 *
 *     ksm_backend *cpu, *fake;
 *     ksm_cpu_backend_new(1, &cpu);
 *     ksm_fake_backend_new(ksm_backend_device(cpu, 0), &fake);
 *     ksm_device *d = ksm_backend_device(fake, 0);      // kind KSM_DEVICE_FAKE, "fake:0"
 *     ksm_fake_fail_malloc_nth(d, 2);                    // the 2nd ksm_device_malloc from now
 *                                                        // fails with KSM_EDEVMEM
 *     ksm_fake_set_mem_limit(d, 8 << 20);                // "device" has 8 MiB
 *     ksm_fake_set_sticky_error(d, KSM_EDEVICE);         // the device is now broken
 *     ...
 *     ksm_backend_free(fake);                            // before the wrapped backend
 *     ksm_backend_free(cpu);
 *
 * Streams and events of the fake device wrap streams and events of the wrapped device (the fake
 * stream has the wrapped stream's id). In the sticky-error state every stream operation
 * (enqueue, synchronize, query, event record, event wait), every device synchronize and every
 * device malloc returns the armed error; frees, event queries and event synchronizes still
 * work, so teardown does not hang.
 *
 * All functions are thread-safe.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "kasmina/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ksm_fake_counters {
    uint64_t malloc_calls;  /* ksm_device_malloc calls seen (failed ones included) */
    uint64_t malloc_failed; /* calls that the fake failed */
    uint64_t free_calls;    /* ksm_device_free calls */
    uint64_t sync_calls;    /* ksm_device_synchronize calls */
    uint64_t live_bytes;    /* bytes allocated and not yet freed */
};

/* Creates a backend "fake" with one device wrapping inner (borrowed: it must outlive the fake
 * backend). Returns 0, KSM_EINVAL or KSM_ENOMEM. Free with ksm_backend_free(). */
int ksm_fake_backend_new(ksm_device *inner, ksm_backend **out);

/* Arms a one-shot failure: the nth ksm_device_malloc call from now on (1 = the next one) fails
 * with KSM_EDEVMEM. 0 disarms. Only the fake's devices may be passed. */
void ksm_fake_fail_malloc_nth(ksm_device *fake, uint64_t n);

/* Every ksm_device_malloc that would bring live bytes above limit fails with KSM_EDEVMEM
 * (a device with limit bytes of memory). 0 = no limit. */
void ksm_fake_set_mem_limit(ksm_device *fake, size_t limit);

/* Puts the device into the sticky-error state err (e.g. KSM_EDEVICE); 0 clears it. */
void ksm_fake_set_sticky_error(ksm_device *fake, int err);

/* Arms a delayed sticky error: the nth op launch from now (1 = the next) fails with err and puts
 * the device into the sticky-error state (a device that breaks while serving). 0 disarms. */
void ksm_fake_set_sticky_after_launches(ksm_device *fake, uint64_t n, int err);
void ksm_fake_get_counters(ksm_device *fake, struct ksm_fake_counters *out);

/* The wrapped stream of a fake stream (borrowed). */
ksm_stream *ksm_fake_stream_inner(ksm_stream *s);

#ifdef __cplusplus
}
#endif
