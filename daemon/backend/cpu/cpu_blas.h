/*
 * OpenBLAS, loaded at run time by the CPU backend.
 *
 * The engine does not link OpenBLAS: ksm_cpu_blas_load() dlopen()s it (its soname, then the
 * library directory pkg-config gave at configure time) and resolves the three functions the
 * backend calls. Loading at run time lets the backend choose the kernels: a DYNAMIC_ARCH
 * OpenBLAS picks its kernel set ("core") once, in its load-time constructor, from
 * $OPENBLAS_CORETYPE or from its own CPU detection, which falls back to older kernels on a CPU
 * newer than the OpenBLAS release. Its AVX2 (Haswell) sgemm runs at about two thirds of the
 * single-thread speed of its AVX-512 (SkylakeX) one. So when OPENBLAS_CORETYPE is unset (or
 * empty) and the CPU has AVX-512 F/BW/DQ/VL, the loader sets it to "SkylakeX" around the
 * dlopen() and restores the environment afterwards (OpenBLAS's later AVX-512 cores, Cooperlake
 * and SapphireRapids, add bf16 kernels only: their sgemm is SkylakeX's). A value the user set
 * is always honoured. If the process has OpenBLAS loaded already (a program that links it
 * itself), that copy is used as it is: its core was chosen when it was loaded.
 *
 * cpu_ops.c includes this header instead of <cblas.h>; its cblas_sgemm calls then go through
 * the loaded library's function (the macro below).
 */
#pragma once

#include <cblas.h>

struct ksm_cpu_blas {
    void (*sgemm)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, blasint m,
                  blasint n, blasint k, float alpha, const float *a, blasint lda, const float *b,
                  blasint ldb, float beta, float *c, blasint ldc);
    void (*set_num_threads)(int n);
    char *(*get_corename)(void);
};

/* Filled by a successful ksm_cpu_blas_load(); read-only afterwards. */
extern struct ksm_cpu_blas ksm_cpu_blas;

/* Loads OpenBLAS, once per process (later calls return the first call's result), and logs the
 * core it runs at info level. Returns 0, or KSM_ENOPLUGIN (logged with dlopen's reason) when no
 * OpenBLAS can be loaded or it lacks one of the functions. Thread-safe; the first call
 * changes the process environment for the duration of the dlopen(), so make it before other
 * threads read the environment (ksm_cpu_backend_new() makes it). */
int ksm_cpu_blas_load(void);

/* The OpenBLAS core in use ("SkylakeX", "Haswell", ...), or NULL before a successful load
 * (it loads nothing). */
const char *ksm_cpu_blas_core(void);

#define cblas_sgemm ksm_cpu_blas.sgemm
