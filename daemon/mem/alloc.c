/*
 * The caching device allocator (see include/kasmina/alloc.h), after PyTorch's
 * CUDACachingAllocator.
 *
 * Data structures, all guarded by one mutex:
 *   - segments: what ksm_device_malloc returned, in a doubly-linked list. Each segment is tiled
 *     by blocks linked by address (prev/next). A segment belongs to one stream and one pool;
 *     its first block never changes identity (a merge keeps the lower-address block).
 *   - per pool (small, large), a sorted array of the free blocks ordered by (stream id, size,
 *     address): a best-fit search is one lower_bound. Its capacity is kept at least the number
 *     of blocks of the pool, so inserting never fails.
 *   - a hash map (open addressing, linear probing, backward-shift deletion) from pointer to
 *     allocated block, so an unknown pointer is rejected without touching anything.
 *   - the deferred list: blocks freed while other streams may still use them, each with one
 *     event per such stream; they return to the free pool once every event has completed.
 *
 * Block states: FREE (in its pool's free array), ALLOCATED (in the map), PENDING (on the
 * deferred list). Statistics follow PyTorch: allocation/allocated_bytes count ALLOCATED blocks;
 * active/active_bytes count ALLOCATED + PENDING; inactive_split counts FREE blocks of a segment
 * that is split. Net changes per operation are applied, so allocated/freed totals match
 * PyTorch's bookkeeping.
 *
 * Locking: backend calls (event record/query, stream and device synchronize) are made with the
 * allocator's mutex held; host functions running on a stream must therefore not call into the
 * allocator of that stream's device.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend_impl.h"
#include "kasmina/alloc.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"

/* Largest request considered at all: rounding and segment sizing cannot overflow below it. */
#define ALLOC_MAX_REQUEST (SIZE_MAX / 4)

enum block_state { BLOCK_FREE = 0, BLOCK_ALLOCATED, BLOCK_PENDING };

struct stream_use {
    ksm_stream *stream;
    uint64_t id;
    ksm_event *ev; /* recorded at free time; NULL once completed */
};

struct segment;

struct block {
    char *ptr;
    size_t size;
    uint64_t stream_id;
    struct segment *seg;
    struct block *prev, *next; /* address neighbours within the segment */
    enum block_state state;
    struct stream_use *uses; /* streams recorded with ksm_alloc_record_stream */
    int n_uses, cap_uses;
    struct block *link; /* deferred list, or the spare list of unused structs */
};

struct segment {
    char *ptr;
    size_t size;
    enum ksm_pool pool; /* KSM_POOL_SMALL or KSM_POOL_LARGE */
    struct block *first;
    struct segment *prev, *next;
    bool orphan; /* its stream was released: give it back to the device once unused */
};

struct free_set {
    struct block **v;
    size_t n, cap;
    size_t n_blocks; /* blocks of this pool in any state: the capacity v must keep */
};

struct block_map {
    struct block **slots;
    size_t cap, n; /* cap is 0 or a power of two */
};

struct ksm_allocator {
    pthread_mutex_t mu;
    ksm_device *dev;
    size_t cap;
    struct segment *segments;
    struct free_set pools[2]; /* [0] small, [1] large */
    struct block_map active;
    struct block *deferred;
    struct block *spare;
    ksm_event **events; /* pool of unrecorded events for deferred frees */
    size_t n_events, cap_events;
    struct ksm_mem_stats stats;
};

// ---- Statistics ----

static void stat_update(struct ksm_stat *s, int64_t delta)
{
    if (delta == 0) return;
    if (delta > 0)
        s->allocated += delta;
    else
        s->freed += -delta;
    s->current += delta;
    if (s->current > s->peak) s->peak = s->current;
}

#define STAT(a, which, field, delta)                                                               \
    do {                                                                                           \
        stat_update(&(a)->stats.pool[KSM_POOL_ALL].field, (delta));                                \
        stat_update(&(a)->stats.pool[(which)].field, (delta));                                     \
    } while (0)

// ---- Free sets ----

static struct free_set *pool_set(ksm_allocator *a, enum ksm_pool pool)
{
    return &a->pools[pool == KSM_POOL_SMALL ? 0 : 1];
}

