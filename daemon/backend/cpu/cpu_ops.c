/* CPU op kernels: the dispatch from an op descriptor to its family (cpu_ops_impl.h). */
#include "backend/cpu/cpu_ops_impl.h"

int ksm_cpu_op_exec(const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_COPY:
    case KSM_OP_FILL:
    case KSM_OP_UNARY:
    case KSM_OP_BINARY:
    case KSM_OP_LERP: return ksm_cpu_exec_elementwise(op);
    case KSM_OP_GEMM: return ksm_cpu_exec_gemm(op);
    case KSM_OP_LINEAR: return ksm_cpu_exec_linear(op);
    case KSM_OP_CONV2D: return ksm_cpu_exec_conv2d(op);
    case KSM_OP_BATCHNORM: return ksm_cpu_exec_batchnorm(op);
    case KSM_OP_GROUPNORM: return ksm_cpu_exec_groupnorm(op);
    case KSM_OP_LAYERNORM: return ksm_cpu_exec_layernorm(op);
    case KSM_OP_SOFTMAX: return ksm_cpu_exec_softmax(op);
    case KSM_OP_SDPA: return ksm_cpu_exec_sdpa(op);
    case KSM_OP_EMBEDDING: return ksm_cpu_exec_embedding(op);
    case KSM_OP_MEAN: return ksm_cpu_exec_mean(op);
    case KSM_OP_MAXPOOL2: return ksm_cpu_exec_maxpool2(op);
    case KSM_OP_CROSS_ENTROPY: return ksm_cpu_exec_cross_entropy(op);
    case KSM_OP_ARGMAX: return ksm_cpu_exec_argmax(op);
    /* ---- optimizer ---- */
    case KSM_OP_SGD: return ksm_cpu_exec_sgd(op);
    case KSM_OP_SUMSQ: return ksm_cpu_exec_sumsq(op);
    case KSM_OP_SCALE: return ksm_cpu_exec_scale(op);
    /* ---- backward: elementwise, linear, reductions, losses ---- */
    case KSM_OP_UNARY_BACKWARD:
    case KSM_OP_BROADCAST_GRAD:
    case KSM_OP_SUM_ROWS:
    case KSM_OP_MEAN_BACKWARD:
    case KSM_OP_MAXPOOL2_BACKWARD:
    case KSM_OP_EMBEDDING_BACKWARD:
    case KSM_OP_CROSS_ENTROPY_BACKWARD: return ksm_cpu_exec_backward(op);
    /* ---- backward: norms, convolution, attention ---- */
    case KSM_OP_BATCHNORM_TRAIN: return ksm_cpu_exec_batchnorm_train(op);
    case KSM_OP_BATCHNORM_BACKWARD: return ksm_cpu_exec_batchnorm_backward(op);
    case KSM_OP_GROUPNORM_BACKWARD: return ksm_cpu_exec_groupnorm_backward(op);
    case KSM_OP_LAYERNORM_BACKWARD: return ksm_cpu_exec_layernorm_backward(op);
    case KSM_OP_CONV2D_BACKWARD: return ksm_cpu_exec_conv2d_backward(op);
    case KSM_OP_SDPA_BACKWARD: return ksm_cpu_exec_sdpa_backward(op);
    /* ---- training ---- */
    case KSM_OP_DROPOUT: return ksm_cpu_exec_dropout(op);
    default: return KSM_EUNSUPPORTED;
    }
}
