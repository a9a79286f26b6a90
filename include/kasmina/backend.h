/*
 * kasmina device runtime: backends, devices, streams and events.
 *
 * Objects:
 *   ksm_backend  a registry of devices of one kind (the CPU backend, the CUDA plugin)
 *   ksm_device   one device ("cpu:0", "cuda:0"); owns raw memory, makes streams and events
 *   ksm_stream   an in-order queue of work on one device (copies, op launches, host callbacks,
 *                event records and waits)
 *   ksm_event    a marker recorded on a stream; query/synchronize on the host, or make another
 *                stream wait for it
 *
 * The semantics are CUDA's: everything enqueued on a stream runs in order and asynchronously to
 * the host; work on different streams runs concurrently unless ordered by events. The CPU
 * backend implements this with one worker thread per stream, so stream ordering, cross-stream
 * waits and deferred memory reuse are real on a machine without a GPU.
 *
 * Usage:
 *
 *     ksm_backend *cpu;
 *     ksm_cpu_backend_new(2, &cpu);                 // cpu:0, cpu:1
 *     ksm_device *d = ksm_backend_device(cpu, 0);
 *     ksm_stream *s;  ksm_stream_new(d, &s);
 *     ksm_stream_memcpy_async(s, dev_ptr, host_ptr, n, KSM_COPY_H2D);
 *     ksm_op_relu(s, &y, &x);                      // ops.h
 *     ksm_stream_synchronize(s);                   // returns the stream's sticky error, if any
 *     ksm_stream_free(s);
 *     ksm_backend_free(cpu);
 *
 * Raw device memory (ksm_device_malloc/free) is for the caching allocator (alloc.h) only; every
 * other user allocates through the allocator.
 *
 * Thread-safety: every function here may be called from any thread. A stream may be used by
 * several threads, but the order of work from different threads is then their race.
 *
 * Host memory passed to an async copy must stay valid (and unchanged for H2D) until the copy
 * has run: synchronize the stream or an event recorded after it.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ksm_backend ksm_backend;
typedef struct ksm_device ksm_device;
typedef struct ksm_stream ksm_stream;
typedef struct ksm_event ksm_event;
struct ksm_op;

enum ksm_device_kind {
    KSM_DEVICE_CPU = 0,
    KSM_DEVICE_CUDA = 1,
    KSM_DEVICE_FAKE = 2, /* fault-injection wrapper used by tests */
};

enum ksm_copy_kind {
    KSM_COPY_H2D = 0,
    KSM_COPY_D2H = 1,
    KSM_COPY_D2D = 2, /* both pointers on the stream's device */
};

/* ---- Backends ---- */

/* Creates the CPU backend with n_devices logical devices "cpu:0".."cpu:<n-1>" (1..64).
 * The first call loads OpenBLAS (dlopen; the CPU backend's GEMMs run on it) and picks its
 * kernels: with OPENBLAS_CORETYPE unset, the AVX-512 ones on a CPU that has AVX-512 (see
 * docs/performance.md). It sets OPENBLAS_CORETYPE in the process environment for the duration
 * of the dlopen(), so make it before other threads read the environment. Returns 0,
 * KSM_EINVAL, KSM_ENOMEM or KSM_ENOPLUGIN (OpenBLAS could not be loaded; the log says why). */
int ksm_cpu_backend_new(int n_devices, ksm_backend **out);

/* The OpenBLAS kernel set ("core") the CPU backend's GEMMs run on, e.g. "SkylakeX" or
 * "Haswell"; NULL before a CPU backend was created. */
const char *ksm_cpu_backend_blas_core(void);

/* Loads the CUDA backend plugin (libkasmina_cuda.so) with dlopen and probes for devices.
 * path NULL searches: $KASMINA_CUDA_PLUGIN, the directory of the running executable,
 * <exe dir>/../lib/kasmina, then the library search path. Returns 0 with *out set, or
 * KSM_ENOPLUGIN (plugin or CUDA libraries missing), KSM_ENODEVICE (no device / no driver).
 * On failure, if errbuf is not NULL it receives one sentence saying why. Never aborts, so a
 * daemon can always fall back to the CPU. */
