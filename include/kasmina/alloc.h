/*
 * kasmina caching device allocator (one per device), after PyTorch's CUDACachingAllocator.
 *
 * - Requests are rounded up to 512 bytes. Requests of at most 1 MiB come from the small pool
 *   (2 MiB segments); larger ones from the large pool.
 * - Best fit within the requesting stream's free blocks of the right pool; a block is split
 *   when the remainder is worth keeping (small: >= 512 B; large: > 1 MiB) and coalesced with
 *   free neighbours of its segment when freed.
 * - Only when no free block of the stream fits is a segment obtained from the device: for the
 *   large pool, the request rounded up to 2 MiB (the remainder, when over 1 MiB, is a free
 *   block for later requests). Unlike PyTorch, which gives requests below 10 MiB a 20 MiB
 *   segment to share, no segment is made bigger than its first request needs: a steady state
 *   (the same requests, freed and made again) is served from the cache either way, and a
 *   segment exceeds the request that made it by less than 2 MiB instead of by up to 19 MiB
 *   (tests/bench/bench_alloc.c measures both). The price is one device
 *   allocation per concurrently live large block while the cache warms up, and cached segments
 *   too small for a new, bigger request are not merged: they stay cached until
 *   ksm_alloc_empty_cache() or memory pressure gives them back.
 * - Blocks belong to the stream they were allocated on: a freed block is reused at once by that
 *   stream, never by another. ksm_alloc_record_stream() marks a block as used by another stream
 *   (esper's record_stream); when it is freed, an event is recorded on every such stream and the
 *   block returns to the pool only once all of them have completed (a "deferred free"). Memory
 *   is therefore never reused under a running kernel, by construction.
 * - Segments are never given back to the device except by ksm_alloc_empty_cache() or under
 *   memory pressure: on failure (device OOM or the memory cap), the allocator synchronizes the
 *   device, frees every cached unused segment and retries once; then returns KSM_EDEVMEM.
 *
 * All functions are thread-safe. The allocator may synchronize streams and the device while it
 * holds its lock, so a host function (ksm_stream_launch_host_fn) running on a stream of the
 * device must not call into the allocator of that device.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "kasmina/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ksm_allocator ksm_allocator;

#define KSM_ALLOC_ROUND         512u
#define KSM_ALLOC_SMALL_SIZE    (1u << 20) /* largest small-pool request */
#define KSM_ALLOC_SMALL_SEGMENT (2u << 20) /* small-pool segment */
#define KSM_ALLOC_ROUND_LARGE   (2u << 20) /* large-pool segments: the request rounded up */

/* One statistic in torch.cuda.memory_stats() vocabulary. current = allocated - freed; peak is
 * the high-water mark of current since creation or the last reset. */
struct ksm_stat {
    int64_t current, peak, allocated, freed;
};

enum ksm_pool { KSM_POOL_ALL = 0, KSM_POOL_SMALL = 1, KSM_POOL_LARGE = 2, KSM_POOL_COUNT = 3 };

struct ksm_pool_stats {
    struct ksm_stat allocated_bytes;      /* bytes of blocks handed out (rounded sizes) */
    struct ksm_stat reserved_bytes;       /* bytes of segments obtained from the device */
    struct ksm_stat active_bytes;         /* allocated + freed-but-awaiting-stream-events */
    struct ksm_stat inactive_split_bytes; /* free blocks that are part of a split segment */
    struct ksm_stat allocation;           /* count of blocks handed out */
    struct ksm_stat segment;              /* count of segments */
    struct ksm_stat active;               /* count of active blocks */
    struct ksm_stat inactive_split;       /* count of inactive split blocks */
};

struct ksm_mem_stats {
    struct ksm_pool_stats pool[KSM_POOL_COUNT]; /* all, small, large */
    uint64_t num_alloc_retries;                 /* flush-and-retry cycles */
    uint64_t num_ooms;                          /* requests that failed with KSM_EDEVMEM */
    uint64_t num_device_alloc;                  /* ksm_device_malloc calls that succeeded */
    uint64_t num_device_free;                   /* ksm_device_free calls */
    uint64_t num_sync_all_streams;              /* device synchronizations done by the allocator */
    uint64_t cache_hits;                        /* requests served without a device allocation */
    uint64_t deferred_frees;   /* frees that had to wait for other streams' events */
    uint64_t memory_cap_bytes; /* 0 = no cap */
    uint64_t total_bytes;      /* device memory (ksm_device_mem_info) */
};

struct ksm_alloc_config {
    size_t memory_cap; /* maximum reserved bytes; 0 = no cap beyond the device itself */
};

/* Creates the allocator of dev. cfg may be NULL (defaults). Returns 0, KSM_EINVAL, KSM_ENOMEM.
 */
int ksm_allocator_new(ksm_device *dev, const struct ksm_alloc_config *cfg, ksm_allocator **out);
/* Waits for pending deferred frees and for the device, returns every segment to it and frees the
 * allocator. Blocks still allocated are leaked to the device free (a bug in the caller: logged).
 * NULL is a no-op. */
void ksm_allocator_destroy(ksm_allocator *a);
ksm_device *ksm_allocator_device(const ksm_allocator *a);

/* Allocates size bytes (size 0 gives a valid unique pointer of a 512-byte block) for use on
 * stream. Returns 0, KSM_EINVAL or KSM_EDEVMEM. */
int ksm_alloc_malloc(ksm_allocator *a, size_t size, ksm_stream *stream, void **out);
/* Frees ptr (from ksm_alloc_malloc of this allocator). Returns 0 or KSM_EINVAL for a pointer
 * this allocator did not hand out (nothing is changed then). NULL is a no-op returning 0. */
int ksm_alloc_free(ksm_allocator *a, void *ptr);
/* Marks ptr as used by stream (in addition to its allocation stream). Returns 0 or KSM_EINVAL.
 * The allocator keeps the stream pointer until ksm_alloc_free(ptr), which records an event on
 * it: the stream must not be freed before ptr is. */
int ksm_alloc_record_stream(ksm_allocator *a, void *ptr, ksm_stream *stream);
/* Rounded size of the block holding ptr, or 0 if unknown. */
size_t ksm_alloc_block_size(ksm_allocator *a, const void *ptr);

/* Returns every unused cached segment to the device (after processing completed deferred
 * frees). Allocated blocks are untouched. When there is a segment to give back, the device is
 * synchronized first (counted in num_sync_all_streams): a freed block may still be in use by work
 * queued on its stream before the free. */
int ksm_alloc_empty_cache(ksm_allocator *a);
/* The stream is about to be destroyed: blocks are cached per stream and its id is never used
 * again, so its unused segments go back to the device now (after synchronizing the stream) and
 * its other segments as soon as their last block is freed. Returns 0 or KSM_EINVAL. */
int ksm_alloc_release_stream(ksm_allocator *a, ksm_stream *stream);
/* Changes the memory cap (0 = none). Below the reserved bytes, gives the unused cached segments
 * back as ksm_alloc_empty_cache() does. Returns 0 or KSM_EINVAL. */
int ksm_alloc_set_memory_cap(ksm_allocator *a, size_t cap);

void ksm_alloc_get_stats(ksm_allocator *a, struct ksm_mem_stats *out);
/* Resets every peak to its current value. */
void ksm_alloc_reset_peak_stats(ksm_allocator *a);

#ifdef __cplusplus
}
#endif
