/* Parameter tables: declaration, deterministic initialisation, device materialisation. */
#include "kasmina/params.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"

uint64_t ksm_fnv1a64(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Counter-based: the value depends only on (seed, key, index). 53 random bits -> [0,1). */
double ksm_rand_uniform(uint64_t seed, uint64_t key, uint64_t index)
{
    uint64_t x = splitmix64(splitmix64(seed ^ 0x6b61736d696e61ull) ^ key);
    x = splitmix64(x ^ (index * 0xd1342543de82ef95ull));
    return (double)(x >> 11) * (1.0 / 9007199254740992.0);
}

int ksm_params_add(struct ksm_params *ps, const char *name, enum ksm_dtype dtype, int ndim,
                   const int64_t *shape, enum ksm_init init, float init_a, bool buffer)
{
    if (name == NULL || strlen(name) >= KSM_PARAM_NAME_MAX || ksm_params_find(ps, name) >= 0)
        return KSM_EINVAL;
    if (ps->n == ps->cap) {
        int cap = ps->cap ? 2 * ps->cap : 16;
        struct ksm_param *p = realloc(ps->p, (size_t)cap * sizeof *p);
        if (p == NULL) return KSM_ENOMEM;
        ps->p = p;
        ps->cap = cap;
    }
    struct ksm_param *p = &ps->p[ps->n];
    memset(p, 0, sizeof *p);
    int rc = ksm_tensor_init(&p->t, NULL, NULL, dtype, ndim, shape);
    if (rc < 0) return rc;
    strcpy(p->name, name);
    p->init = init;
    p->init_a = init_a;
    p->buffer = buffer;
    p->tied_to = -1;
    return ps->n++;
}

int ksm_params_add_tied(struct ksm_params *ps, const char *name, int target)
{
    if (target < 0 || target >= ps->n || ps->p[target].tied_to >= 0) return KSM_EINVAL;
    const ksm_tensor t = ps->p[target].t; /* a copy: adding may move ps->p (realloc) */
    int i = ksm_params_add(ps, name, t.dtype, t.ndim, t.shape, KSM_INIT_ZERO, 0, false);
    if (i < 0) return i;
    ps->p[i].tied_to = target;
    return i;
}

int ksm_params_find(const struct ksm_params *ps, const char *name)
{
    for (int i = 0; i < ps->n; i++)
        if (strcmp(ps->p[i].name, name) == 0) return i;
    return -1;
}

const ksm_tensor *ksm_params_tensor(const struct ksm_params *ps, int i)
{
    const struct ksm_param *p = &ps->p[i];
    return p->tied_to >= 0 ? &ps->p[p->tied_to].t : &p->t;
}

int64_t ksm_params_count(const struct ksm_params *ps)
{
    int64_t n = 0;
    for (int i = 0; i < ps->n; i++)
        if (!ps->p[i].buffer && ps->p[i].tied_to < 0) n += ksm_tensor_numel(&ps->p[i].t);
    return n;
}

size_t ksm_params_bytes(const struct ksm_params *ps)
{
    size_t n = 0;
    for (int i = 0; i < ps->n; i++)
        if (ps->p[i].tied_to < 0 && ps->p[i].t.data != NULL)
            n += (ksm_tensor_nbytes(&ps->p[i].t) + KSM_ALLOC_ROUND - 1) / KSM_ALLOC_ROUND *
                 KSM_ALLOC_ROUND;
    return n;
}

static void fill_host(const struct ksm_param *p, void *dst, uint64_t seed, uint64_t key)
{
    int64_t n = ksm_tensor_numel(&p->t);
    if (p->t.dtype == KSM_DTYPE_I64) {
        int64_t *d = dst;
        for (int64_t i = 0; i < n; i++)
            d[i] = p->init == KSM_INIT_ONE ? 1 : p->init == KSM_INIT_CONST ? (int64_t)p->init_a : 0;
        return;
    }
    float *d = dst; /* declarations are F32 (checked in materialise) */
    for (int64_t i = 0; i < n; i++) {
        switch (p->init) {
        case KSM_INIT_ZERO: d[i] = 0.0f; break;
        case KSM_INIT_ONE: d[i] = 1.0f; break;
        case KSM_INIT_CONST: d[i] = p->init_a; break;
        case KSM_INIT_UNIFORM: {
            double u = ksm_rand_uniform(seed, key, (uint64_t)i);
            d[i] = (float)((2.0 * u - 1.0) * p->init_a);
            break;
        }
        case KSM_INIT_NORMAL: {
            /* Box-Muller on two independent counters; u1 in (0,1]. */
            double u1 = 1.0 - ksm_rand_uniform(seed, key, 2 * (uint64_t)i);
            double u2 = ksm_rand_uniform(seed, key, 2 * (uint64_t)i + 1);
            d[i] = (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
            break;
        }
        }
    }
}

/* Staging offsets stay 8-byte aligned: an I64 tensor after an odd count of F32 values. */
static size_t staging_bytes(size_t nb) { return (nb + 7) & ~(size_t)7; }

int ksm_params_materialise(struct ksm_params *ps, ksm_allocator *a, ksm_stream *s, uint64_t seed,
                           const char *prefix)
{
    size_t total = 0;
    for (int i = 0; i < ps->n; i++) {
        const struct ksm_param *p = &ps->p[i];
        if (p->tied_to >= 0) continue;
        if (p->t.dtype != KSM_DTYPE_F32 && p->t.dtype != KSM_DTYPE_I64) return KSM_EDTYPE;
        total += staging_bytes(ksm_tensor_nbytes(&p->t));
    }
    char *host = malloc(total ? total : 1);
    if (host == NULL) return KSM_ENOMEM;
    ksm_device *dev = ksm_stream_device(s);
    size_t off = 0;
    int rc = 0, i;
    char full[256];
    for (i = 0; i < ps->n; i++) {
        struct ksm_param *p = &ps->p[i];
        if (p->tied_to >= 0) continue;
        size_t nb = ksm_tensor_nbytes(&p->t);
        void *d = NULL;
        rc = ksm_alloc_malloc(a, nb ? nb : 1, s, &d);
        if (rc < 0) break;
        p->t.data = d;
        p->t.dev = dev;
        snprintf(full, sizeof full, "%s%s", prefix ? prefix : "", p->name);
        fill_host(p, host + off, seed, ksm_fnv1a64(full));
        if (nb) rc = ksm_stream_memcpy_async(s, d, host + off, nb, KSM_COPY_H2D);
        off += staging_bytes(nb);
        if (rc < 0) {
            i++;
            break;
        }
    }
    int rc2 = ksm_stream_synchronize(s);
    if (rc == 0) rc = rc2;
    free(host);
    if (rc < 0) {
        ksm_params_release(ps, a, NULL, 0);
        return rc;
    }
    for (i = 0; i < ps->n; i++)
        if (ps->p[i].tied_to >= 0) ps->p[i].t = ps->p[ps->p[i].tied_to].t;
    return 0;
}

void ksm_params_release(struct ksm_params *ps, ksm_allocator *a, ksm_stream *const *users,
                        int n_users)
{
    for (int i = 0; i < ps->n; i++) {
        struct ksm_param *p = &ps->p[i];
        if (p->tied_to < 0 && p->t.data != NULL) {
            for (int u = 0; u < n_users; u++) ksm_alloc_record_stream(a, p->t.data, users[u]);
            ksm_alloc_free(a, p->t.data);
        }
        p->t.data = NULL;
        p->t.dev = NULL;
    }
}

void ksm_params_destroy(struct ksm_params *ps)
{
    free(ps->p);
    ps->p = NULL;
    ps->n = ps->cap = 0;
}
