/*
 * Host networks (docs/models.md#cnnhost CNNHost, docs/models.md TransformerHost): parameters by
 * esper state_dict names relative to "host.", injection points, and segment routing. Eval mode only
 * (BatchNorm uses running statistics; dropout is the identity), so every op is per-sample.
 *
 * Boundaries are numbered in execution order: boundary k is the point right after the op that
 * produces injection point exec_index k (CNN: r0c0=0, r1c0=1, r0c1=2, ...; transformer r0c{i}=i).
 * -1 is the network input.
 */
#pragma once

#include "kasmina/kasmina.h"
#include "kasmina/exec.h"
#include "kasmina/params.h"

typedef struct ksm_host ksm_host;

enum ksm_surface { KSM_SURFACE_BLOCK_END = 0, KSM_SURFACE_PRE_POOL = 1, KSM_SURFACE_POST_POOL = 2 };

struct ksm_injection {
    char slot_id[KSM_SLOT_ID_MAX]; /* "r{row}c{col}" */
    int row, col;
    int channels;
    int order;      /* InjectionSpec.order (docs/models.md#cnnhost: r0c{i} = i, r1c{i} = n + i) */
    int exec_index; /* position in execution order = its boundary number */
    enum ksm_surface surface;
    double position;
    int layer_start, layer_end;
};

/* Specs must have their defaults resolved (ksm_host_resolve_*). KSM_EINVAL + sentence. */
int ksm_host_resolve_cnn(struct ksm_cnn_spec *s, bool pool_layers_set, char *err, size_t errlen);
int ksm_host_resolve_transformer(struct ksm_transformer_spec *s, char *err, size_t errlen);
int ksm_host_new_cnn(const struct ksm_cnn_spec *s, ksm_host **out, char *err, size_t errlen);
int ksm_host_new_transformer(const struct ksm_transformer_spec *s, ksm_host **out, char *err,
                             size_t errlen);
void ksm_host_free(ksm_host *h);

enum ksm_topology ksm_host_topology(const ksm_host *h);
/* Declared parameters and buffers, names relative to "host." (BN running stats are buffers;
 * the transformer's head.weight is tied to tok_emb.weight). */
struct ksm_params *ksm_host_params(ksm_host *h);

/* Injection points in row-major order (row, col). */
int ksm_host_injection_count(const ksm_host *h);
const struct ksm_injection *ksm_host_injection(const ksm_host *h, int i);
/* NULL when the host has no such injection point. */
const struct ksm_injection *ksm_host_find_injection(const ksm_host *h, const char *slot_id);

/* Validates a network input held in host memory: CNN [B, in_channels, H, W] F32 with B >= 1
 * and H, W large enough for every pool (>= 2^pool_layers); transformer [B, T] I64/I32 with
 * 1 <= T <= block_size and every id in [0, V). KSM_ESHAPE/KSM_EDTYPE/KSM_EINVAL + sentence. */
int ksm_host_check_input(const ksm_host *h, const ksm_tensor *x, char *err, size_t errlen);
/* Shape of the logits for input x (checked): [B, classes] or [B, T, V]. */
void ksm_host_output_shape(const ksm_host *h, const ksm_tensor *x, int *ndim, int64_t *shape);
/* Shape of the features at boundary k for input x: [B,C,H',W'] or [B,T,D]. */
void ksm_host_boundary_shape(const ksm_host *h, const ksm_tensor *x, int k, int *ndim,
                             int64_t *shape);

/* y <- the ops after boundary `from` up to boundary `to` (from < to; from -1: x is the network
 * input on the device, F32 NCHW or I64/I32 tokens). y is a new arena tensor. */
int ksm_host_forward_to(ksm_host *h, struct ksm_exec *e, int from, int to, const ksm_tensor *x,
                        ksm_tensor *y);
/* logits <- everything after boundary `from` (-1: the whole network) through the head: a new
 * arena tensor, whose data is e->logits_dst instead when that is set (exec.h). */
int ksm_host_forward_from(ksm_host *h, struct ksm_exec *e, int from, const ksm_tensor *x,
                          ksm_tensor *logits);

/* ---- training (train.c) ---- */

/* The CNN host's layout: its timeline length, what op t is, and a block's parameter indices
 * (conv weight, bn weight, bn bias, running mean, running var, num_batches_tracked) and the
 * classifier's (weight, bias) in ksm_host_params(). */
struct ksm_cnn_block_layout {
    int conv_w, bn_w, bn_b, bn_mean, bn_var, bn_nbt;
};
int ksm_host_n_ops(const ksm_host *h);
void ksm_host_cnn_op(const ksm_host *h, int t, int *block, bool *pool);
void ksm_host_cnn_block_layout(const ksm_host *h, int block, struct ksm_cnn_block_layout *out);
void ksm_host_cnn_head_layout(const ksm_host *h, int *w, int *b);

/* The transformer host's layout (ksm_host_params() indices): the embeddings, the final norm,
 * the head (tied to tok_emb), the sizes, and per layer its twelve tensors. Boundary k sits
 * after timeline op ksm_host_boundary_op(k) (op 0 is the embedding, op l + 1 layer l). */
struct ksm_tf_layout {
    int tok_emb, pos_emb, lnf_w, lnf_b, head_w;
    int vocab, n_embd, n_head, n_layer, block_size;
    double dropout;
};
struct ksm_tf_layer_layout {
    int ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mlp_w, mlp_b;
};
void ksm_host_tf_layout(const ksm_host *h, struct ksm_tf_layout *out);
void ksm_host_tf_layer_layout(const ksm_host *h, int layer, struct ksm_tf_layer_layout *out);
int ksm_host_boundary_op(const ksm_host *h, int k);