static int key_cmp(const struct block *b, uint64_t sid, size_t size, const char *ptr)
{
    if (b->stream_id != sid) return b->stream_id < sid ? -1 : 1;
    if (b->size != size) return b->size < size ? -1 : 1;
    if (b->ptr != ptr) return (uintptr_t)b->ptr < (uintptr_t)ptr ? -1 : 1;
    return 0;
}

/* First index whose block is not less than (sid, size, ptr). */
static size_t set_lower_bound(const struct free_set *fs, uint64_t sid, size_t size, const char *ptr)
{
    size_t lo = 0, hi = fs->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (key_cmp(fs->v[mid], sid, size, ptr) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Makes room for n_blocks + extra blocks. Returns 0 or KSM_ENOMEM. */
static int set_reserve(struct free_set *fs, size_t extra)
{
    size_t need = fs->n_blocks + extra;
    if (need <= fs->cap) return 0;
    size_t ncap = fs->cap ? fs->cap : 64;
    while (ncap < need) ncap *= 2;
    struct block **v = realloc(fs->v, ncap * sizeof *v);
    if (v == NULL) return KSM_ENOMEM;
    fs->v = v;
    fs->cap = ncap;
    return 0;
}

static void set_insert(struct free_set *fs, struct block *b)
{
    KSM_ASSERT(fs->n < fs->cap);
    size_t i = set_lower_bound(fs, b->stream_id, b->size, b->ptr);
    memmove(&fs->v[i + 1], &fs->v[i], (fs->n - i) * sizeof *fs->v);
    fs->v[i] = b;
    fs->n++;
    b->state = BLOCK_FREE;
}

static void set_remove(struct free_set *fs, struct block *b)
{
    size_t i = set_lower_bound(fs, b->stream_id, b->size, b->ptr);
    KSM_ASSERT(i < fs->n && fs->v[i] == b);
    memmove(&fs->v[i], &fs->v[i + 1], (fs->n - i - 1) * sizeof *fs->v);
    fs->n--;
}

/* Best fit: the smallest free block of stream sid with size >= size, or NULL. */
static struct block *set_best_fit(struct free_set *fs, uint64_t sid, size_t size)
{
    size_t i = set_lower_bound(fs, sid, size, NULL);
    if (i < fs->n && fs->v[i]->stream_id == sid) return fs->v[i];
    return NULL;
}

// ---- Pointer map ----

static size_t ptr_hash(const void *p)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    return (size_t)x;
}

static void map_put_slot(struct block_map *m, struct block *b)
{
    size_t mask = m->cap - 1;
    size_t i = ptr_hash(b->ptr) & mask;
    while (m->slots[i] != NULL) i = (i + 1) & mask;
    m->slots[i] = b;
}

/* Ensures one more insert keeps the load at most 1/2. Returns 0 or KSM_ENOMEM. */
static int map_reserve(struct block_map *m)
{
    if ((m->n + 1) * 2 <= m->cap) return 0;
    size_t ncap = m->cap ? m->cap * 2 : 64;
    struct block **slots = calloc(ncap, sizeof *slots);
    if (slots == NULL) return KSM_ENOMEM;
    struct block **old = m->slots;
    size_t ocap = m->cap;
    m->slots = slots;
    m->cap = ncap;
    for (size_t i = 0; i < ocap; i++)
        if (old[i] != NULL) map_put_slot(m, old[i]);
    free(old);
    return 0;
}

static void map_insert(struct block_map *m, struct block *b)
{
    KSM_ASSERT((m->n + 1) * 2 <= m->cap);
    map_put_slot(m, b);
    m->n++;
}

static size_t map_find(const struct block_map *m, const void *ptr)
{
    if (m->cap == 0) return SIZE_MAX;
    size_t mask = m->cap - 1;
    for (size_t i = ptr_hash(ptr) & mask; m->slots[i] != NULL; i = (i + 1) & mask)
        if (m->slots[i]->ptr == ptr) return i;
    return SIZE_MAX;
}

static struct block *map_get(const struct block_map *m, const void *ptr)
{
    size_t i = map_find(m, ptr);
    return i == SIZE_MAX ? NULL : m->slots[i];
}

static struct block *map_remove(struct block_map *m, const void *ptr)
{
    size_t i = map_find(m, ptr);
    if (i == SIZE_MAX) return NULL;
    struct block *b = m->slots[i];
    size_t mask = m->cap - 1;
    /* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
    for (size_t j = (i + 1) & mask; m->slots[j] != NULL; j = (j + 1) & mask) {
        size_t k = ptr_hash(m->slots[j]->ptr) & mask;
        bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (stays) continue;
        m->slots[i] = m->slots[j];
        i = j;
    }
    m->slots[i] = NULL;
    m->n--;
    return b;
}

// ---- Block structs and events ----

static struct block *block_struct_new(ksm_allocator *a)
{
    struct block *b = a->spare;
    if (b != NULL) {
        a->spare = b->link;
        memset(b, 0, sizeof *b);
        return b;
    }
    return calloc(1, sizeof *b);
}

static void block_struct_release(ksm_allocator *a, struct block *b)
{
    free(b->uses);
    b->uses = NULL;
    b->link = a->spare;
    a->spare = b;
}

static ksm_event *event_get(ksm_allocator *a)
{
    if (a->n_events > 0) return a->events[--a->n_events];
    ksm_event *ev = NULL;
    if (ksm_event_new(a->dev, &ev) != 0) return NULL;
    return ev;
}

static void event_put(ksm_allocator *a, ksm_event *ev)
{
    if (a->n_events == a->cap_events) {
        size_t ncap = a->cap_events ? a->cap_events * 2 : 16;
        ksm_event **v = realloc(a->events, ncap * sizeof *v);
        if (v == NULL) {
            ksm_event_free(ev);
            return;
        }
        a->events = v;
        a->cap_events = ncap;
    }
    a->events[a->n_events++] = ev;
}

// ---- Core operations (mutex held) ----

static bool block_is_split(const struct block *b) { return b->prev != NULL || b->next != NULL; }

static void release_segment(ksm_allocator *a, struct segment *seg);

/* Returns an ALLOCATED or PENDING block to its pool, merging it with free neighbours. */
static void free_block(ksm_allocator *a, struct block *b)
{
    enum ksm_pool pool = b->seg->pool;
    struct free_set *fs = pool_set(a, pool);
    int64_t d_bytes = 0, d_count = 0;

    STAT(a, pool, active, -1);
    STAT(a, pool, active_bytes, -(int64_t)b->size);
    free(b->uses);
    b->uses = NULL;
    b->n_uses = b->cap_uses = 0;

    struct block *p = b->prev;
    if (p != NULL && p->state == BLOCK_FREE) {
        set_remove(fs, p);
        d_bytes -= (int64_t)p->size;
        d_count -= 1;
        p->size += b->size;
        p->next = b->next;
        if (b->next != NULL) b->next->prev = p;
        block_struct_release(a, b);
        fs->n_blocks--;
        b = p;
    }
    struct block *n = b->next;
    if (n != NULL && n->state == BLOCK_FREE) {
        set_remove(fs, n);
        d_bytes -= (int64_t)n->size;
        d_count -= 1;
        b->size += n->size;
        b->next = n->next;
        if (n->next != NULL) n->next->prev = b;
        block_struct_release(a, n);
        fs->n_blocks--;
    }
    set_insert(fs, b);
    if (block_is_split(b)) {
        d_bytes += (int64_t)b->size;
        d_count += 1;
    }
    STAT(a, pool, inactive_split_bytes, d_bytes);
    STAT(a, pool, inactive_split, d_count);
    /* A segment whose stream is gone can never be reused: return it as soon as it is unused
     * (its stream was synchronized before it was released, so no queued work can use it). */
    if (b->seg->orphan && b->prev == NULL && b->next == NULL) release_segment(a, b->seg);
}

/* Moves deferred blocks whose events have all completed back to the free pools. */
static void process_events(ksm_allocator *a)
{
    struct block **pp = &a->deferred;
    while (*pp != NULL) {
        struct block *b = *pp;
        bool done = true;
        for (int i = 0; i < b->n_uses; i++) {
            ksm_event *ev = b->uses[i].ev;
            if (ev == NULL) continue;
            if (ksm_event_query(ev) == KSM_ENOTREADY) {
                done = false;
            } else {
                event_put(a, ev);
                b->uses[i].ev = NULL;
            }
        }
        if (done) {
            *pp = b->link;
            b->link = NULL;
            free_block(a, b);
        } else {
            pp = &b->link;
        }
    }
}

static void release_segment(ksm_allocator *a, struct segment *seg)
{
    struct free_set *fs = pool_set(a, seg->pool);
    set_remove(fs, seg->first);
    block_struct_release(a, seg->first);
    fs->n_blocks--;
    ksm_device_free(a->dev, seg->ptr);
    a->stats.num_device_free++;
    STAT(a, seg->pool, segment, -1);
    STAT(a, seg->pool, reserved_bytes, -(int64_t)seg->size);
    if (seg->prev != NULL)
        seg->prev->next = seg->next;
    else
        a->segments = seg->next;
    if (seg->next != NULL) seg->next->prev = seg->prev;
    free(seg);
}

static bool segment_unused(const struct segment *seg)
{
    return seg->first->state == BLOCK_FREE && seg->first->next == NULL;
}

/* Synchronizes the device (and counts it). A FREE block may still be used by work queued on its
 * stream before it was freed (stream-ordered reuse needs no event): its memory can go back to
 * the device only once that work has run. The CPU backend's device free does not synchronize as
 * cudaFree does, so the allocator does. */
static void sync_device(ksm_allocator *a)
{
    a->stats.num_sync_all_streams++;
    (void)ksm_device_synchronize(a->dev);
}

/* Gives every completely free segment back to the device, after synchronizing it unless the
 * caller just did (synced). */
static void release_cached(ksm_allocator *a, bool synced)
{
    if (!synced) {
        struct segment *seg = a->segments;
        while (seg != NULL && !segment_unused(seg)) seg = seg->next;
        if (seg == NULL) return; /* nothing to give back: no need to wait */
        sync_device(a);
    }
    struct segment *seg = a->segments;
    while (seg != NULL) {
        struct segment *next = seg->next;
        if (segment_unused(seg)) release_segment(a, seg);
        seg = next;
    }
}

/* Obtains a new segment of seg_size bytes holding one (not yet pooled) block. Returns 0,
 * KSM_EDEVMEM (cap or device), KSM_EDEVICE or KSM_ENOMEM. */
static int alloc_segment(ksm_allocator *a, enum ksm_pool pool, uint64_t sid, size_t seg_size,
                         struct block **out)
{
    uint64_t reserved = (uint64_t)a->stats.pool[KSM_POOL_ALL].reserved_bytes.current;
    if (a->cap != 0 && (seg_size > a->cap || reserved > a->cap - seg_size)) return KSM_EDEVMEM;
    struct free_set *fs = pool_set(a, pool);
    if (set_reserve(fs, 2) != 0) return KSM_ENOMEM; /* the block and a split remainder */
    struct segment *seg = calloc(1, sizeof *seg);
    if (seg == NULL) return KSM_ENOMEM;
    struct block *b = block_struct_new(a);
    if (b == NULL) {
        free(seg);
        return KSM_ENOMEM;
    }
    void *p = NULL;
    int rc = ksm_device_malloc(a->dev, seg_size, &p);
    if (rc != 0) {
        block_struct_release(a, b);
        free(seg);
        return rc == KSM_EDEVICE ? KSM_EDEVICE : KSM_EDEVMEM;
    }
    a->stats.num_device_alloc++;
    STAT(a, pool, segment, 1);
    STAT(a, pool, reserved_bytes, (int64_t)seg_size);
    seg->ptr = p;
    seg->size = seg_size;
    seg->pool = pool;
    seg->first = b;
    seg->next = a->segments;
    if (a->segments != NULL) a->segments->prev = seg;
    a->segments = seg;
    b->ptr = p;
    b->size = seg_size;
    b->stream_id = sid;
    b->seg = seg;
    b->state = BLOCK_ALLOCATED; /* not in the free set; take_block makes it so properly */
    fs->n_blocks++;
    *out = b;
    return 0;
}

static bool should_split(enum ksm_pool pool, size_t remaining)
{
    if (pool == KSM_POOL_SMALL) return remaining >= KSM_ALLOC_ROUND;
    return remaining > KSM_ALLOC_SMALL_SIZE;
}

/* Hands out b (FREE, or fresh from alloc_segment) for a request of size bytes (rounded),
 * splitting off the remainder when it is worth keeping. */
static void take_block(ksm_allocator *a, struct block *b, size_t size, bool pooled)
{
    enum ksm_pool pool = b->seg->pool;
    struct free_set *fs = pool_set(a, pool);
    int64_t d_bytes = 0, d_count = 0;
    if (pooled) {
        set_remove(fs, b);
        if (block_is_split(b)) {
            d_bytes -= (int64_t)b->size;
            d_count -= 1;
        }
    }
    size_t remaining = b->size - size;
    if (should_split(pool, remaining) && set_reserve(fs, 1) == 0) {
        struct block *r = block_struct_new(a);
        if (r != NULL) {
            r->ptr = b->ptr + size;
            r->size = remaining;
            r->stream_id = b->stream_id;
            r->seg = b->seg;
            r->prev = b;
            r->next = b->next;
            if (b->next != NULL) b->next->prev = r;
            b->next = r;
            b->size = size;
            fs->n_blocks++;
            set_insert(fs, r);
            d_bytes += (int64_t)remaining;
            d_count += 1;
        }
    }
    b->state = BLOCK_ALLOCATED;
    STAT(a, pool, inactive_split_bytes, d_bytes);
    STAT(a, pool, inactive_split, d_count);
    STAT(a, pool, allocation, 1);
    STAT(a, pool, allocated_bytes, (int64_t)b->size);
    STAT(a, pool, active, 1);
    STAT(a, pool, active_bytes, (int64_t)b->size);
}

// ---- Public API ----

int ksm_allocator_new(ksm_device *dev, const struct ksm_alloc_config *cfg, ksm_allocator **out)
{
    if (dev == NULL || out == NULL) return KSM_EINVAL;
    ksm_allocator *a = calloc(1, sizeof *a);
    if (a == NULL) return KSM_ENOMEM;
    if (pthread_mutex_init(&a->mu, NULL) != 0) {
        free(a);
        return KSM_ENOMEM;
    }
    a->dev = dev;
    a->cap = cfg != NULL ? cfg->memory_cap : 0;
    *out = a;
    return 0;
}

void ksm_allocator_destroy(ksm_allocator *a)
{
    if (a == NULL) return;
    pthread_mutex_lock(&a->mu);
    /* Pending deferred frees: wait for their streams, then pool them. */
    while (a->deferred != NULL) {
        struct block *b = a->deferred;
        a->deferred = b->link;
        b->link = NULL;
        for (int i = 0; i < b->n_uses; i++) {
            if (b->uses[i].ev == NULL) continue;
            ksm_event_synchronize(b->uses[i].ev);
            event_put(a, b->uses[i].ev);
            b->uses[i].ev = NULL;
        }
        free_block(a, b);
    }
    /* Freed blocks may still be used by work queued on their streams. */
    if (a->segments != NULL) sync_device(a);
    size_t leaked = 0, leaked_bytes = 0;
    while (a->segments != NULL) {
        struct segment *seg = a->segments;
        a->segments = seg->next;
        for (struct block *b = seg->first; b != NULL;) {
            struct block *next = b->next;
            if (b->state != BLOCK_FREE) {
                leaked++;
                leaked_bytes += b->size;
            }
            free(b->uses);
            free(b);
            b = next;
        }
        ksm_device_free(a->dev, seg->ptr);
        free(seg);
    }
    if (leaked != 0)
        KSM_LOGE("alloc", "%s: allocator freed with %zu live block(s), %zu bytes", a->dev->name,
                 leaked, leaked_bytes);
    for (size_t i = 0; i < a->n_events; i++) ksm_event_free(a->events[i]);
    free(a->events);
    while (a->spare != NULL) {
        struct block *b = a->spare;
        a->spare = b->link;
        free(b);
    }
    free(a->pools[0].v);
    free(a->pools[1].v);
    free(a->active.slots);
    pthread_mutex_unlock(&a->mu);
    pthread_mutex_destroy(&a->mu);
    free(a);
}

ksm_device *ksm_allocator_device(const ksm_allocator *a) { return a ? a->dev : NULL; }

/* The size of a new segment for a (rounded) request that no free block of its stream fits.
 * Large-pool segments are the request rounded up to 2 MiB: a segment is only made when nothing
 * cached fits, so a bigger one (PyTorch's 20 MiB for requests below 10 MiB) would stay partly
 * unused in a steady state whose blocks all have their own segment. */
static size_t segment_size_for(size_t size)
{
    if (size <= KSM_ALLOC_SMALL_SIZE) return KSM_ALLOC_SMALL_SEGMENT;
    return (size + KSM_ALLOC_ROUND_LARGE - 1) / KSM_ALLOC_ROUND_LARGE * KSM_ALLOC_ROUND_LARGE;
}

int ksm_alloc_malloc(ksm_allocator *a, size_t size, ksm_stream *stream, void **out)
{
    if (a == NULL || out == NULL) return KSM_EINVAL;
    if (stream != NULL && ksm_stream_device(stream) != a->dev) return KSM_EINVAL;
    if (size > ALLOC_MAX_REQUEST) {
        pthread_mutex_lock(&a->mu);
        a->stats.num_ooms++;
        pthread_mutex_unlock(&a->mu);
        return KSM_EDEVMEM;
    }
    size_t rsize = size == 0 ? KSM_ALLOC_ROUND
                             : (size + KSM_ALLOC_ROUND - 1) / KSM_ALLOC_ROUND * KSM_ALLOC_ROUND;
    enum ksm_pool pool = rsize <= KSM_ALLOC_SMALL_SIZE ? KSM_POOL_SMALL : KSM_POOL_LARGE;
    size_t seg_size = segment_size_for(rsize);
    uint64_t sid = stream != NULL ? ksm_stream_id(stream) : 0;
    struct free_set *fs = pool_set(a, pool);

    pthread_mutex_lock(&a->mu);
    int rc = map_reserve(&a->active);
    if (rc != 0) goto out_unlock;
    process_events(a);

    bool pooled = true;
    struct block *b = set_best_fit(fs, sid, rsize);
    if (b == NULL) {
        pooled = false;
        rc = alloc_segment(a, pool, sid, seg_size, &b);
        if (rc == KSM_EDEVMEM) {
            /* Flush and retry once: wait for every stream so that all deferred frees complete,
             * then give the cached segments back and try again. */
            a->stats.num_alloc_retries++;
            sync_device(a);
            process_events(a);
            release_cached(a, true);
            b = set_best_fit(fs, sid, rsize);
            pooled = b != NULL;
            if (b == NULL) rc = alloc_segment(a, pool, sid, seg_size, &b);
        }
        if (b == NULL) {
            if (rc == KSM_EDEVMEM) {
                a->stats.num_ooms++;
                KSM_LOGW("alloc",
                         "%s: out of memory allocating %zu bytes (reserved %" PRId64 ", cap %zu)",
                         a->dev->name, rsize, a->stats.pool[KSM_POOL_ALL].reserved_bytes.current,
                         a->cap);
            }
            goto out_unlock;
        }
    }
    if (pooled) a->stats.cache_hits++;
    take_block(a, b, rsize, pooled);
    map_insert(&a->active, b);
    *out = b->ptr;
    rc = 0;
out_unlock:
    pthread_mutex_unlock(&a->mu);
    return rc;
}

int ksm_alloc_free(ksm_allocator *a, void *ptr)
{
    if (ptr == NULL) return 0;
    if (a == NULL) return KSM_EINVAL;
    pthread_mutex_lock(&a->mu);
    struct block *b = map_remove(&a->active, ptr);
    if (b == NULL) {
        pthread_mutex_unlock(&a->mu);
        return KSM_EINVAL;
    }
    enum ksm_pool pool = b->seg->pool;
    STAT(a, pool, allocation, -1);
    STAT(a, pool, allocated_bytes, -(int64_t)b->size);

    int pending = 0;
    for (int i = 0; i < b->n_uses; i++) {
        struct stream_use *u = &b->uses[i];
        ksm_event *ev = event_get(a);
        if (ev != NULL && ksm_event_record(ev, u->stream) == 0) {
            u->ev = ev;
            pending++;
            continue;
        }
        /* No event to be had (or the stream failed): wait for the stream's work instead. */
        if (ev != NULL) event_put(a, ev);
        (void)ksm_stream_synchronize(u->stream);
        u->ev = NULL;
    }
    if (pending > 0) {
        b->state = BLOCK_PENDING;
        b->link = a->deferred;
        a->deferred = b;
        a->stats.deferred_frees++;
    } else {
        free_block(a, b);
    }
    pthread_mutex_unlock(&a->mu);
    return 0;
}

int ksm_alloc_record_stream(ksm_allocator *a, void *ptr, ksm_stream *stream)
{
    if (a == NULL || ptr == NULL || stream == NULL) return KSM_EINVAL;
    if (ksm_stream_device(stream) != a->dev) return KSM_EINVAL;
    uint64_t sid = ksm_stream_id(stream);
    int rc = 0;
    pthread_mutex_lock(&a->mu);
    struct block *b = map_get(&a->active, ptr);
    if (b == NULL) {
        rc = KSM_EINVAL;
        goto out_unlock;
    }
    if (b->stream_id == sid) goto out_unlock;
    for (int i = 0; i < b->n_uses; i++)
        if (b->uses[i].id == sid) goto out_unlock;
    if (b->n_uses == b->cap_uses) {
        int ncap = b->cap_uses ? b->cap_uses * 2 : 2;
        struct stream_use *u = realloc(b->uses, (size_t)ncap * sizeof *u);
        if (u == NULL) {
            rc = KSM_ENOMEM;
            goto out_unlock;
        }
        b->uses = u;
        b->cap_uses = ncap;
    }
    b->uses[b->n_uses++] = (struct stream_use){.stream = stream, .id = sid, .ev = NULL};
out_unlock:
    pthread_mutex_unlock(&a->mu);
    return rc;
}

size_t ksm_alloc_block_size(ksm_allocator *a, const void *ptr)
{
    if (a == NULL || ptr == NULL) return 0;
    pthread_mutex_lock(&a->mu);
    struct block *b = map_get(&a->active, ptr);
    size_t size = b != NULL ? b->size : 0;
    pthread_mutex_unlock(&a->mu);
    return size;
}

int ksm_alloc_release_stream(ksm_allocator *a, ksm_stream *stream)
{
    if (a == NULL || stream == NULL) return KSM_EINVAL;
    uint64_t sid = ksm_stream_id(stream);
    pthread_mutex_lock(&a->mu);
    process_events(a);
    bool any = false;
    for (struct segment *seg = a->segments; seg != NULL; seg = seg->next) {
        if (seg->first->stream_id != sid) continue;
        seg->orphan = true;
        any |= segment_unused(seg);
    }
    if (any) {
        (void)ksm_stream_synchronize(stream); /* free blocks may back work still queued */
        struct segment *seg = a->segments;
        while (seg != NULL) {
            struct segment *next = seg->next;
            if (seg->orphan && segment_unused(seg)) release_segment(a, seg);
            seg = next;
        }
    }
    pthread_mutex_unlock(&a->mu);
    return 0;
}

int ksm_alloc_empty_cache(ksm_allocator *a)
{
    if (a == NULL) return KSM_EINVAL;
    pthread_mutex_lock(&a->mu);
    process_events(a);
    release_cached(a, false);
    pthread_mutex_unlock(&a->mu);
    return 0;
}

int ksm_alloc_set_memory_cap(ksm_allocator *a, size_t cap)
{
    if (a == NULL) return KSM_EINVAL;
    pthread_mutex_lock(&a->mu);
    a->cap = cap;
    /* Above the new cap: give back what is cached now; in-use segments stay until freed. */
    if (cap != 0 && (uint64_t)a->stats.pool[KSM_POOL_ALL].reserved_bytes.current > cap) {
        process_events(a);
        release_cached(a, false);
    }
    pthread_mutex_unlock(&a->mu);
    return 0;
}

void ksm_alloc_get_stats(ksm_allocator *a, struct ksm_mem_stats *out)
{
    if (out == NULL) return;
    memset(out, 0, sizeof *out);
    if (a == NULL) return;
    size_t free_bytes = 0, total_bytes = 0;
    int rc = ksm_device_mem_info(a->dev, &free_bytes, &total_bytes);
    pthread_mutex_lock(&a->mu);
    *out = a->stats;
    out->memory_cap_bytes = a->cap;
    pthread_mutex_unlock(&a->mu);
    out->total_bytes = rc == 0 ? total_bytes : 0;
}

void ksm_alloc_reset_peak_stats(ksm_allocator *a)
{
    if (a == NULL) return;
    pthread_mutex_lock(&a->mu);
    for (int p = 0; p < KSM_POOL_COUNT; p++) {
        struct ksm_stat *s = (struct ksm_stat *)&a->stats.pool[p];
        size_t n = sizeof a->stats.pool[p] / sizeof *s;
        for (size_t i = 0; i < n; i++) s[i].peak = s[i].current;
    }
    pthread_mutex_unlock(&a->mu);
}
