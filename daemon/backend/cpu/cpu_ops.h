/*
 * CPU op kernels: synchronous execution of one validated op descriptor on host memory.
 * The CPU backend's stream workers call this; the GPU conformance suite uses the CPU backend as
 * its oracle.
 */
#pragma once

#include "nn/op.h"

/* Executes op on the calling thread. op has been validated by ops.c (see nn/op.h for the
 * invariants). Returns 0, or KSM_EUNSUPPORTED for an op/dtype combination without a kernel. */
int ksm_cpu_op_exec(const struct ksm_op *op);
