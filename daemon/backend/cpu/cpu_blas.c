/* OpenBLAS, loaded at run time (cpu_blas.h). */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_blas.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"

/* From the build (CMakeLists.txt: pkg-config's libdir and the library's SONAME). */
#ifndef KSM_OPENBLAS_SONAME
#define KSM_OPENBLAS_SONAME "libopenblas.so.0"
#endif
#ifndef KSM_OPENBLAS_LIBDIR
#define KSM_OPENBLAS_LIBDIR ""
#endif

#define CORETYPE_ENV    "OPENBLAS_CORETYPE"
#define CORETYPE_AVX512 "SkylakeX"

struct ksm_cpu_blas ksm_cpu_blas;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static int load_rc = KSM_ENOPLUGIN;
static char core[64];
static _Atomic(const char *) loaded_core; /* core, once the load succeeded */

/* AVX-512 F/BW/DQ/VL, with the OS saving the AVX-512 state (libgcc checks XCR0): what
 * OpenBLAS's SkylakeX kernels need. */
static bool cpu_has_avx512(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    return false;
#endif
}

/* dlopen()s OpenBLAS by its soname (the loader's search path, as a link would find it), else
 * from the build's library directory. flags: RTLD_NOW, or with RTLD_NOLOAD to find a copy
 * already loaded. why receives the first dlerror() when nothing could be opened. */
static void *open_blas(int flags, char *why, size_t whylen)
{
    const char *names[2] = {KSM_OPENBLAS_SONAME, NULL};
    char path[4096];
    if (KSM_OPENBLAS_LIBDIR[0] != '\0') {
        const char *dir = KSM_OPENBLAS_LIBDIR;
        size_t n = strlen(dir);
        snprintf(path, sizeof path, "%s%s%s", dir, dir[n - 1] == '/' ? "" : "/",
                 KSM_OPENBLAS_SONAME);
        names[1] = path;
    }
    if (why) why[0] = '\0';
    for (int i = 0; i < 2 && names[i] != NULL; i++) {
        void *h = dlopen(names[i], flags | RTLD_LOCAL);
        if (h != NULL) return h;
        const char *e = dlerror();
        if (why && why[0] == '\0') snprintf(why, whylen, "%s", e ? e : names[i]);
    }
    return NULL;
}

static void load(void)
{
    char why[512];
    /* A copy the process already has (it links OpenBLAS itself) cannot change its core. */
    void *h = open_blas(RTLD_NOW | RTLD_NOLOAD, NULL, 0);
    const bool preloaded = h != NULL;
    const char *user = getenv(CORETYPE_ENV);
    char *saved = user ? strdup(user) : NULL;
    const bool avx512 = cpu_has_avx512();
    const bool force = !preloaded && (user == NULL || user[0] == '\0') && avx512;
    if (user != NULL && saved == NULL) {
        KSM_LOGE("cpu", "cannot load OpenBLAS: out of memory");
        return;
    }
    if (h == NULL) {
        if (force) setenv(CORETYPE_ENV, CORETYPE_AVX512, 1);
        h = open_blas(RTLD_NOW, why, sizeof why);
        if (force) {
            if (saved != NULL)
                setenv(CORETYPE_ENV, saved, 1);
            else
                unsetenv(CORETYPE_ENV);
        }
    }
    if (h == NULL) {
        free(saved);
        KSM_LOGE("cpu",
                 "cannot load OpenBLAS (" KSM_OPENBLAS_SONAME "), which the CPU backend's GEMMs "
                 "need: %s",
                 why);
        return;
    }
    struct ksm_cpu_blas b;
    /* POSIX: dlsym's object pointer converts to a function pointer. */
    *(void **)&b.sgemm = dlsym(h, "cblas_sgemm");
    *(void **)&b.set_num_threads = dlsym(h, "openblas_set_num_threads");
    *(void **)&b.get_corename = dlsym(h, "openblas_get_corename");
    char *(*get_config)(void);
    *(void **)&get_config = dlsym(h, "openblas_get_config");
    if (b.sgemm == NULL || b.set_num_threads == NULL || b.get_corename == NULL) {
        free(saved);
        KSM_LOGE("cpu",
                 "the library loaded as " KSM_OPENBLAS_SONAME " is not OpenBLAS: it lacks %s",
                 b.sgemm == NULL             ? "cblas_sgemm"
                 : b.set_num_threads == NULL ? "openblas_set_num_threads"
                                             : "openblas_get_corename");
        dlclose(h);
        return;
    }
    /* Never dlclose()d: OpenBLAS's threads live as long as the process. */
    ksm_cpu_blas = b;
    const char *name = b.get_corename();
    snprintf(core, sizeof core, "%s", name ? name : "unknown");
    const char *config = get_config ? get_config() : NULL; /* "OpenBLAS 0.3.21 ..." */
    char how[160];
    if (preloaded)
        snprintf(how, sizeof how, "already loaded by the process");
    else if (force)
        snprintf(how, sizeof how, "%s=%s: the CPU has AVX-512", CORETYPE_ENV, CORETYPE_AVX512);
    else if (saved != NULL && saved[0] != '\0')
        snprintf(how, sizeof how, "%s=%s from the environment%s", CORETYPE_ENV, saved,
                 avx512 ? "; this CPU runs the SkylakeX kernels when it is unset" : "");
    else
        snprintf(how, sizeof how, "OpenBLAS's own CPU detection");
    KSM_LOGI("cpu", "%s: sgemm runs the %s kernels (%s)", config ? config : "OpenBLAS", core, how);
    free(saved);
    load_rc = 0;
    atomic_store(&loaded_core, core);
}

int ksm_cpu_blas_load(void)
{
    pthread_once(&load_once, load);
    return load_rc;
}

const char *ksm_cpu_blas_core(void) { return atomic_load(&loaded_core); }
