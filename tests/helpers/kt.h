/*
 * Test helpers shared by the C suites (ksm_test_helpers; "kt" for kasmina tests). Every helper
 * asserts (Criterion) on failure, naming what it was doing, so a test reads as its checks.
 *
 *   engine:  kt_engine_new(&cfg), kt_engine_cpu(n), kt_model_new(e, id, KT_CNN(...))
 *   goldens: kt_golden_open(file), kt_golden_need(f, name), kt_golden_floats(t),
 *            kt_golden_host_tensor(t, &x), kt_diff_f32(got, ref, n),
 *            kt_golden_expect_f32(what, got, ref, n, tol), kt_golden_cases(files, ...)
 *   files:   kt_tmpdir(tag), kt_rmtree(path), kt_read_file(path, &len)
 */
#pragma once

#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdint.h>

#include "kasmina/kasmina.h"
#include "kasmina/safetensors.h"

/* ---- engine fixture ---- */

/* ksm_engine_new(cfg), asserted (the message carries the engine's error text). */
ksm_engine *kt_engine_new(const struct ksm_engine_config *cfg);
/* An engine with n CPU devices and nothing else configured. */
ksm_engine *kt_engine_cpu(int n);
/* ksm_engine_model_create(e, id, &spec), asserted; the caller unrefs the model. */
ksm_model *kt_model_new(ksm_engine *e, const char *id, struct ksm_model_spec spec);
/* Compact model specs: KT_CNN(.cnn = {.base_channels = 8}, .init_seed = 7). */
#define KT_CNN(...) ((struct ksm_model_spec){.topology = KSM_TOPOLOGY_CNN, __VA_ARGS__})
#define KT_TF(...)  ((struct ksm_model_spec){.topology = KSM_TOPOLOGY_TRANSFORMER, __VA_ARGS__})
/* The small transformer host the suites share (vocab 97, width 48, 6 heads, 3 layers, 32
 * positions, 3 segments): KT_TF(.transformer = KT_SMALL_TF, .init_seed = 3). */
#define KT_SMALL_TF                                                                                \
    {                                                                                              \
        .vocab_size = 97, .n_embd = 48, .n_head = 6, .n_layer = 3, .block_size = 32,               \
        .num_segments = 3                                                                          \
    }

/* ---- goldens (tests/golden, KSM_GOLDEN_DIR) ---- */

/* Opens KSM_GOLDEN_DIR/file (file may have a subdirectory: "kasmina/x.io.safetensors"). */
ksm_st_file *kt_golden_open(const char *file);
/* The tensor name of f, asserted present. */
const struct ksm_st_tensor *kt_golden_need(ksm_st_file *f, const char *name);
/* A malloc'd copy of an F32 tensor's data (asserted F32). */
float *kt_golden_floats(const struct ksm_st_tensor *t);
/* *x = a host tensor over a malloc'd copy of t (free(x->data)). */
void kt_golden_host_tensor(const struct ksm_st_tensor *t, ksm_tensor *x);

/* got against ref over n floats: rel = max|got - ref| / max|ref| (max|ref| 0 counts as 1) over
 * the positions where both are finite; nonfinite counts positions where either is NaN or
 * infinite and they differ (any NaN matches any NaN; an infinity only itself); worst is the
 * index of the largest |d| (or of the first non-finite mismatch), with its values. */
struct kt_diff {
    double rel, max_d, max_ref;
    int64_t worst, nonfinite;
    double got, ref;
};
struct kt_diff kt_diff_f32(const float *got, const float *ref, int64_t n);
/* cr_expect that got matches ref (rel <= tol, no non-finite mismatch); on failure the message
 * names what and the worst element. Returns rel (+inf on a non-finite mismatch). */
double kt_golden_expect_f32(const char *what, const float *got, const float *ref, int64_t n,
                            double tol);

/* One fixture case of a ParameterizedTest: the golden file, the case's name, and the "op=" of
 * its description when it has one. Fixed arrays: the parameters live in Criterion's shared
 * memory (cr_malloc), which pointers into the parent's heap would not survive. */
struct kt_golden_case {
    char file[96];
    char name[96];
    char op[32];
};
/* Every case named in the "cases" metadata (a comma list) of each golden file in files (NULL
 * ends the list), in file order: the parameters of a ParameterizedTest. A file that does not
 * open gives no cases (the suites' count tests then fail). */
struct criterion_test_params kt_golden_cases(const char *const *files);
/* Every KSM_GOLDEN_DIR/dir/<name><suffix> file as a case (file = dir, name = <name>), sorted. */
struct criterion_test_params kt_golden_dir_cases(const char *dir, const char *suffix);
/* How many cases kt_golden_dir_cases() gives (counts only: usable inside a test). */
int kt_golden_dir_count(const char *dir, const char *suffix);
/* How many cases kt_golden_cases() gives for files with op (NULL: any op). */
int kt_golden_count(const char *const *files, const char *op);

/* ---- files ---- */

/* A fresh empty directory $TMPDIR/ksm-<tag>-XXXXXX (TMPDIR unset: /tmp); free with kt_rmtree()
 * and free(). */
char *kt_tmpdir(const char *tag);
/* Removes path and everything under it (links are removed, not followed); asserted. */
void kt_rmtree(const char *path);
/* The whole file, malloc'd (one spare byte); *len its size. */
void *kt_read_file(const char *path, size_t *len);