int ksm_cuda_backend_load(const char *path, ksm_backend **out, char *errbuf, size_t errlen);

/* Synchronizes and frees every device of the backend. Streams and events must be freed first.
 * NULL is a no-op. */
void ksm_backend_free(ksm_backend *b);

const char *ksm_backend_name(const ksm_backend *b); /* "cpu", "cuda" */
int ksm_backend_device_count(const ksm_backend *b);
/* Borrowed; lives as long as the backend. NULL when i is out of range. */
ksm_device *ksm_backend_device(const ksm_backend *b, int i);

/* ---- Devices ---- */

const char *ksm_device_name(const ksm_device *d); /* "cpu:0", "cuda:1" */
enum ksm_device_kind ksm_device_kind(const ksm_device *d);
int ksm_device_index(const ksm_device *d);
/* True when device memory is directly readable by the host (the CPU backend). */
bool ksm_device_is_host(const ksm_device *d);
/* Free and total device memory in bytes (for CPU: MemAvailable and MemTotal). */
int ksm_device_mem_info(ksm_device *d, size_t *free_bytes, size_t *total_bytes);
/* Blocks until all work on all streams of the device has finished. Returns the first sticky
 * error of a stream of the device, if any. */
int ksm_device_synchronize(ksm_device *d);
/* Raw allocation, for the caching allocator only. Returns 0, KSM_EDEVMEM or KSM_EDEVICE. The
 * memory is aligned to at least 256 bytes. */
int ksm_device_malloc(ksm_device *d, size_t size, void **out);
void ksm_device_free(ksm_device *d, void *ptr);

/* ---- Streams ---- */

int ksm_stream_new(ksm_device *d, ksm_stream **out);
/* Waits for the stream's queued work, then frees it. NULL is a no-op. */
void ksm_stream_free(ksm_stream *s);
ksm_device *ksm_stream_device(const ksm_stream *s);
/* A process-unique id (for logs and for allocator bookkeeping). */
uint64_t ksm_stream_id(const ksm_stream *s);

/* Blocks until all queued work has finished. Returns 0 or the stream's sticky error: the first
 * failure of an enqueued operation. A sticky error is reported again by every later call. */
int ksm_stream_synchronize(ksm_stream *s);
/* 0 when all queued work has finished, KSM_ENOTREADY otherwise (or the sticky error). */
int ksm_stream_query(ksm_stream *s);

int ksm_stream_memcpy_async(ksm_stream *s, void *dst, const void *src, size_t n,
                            enum ksm_copy_kind kind);
int ksm_stream_memset_async(ksm_stream *s, void *dst, int value, size_t n);

/* Enqueues fn(arg), run on the host in stream order (cudaLaunchHostFunc). fn must not call
 * into the stream it runs on. */
typedef void (*ksm_host_fn)(void *arg);
int ksm_stream_launch_host_fn(ksm_stream *s, ksm_host_fn fn, void *arg);

/* Enqueues an op (normally through the typed wrappers in ops.h, which validate first). The op
 * struct is copied; tensors' memory must stay valid until the op has run. */
int ksm_stream_launch(ksm_stream *s, const struct ksm_op *op);

/* Makes all work enqueued on s after this call wait until ev (as last recorded) completes.
 * ev may belong to another stream of the same device. Waiting on a never-recorded event is a
 * no-op. */
int ksm_stream_wait_event(ksm_stream *s, ksm_event *ev);

/* ---- Events ---- */

int ksm_event_new(ksm_device *d, ksm_event **out);
/* NULL is a no-op. The event must not be pending in a stream wait. */
void ksm_event_free(ksm_event *ev);
/* Captures the work enqueued on s so far; a re-record replaces the previous capture. */
int ksm_event_record(ksm_event *ev, ksm_stream *s);
/* 0 when the captured work has completed (or the event was never recorded), KSM_ENOTREADY
 * otherwise. */
int ksm_event_query(ksm_event *ev);
/* Blocks until the captured work has completed. */
int ksm_event_synchronize(ksm_event *ev);

#ifdef __cplusplus
}
#endif
