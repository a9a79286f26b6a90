/*
 * Fault injection from a spec string, for tests and kasminad_faults (the test build of the daemon):
 * "mem-limit=BYTES,fail-malloc-nth=N,sticky-after-launches=N" makes a CPU backend of one device
 * and wraps its cpu:0 in a fault-injecting device "fake:0" (fake_backend.h), armed as the spec
 * says. Pass *fake as ksm_engine_config.backend (its device becomes the engine's default); free
 * *fake, then *cpu, after the engine.
 */
#pragma once

#include <stddef.h>

#include "kasmina/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

int ksm_test_faults_new(const char *spec, ksm_backend **cpu, ksm_backend **fake, char *err,
                        size_t errlen);

#ifdef __cplusplus
}
#endif
