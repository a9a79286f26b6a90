/*
 * Parameter tables: every module (host, seed, gate) declares its tensors by esper state_dict
 * name (relative to the module), shape and initialisation; the model materialises them on a
 * device through the caching allocator, loads and exports them by name.
 *
 * Deterministic initialisation (docs/weights.md#deterministic-initialisation): element i of a
 * parameter named N (full name, e.g. "seed_slots.r0c1.seed.enhance.conv.weight") under seed S takes
 * the counter-based value u = ksm_rand_uniform(S, fnv1a64(N), i) in [0,1) (splitmix64 of the key
 * mixed with the index; see params.c), mapped to the declared distribution. Independent of device
 * and thread count.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/tensor.h"

enum ksm_init {
    KSM_INIT_ZERO = 0,
    KSM_INIT_ONE,
    KSM_INIT_CONST,   /* every element = a */
    KSM_INIT_UNIFORM, /* U(-a, a) (PyTorch Linear/Conv default: a = 1/sqrt(fan_in)) */
    KSM_INIT_NORMAL,  /* N(0, 1) (nn.Embedding default) */
};

#define KSM_PARAM_NAME_MAX 80

struct ksm_param {
    char name[KSM_PARAM_NAME_MAX]; /* relative to the module, e.g. "enhance.conv.weight" */
    ksm_tensor t;                  /* dtype/shape from the declaration; data NULL until
                                    * materialised (then on the model's device, contiguous) */
    enum ksm_init init;
    float init_a;
    bool buffer; /* BatchNorm running stats / num_batches_tracked: not a trainable parameter */
    int tied_to; /* index of the parameter this one aliases (host.head.weight), or -1 */
};

struct ksm_params {
    struct ksm_param *p;
    int n, cap;
};

/* Declares a parameter; returns its index (>= 0) or KSM_ENOMEM / KSM_EINVAL. */
int ksm_params_add(struct ksm_params *ps, const char *name, enum ksm_dtype dtype, int ndim,
                   const int64_t *shape, enum ksm_init init, float init_a, bool buffer);
/* Declares name as an alias of the parameter at index target (shares its memory). */
int ksm_params_add_tied(struct ksm_params *ps, const char *name, int target);
/* Index of name, or -1. */
int ksm_params_find(const struct ksm_params *ps, const char *name);
/* The tensor of parameter i (the target's for a tied one). */
const ksm_tensor *ksm_params_tensor(const struct ksm_params *ps, int i);
/* Trainable element count (buffers and tied aliases excluded). */
int64_t ksm_params_count(const struct ksm_params *ps);
/* Device bytes held (block sizes) after materialisation. */
size_t ksm_params_bytes(const struct ksm_params *ps);

/* Allocates every non-tied parameter from a on stream s and fills it per its init with seed
 * `seed`; full names are prefix + name. Synchronises s. Atomic: on failure nothing stays
 * allocated. */
int ksm_params_materialise(struct ksm_params *ps, ksm_allocator *a, ksm_stream *s, uint64_t seed,
                           const char *prefix);
/* Gives the memory back to a; streams that may still read it are recorded first so it is not
 * reused under them. Leaves the declarations (data NULL). */
void ksm_params_release(struct ksm_params *ps, ksm_allocator *a, ksm_stream *const *users,
                        int n_users);
/* Frees the declarations (memory must have been released). */
void ksm_params_destroy(struct ksm_params *ps);

/* uniform [0,1) for (seed, key, index) */
double ksm_rand_uniform(uint64_t seed, uint64_t key, uint64_t index);
uint64_t ksm_fnv1a64(const char *s);
