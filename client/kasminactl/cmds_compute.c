/*
 * kasminactl subcommands that compute: forward, fused-forward, evaluate. Tensors come from and
 * go to safetensors files.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cmds.h"
#include "kasmina/safetensors.h"

// ---- Tensors from and to safetensors files ----

static const char *const input_names[] = {"input", "x", "inputs", NULL};
static const char *const target_names[] = {"targets", "target", "y", "labels", NULL};

/* Loads tensor ref ("FILE[:NAME]") into a malloc'd host tensor. Without NAME: the file's only
 * tensor, else the first of names[] present. */
static int load_tensor(struct ctl *x, const char *opt, const char *ref, const char *const *names,
                       ksm_tensor *out)
{
    char *file;
    const char *tname;
    char e[256];
    if (ctl_parse_tensor_ref(opt, ref, &file, &tname, e, sizeof e) != 0)
        return ctl_usage_error(x, "%s", e);
    ksm_st_file *f;
    if (ksm_st_open(file, &f, e, sizeof e) != 0) {
        fprintf(stderr, "%s %s: %s: %s\n", x->prog, x->cmd, file, e);
        free(file);
        return CTL_EXIT_OTHER;
    }
    const struct ksm_st_tensor *t = NULL;
    if (tname)
        t = ksm_st_find(f, tname);
    else if (ksm_st_count(f) == 1)
        t = ksm_st_get(f, 0);
    else
        for (int i = 0; names && names[i] && !t; i++) t = ksm_st_find(f, names[i]);
    if (!t) {
        fprintf(stderr, "%s %s: %s: no tensor %s%s (name one with %s FILE:NAME)\n", x->prog, x->cmd,
                file, tname ? tname : "to use", tname ? "" : " among several", opt);
        ksm_st_close(f);
        free(file);
        return CTL_EXIT_USAGE;
    }
    void *data = malloc(t->nbytes ? t->nbytes : 1);
    if (!data) {
        ksm_st_close(f);
        free(file);
        return CTL_EXIT_OTHER;
    }
    memcpy(data, t->data, t->nbytes);
    int rc = ksm_tensor_init(out, NULL, data, t->dtype, t->ndim, t->shape);
    ksm_st_close(f);
    free(file);
    if (rc) {
        free(data);
        return ctl_usage_error(x, "%s: the tensor's shape is not usable", opt);
    }
    return 0;
}

static int write_tensors(struct ctl *x, const char *path, const char *const *names,
                         const ksm_tensor *ts, size_t n)
{
    struct ksm_st_tensor st[64];
    if (n > 64) n = 64;
    for (size_t i = 0; i < n; i++) {
        memset(&st[i], 0, sizeof st[i]);
        st[i].name = names[i];
        st[i].dtype = ts[i].dtype;
        st[i].ndim = ts[i].ndim;
        memcpy(st[i].shape, ts[i].shape, sizeof st[i].shape);
        st[i].data = ts[i].data;
        st[i].nbytes = ksm_tensor_nbytes(&ts[i]);
    }
    int rc = ksm_st_write(path, st, n, NULL, 0);
    if (rc) {
        fprintf(stderr, "%s %s: cannot write %s: %s\n", x->prog, x->cmd, path, ksm_strerror(rc));
        return CTL_EXIT_OTHER;
    }
    return 0;
}

// ---- forward, fused-forward ----

struct forward_args {
    struct ctl_pos pos;
    const char *input, *output;
    struct ksm_forward_args a; /* stream, fused */
    struct ksm_alpha_override ov[KSM_MAX_SLOTS];
    size_t n_ov;
};

static int add_override(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    struct forward_args *a = args;
    if (a->n_ov == KSM_MAX_SLOTS) {
        snprintf(err, errlen, "too many %s", opt);
        return KSM_EINVAL;
    }
    int rc = ctl_parse_override(opt, arg, &a->ov[a->n_ov], err, errlen);
    if (rc == 0) a->n_ov++;
    return rc;
}

static int refuse_override(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    (void)args;
    (void)arg;
    snprintf(err, errlen, "%s is for fused-forward", opt);
    return KSM_EINVAL;
}

#define FWD(f) offsetof(struct forward_args, f)
static const struct ctl_opt forward_opts[] = {
    {"input", "FILE[:TENSOR]", CTL_ARG_STRING, FWD(input), 0, NULL, "the input tensor (required)"},
    {"output", "OUT.safetensors", CTL_ARG_STRING, FWD(output), 0, NULL,
     "write the output tensor to this file"},
    /* Not listed: named here only to say it belongs to fused-forward. */
    {"override", "SLOT=A,A,...", CTL_ARG_SETTER, 0, 0, refuse_override, NULL},
    {"stream", "KEY", CTL_ARG_STRING, FWD(a.stream), 0, NULL,
     "run on this stream of the model (calls with one key run in order)"},
    {0},
};

static const struct ctl_opt fused_forward_opts[] = {
    {"input", "FILE[:TENSOR]", CTL_ARG_STRING, FWD(input), 0, NULL, "the input tensor (required)"},
    {"output", "OUT.safetensors", CTL_ARG_STRING, FWD(output), 0, NULL,
     "write the output tensor to this file"},
    {"override", "SLOT=A,A,...", CTL_ARG_SETTER, 0, 0, add_override,
     "the alphas of SLOT, one per input row (repeat)"},
    {"stream", "KEY", CTL_ARG_STRING, FWD(a.stream), 0, NULL,
     "run on this stream of the model (calls with one key run in order)"},
    {0},
};
#undef FWD

static void init_fused_forward(void *args) { ((struct forward_args *)args)->a.fused = true; }

static void fini_forward(void *args)
{
    struct forward_args *a = args;
    for (size_t i = 0; i < a->n_ov; i++) ctl_alpha_override_free(&a->ov[i]);
}

static int run_forward(struct ctl *x, void *args)
{
    struct forward_args *a = args;
    if (!a->input) return ctl_usage_error(x, "--input FILE is required");
    ksm_tensor input;
    int rc = load_tensor(x, "--input", a->input, input_names, &input);
    if (rc) return rc;
    a->a.input = &input;
    a->a.overrides = a->ov;
    a->a.n_overrides = a->n_ov;
    struct ksm_forward_result r;
    if ((rc = ctl_connect(x)) == 0 &&
        ksm_client_forward(x->client, a->pos.v[0], &a->a, &r, &x->err) != 0)
        rc = ctl_call_failed(x);
    free(input.data);
    if (rc) return rc;
    if (a->output) {
        static const char *const names[] = {"output"};
        rc = write_tensors(x, a->output, names, &r.output, 1);
    }
    if (rc == 0) ctl_show_forward(x->json, &r, a->output, stdout);
    ksm_host_tensor_free(&r.output);
    return rc;
}

const struct ctl_cmd ctl_cmd_forward = {
    .name = "forward",
    .summary = "blended forward of a safetensors input (Forward)",
    .positionals = "MODEL",
    .min_pos = 1,
    .max_pos = 1,
    .opts = forward_opts,
    .notes = "  Without TENSOR: the file's only tensor, or the one named input/x.\n"
             "  Without --output the rows are printed (argmax and the first values).",
    .args_size = sizeof(struct forward_args),
    .run = run_forward,
    .fini = fini_forward,
};

const struct ctl_cmd ctl_cmd_fused_forward = {
    .name = "fused-forward",
    .summary = "fused forward with per-row alphas (FusedForward)",
    .positionals = "MODEL",
    .min_pos = 1,
    .max_pos = 1,
    .opts = fused_forward_opts,
    .notes = "  One alpha per input row for every overridden slot.",
    .args_size = sizeof(struct forward_args),
    .init = init_fused_forward,
    .run = run_forward,
    .fini = fini_forward,
};

// ---- evaluate ----

#define MAX_CONFIGS 64

struct evaluate_args {
    struct ctl_pos pos;
    const char *input, *targets, *logits;
    struct ksm_evaluate_args a; /* stream, generate_standard */
    struct ksm_alpha_config cfg[MAX_CONFIGS];
    size_t n_cfg;
};

static int add_config(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    struct evaluate_args *a = args;
    if (a->n_cfg == MAX_CONFIGS) {
        snprintf(err, errlen, "too many %s", opt);
        return KSM_EINVAL;
    }
    int rc = ctl_parse_alpha_config(opt, arg, &a->cfg[a->n_cfg], err, errlen);
    if (rc == 0) a->n_cfg++;
    return rc;
}

static int set_attribution(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    struct evaluate_args *a = args;
    static const char *const names[] = {"none", "auto", "exact", "permutation"};
    for (int i = 0; i < 4; i++)
        if (strcasecmp(arg, names[i]) == 0) {
            a->a.attribution = (enum ksm_attribution_mode)i;
            return 0;
        }
    snprintf(err, errlen, "%s must be none, auto, exact or permutation, got '%s'", opt, arg);
    return KSM_EINVAL;
}

#define EVAL(f) offsetof(struct evaluate_args, f)
static const struct ctl_opt evaluate_opts[] = {
    {"input", "FILE[:TENSOR]", CTL_ARG_STRING, EVAL(input), 0, NULL, "the input tensor (required)"},
    {"targets", "FILE[:TENSOR]", CTL_ARG_STRING, EVAL(targets), 0, NULL,
     "the target tensor (required)"},
    {"config", "NAME[:SLOT=A,...]", CTL_ARG_SETTER, 0, 0, add_config,
     "a config forcing slots' alphas (repeat)"},
    {"standard", NULL, CTL_ARG_FLAG, EVAL(a.generate_standard), 0, NULL,
     "esper's standard configs (main, solo, all_off, ...)"},
    {"logits", "OUT.safetensors", CTL_ARG_STRING, EVAL(logits), 0, NULL,
     "also fetch the logits (one tensor per config)"},
    {"stream", "KEY", CTL_ARG_STRING, EVAL(a.stream), 0, NULL,
     "run on this stream of the model (calls with one key run in order)"},
    {"attribution", "MODE", CTL_ARG_SETTER, 0, 0, set_attribution,
     "seed attribution over the live seeds: auto, exact, permutation or none"},
    {"shapley-samples", "N", CTL_ARG_U32, EVAL(a.shapley_samples), 0, NULL,
     "permutation: permutations (default 20)"},
    {"attribution-seed", "S", CTL_ARG_U64, EVAL(a.attribution_seed), 0, NULL,
     "permutation: the sampling seed (default 0)"},
    {0},
};
#undef EVAL

static void fini_evaluate(void *args)
{
    struct evaluate_args *a = args;
    for (size_t i = 0; i < a->n_cfg; i++) ctl_alpha_config_free(&a->cfg[i]);
}

/* The logits of every config that returned some, one tensor per config, to path. */
static int write_logits(struct ctl *x, const char *path, const struct ksm_evaluate_result *r)
{
    const char *names[64];
    ksm_tensor ts[64];
    size_t n = 0;
    for (size_t i = 0; i < r->n && n < 64; i++) {
        if (!r->results[i].logits.data) continue;
        names[n] = r->results[i].name;
        ts[n++] = r->results[i].logits;
    }
    return write_tensors(x, path, names, ts, n);
}

static int run_evaluate(struct ctl *x, void *args)
{
    struct evaluate_args *a = args;
    if (!a->input || !a->targets)
        return ctl_usage_error(x, "--input FILE and --targets FILE are required");
    ksm_tensor input = {0}, targets = {0};
    struct ksm_evaluate_result r = {0};
    int rc = load_tensor(x, "--input", a->input, input_names, &input);
    if (rc == 0) rc = load_tensor(x, "--targets", a->targets, target_names, &targets);
    /* Neither --config nor --standard: the model as it is ("main"). */
    static const struct ksm_alpha_config main_cfg = {.name = "main"};
    a->a.input = &input;
    a->a.targets = &targets;
    a->a.configs = a->n_cfg ? a->cfg : (a->a.generate_standard ? NULL : &main_cfg);
    a->a.n_configs = a->n_cfg ? a->n_cfg : (a->a.generate_standard ? 0 : 1);
    a->a.return_logits = a->logits != NULL;
    if (rc == 0) rc = ctl_connect(x);
    if (rc == 0 && ksm_client_evaluate(x->client, a->pos.v[0], &a->a, &r, &x->err) != 0)
        rc = ctl_call_failed(x);
    if (rc == 0 && a->logits) rc = write_logits(x, a->logits, &r);
    if (rc == 0) ctl_show_evaluate(x->json, &r, stdout);
    ksm_evaluate_result_free(&r);
    free(input.data);
    free(targets.data);
    return rc;
}

const struct ctl_cmd ctl_cmd_evaluate = {
    .name = "evaluate",
    .summary = "counterfactual evaluation: loss and accuracy (Evaluate)",
    .positionals = "MODEL",
    .min_pos = 1,
    .max_pos = 1,
    .opts = evaluate_opts,
    .notes = "  Without --config or --standard: one config 'main' (the model as it is).\n"
             "  --attribution adds Shapley values, marginals and (exact) pairwise interactions of\n"
             "  the live seeds, from the same pass (docs/evaluate.md#attribution).\n"
             "  Without TENSOR: input/x and targets/y are looked up by name.",
    .args_size = sizeof(struct evaluate_args),
    .run = run_evaluate,
    .fini = fini_evaluate,
};

// ---- train (TrainStep; docs/training.md) ----

struct train_args {
    struct ctl_pos pos;
    const char *input, *targets, *stream;
    uint32_t batch, epochs;
    bool collect;
};

static void init_train(void *args)
{
    struct train_args *a = args;
    a->epochs = 1;
}

#define TRAIN(f) offsetof(struct train_args, f)
static const struct ctl_opt train_opts[] = {
    {"input", "FILE[:TENSOR]", CTL_ARG_STRING, TRAIN(input), 0, NULL,
     "the training inputs, rows along dim 0 (required)"},
    {"targets", "FILE[:TENSOR]", CTL_ARG_STRING, TRAIN(targets), 0, NULL,
     "their I64 class or token ids, rows along dim 0 (required)"},
    {"batch", "ROWS", CTL_ARG_U32, TRAIN(batch), 0, NULL,
     "rows per TrainStep (default: every row in one step)"},
    {"epochs", "N", CTL_ARG_U32, TRAIN(epochs), 0, NULL, "passes over the rows (default 1)"},
    {"collect-gradients", NULL, CTL_ARG_FLAG, TRAIN(collect), 0, NULL,
     "collect gradient statistics on every step (default: the model's stride decides)"},
    {"stream", "KEY", CTL_ARG_STRING, TRAIN(stream), 0, NULL, "run on this stream of the model"},
    {0},
};
#undef TRAIN

/* Rows [r0, r0 + n) of t as a view (t contiguous, rows along dim 0). */
static ksm_tensor rows_of(const ksm_tensor *t, int64_t r0, int64_t n)
{
    ksm_tensor v = *t;
    size_t row = ksm_tensor_nbytes(t) / (size_t)t->shape[0];
    v.data = (char *)t->data + (size_t)r0 * row;
    v.shape[0] = n;
    return v;
}

static int run_train(struct ctl *x, void *args)
{
    struct train_args *a = args;
    if (!a->input || !a->targets)
        return ctl_usage_error(x, "--input FILE and --targets FILE are required");
    if (a->epochs == 0) return ctl_usage_error(x, "--epochs must be at least 1");
    ksm_tensor input = {0}, targets = {0};
    int rc = load_tensor(x, "--input", a->input, input_names, &input);
    if (rc == 0) rc = load_tensor(x, "--targets", a->targets, target_names, &targets);
    if (rc == 0 && (input.ndim < 1 || targets.ndim < 1 || input.shape[0] != targets.shape[0] ||
                    input.shape[0] == 0))
        rc = ctl_usage_error(x, "--input and --targets must hold the same number of rows (> 0)");
    if (rc == 0) rc = ctl_connect(x);
    int64_t n = rc == 0 ? input.shape[0] : 0;
    int64_t b = a->batch ? (int64_t)a->batch : n;
    for (uint32_t ep = 0; rc == 0 && ep < a->epochs; ep++)
        for (int64_t r0 = 0; rc == 0 && r0 < n; r0 += b) {
            int64_t k = n - r0 < b ? n - r0 : b;
            ksm_tensor xi = rows_of(&input, r0, k), yi = rows_of(&targets, r0, k);
            struct ksm_train_args ta = {.input = &xi,
                                        .targets = &yi,
                                        .stream = a->stream,
                                        .collect_gradients = a->collect ? 1 : -1};
            struct ksm_train_result r;
            if (ksm_client_train_step(x->client, a->pos.v[0], &ta, &r, &x->err) != 0)
                rc = ctl_call_failed(x);
            else
                ctl_show_train_step(x->json, ep, &r, stdout);
        }
    free(input.data);
    free(targets.data);
    return rc;
}

const struct ctl_cmd ctl_cmd_train = {
    .name = "train",
    .summary = "train the model on a file of rows: one TrainStep per batch (TrainStep)",
    .positionals = "MODEL",
    .min_pos = 1,
    .max_pos = 1,
    .opts = train_opts,
    .notes = "  One line per step: epoch, train_step, loss, correct/total (--json: one object).\n"
             "  Without TENSOR: input/x and targets/y are looked up by name.",
    .args_size = sizeof(struct train_args),
    .init = init_train,
    .run = run_train,
};

// ---- training (ConfigureTraining) ----

struct training_args {
    struct ctl_pos pos;
    double host_lr, host_momentum, host_wd, seed_lr, seed_momentum, seed_wd, max_grad_norm;
    uint32_t stride;
    bool set[8]; /* which of the above were given, in that order */
    bool reset;
};

#define TRN(f)     offsetof(struct training_args, f)
#define TRN_SET(i) TRN(set) + (i) * sizeof(bool)
static const struct ctl_opt training_opts[] = {
    {"host-lr", "LR", CTL_ARG_DOUBLE, TRN(host_lr), TRN_SET(0), NULL, "the host's learning rate"},
    {"host-momentum", "M", CTL_ARG_DOUBLE, TRN(host_momentum), TRN_SET(1), NULL,
     "the host's momentum"},
    {"host-weight-decay", "WD", CTL_ARG_DOUBLE, TRN(host_wd), TRN_SET(2), NULL,
     "the host's weight decay"},
    {"seed-lr", "LR", CTL_ARG_DOUBLE, TRN(seed_lr), TRN_SET(3), NULL, "the seeds' learning rate"},
    {"seed-momentum", "M", CTL_ARG_DOUBLE, TRN(seed_momentum), TRN_SET(4), NULL,
     "the seeds' momentum"},
    {"seed-weight-decay", "WD", CTL_ARG_DOUBLE, TRN(seed_wd), TRN_SET(5), NULL,
     "the seeds' weight decay"},
    {"max-grad-norm", "N", CTL_ARG_DOUBLE, TRN(max_grad_norm), TRN_SET(6), NULL,
     "clip the host's and each seed's gradients to this norm (0 = no clipping)"},
    {"stride", "N", CTL_ARG_U32, TRN(stride), TRN_SET(7), NULL,
     "collect gradient statistics every N steps (0 = never)"},
    {"reset-optimizer", NULL, CTL_ARG_FLAG, TRN(reset), 0, NULL, "drop every momentum buffer"},
    {0},
};
#undef TRN_SET
#undef TRN

static int run_training(struct ctl *x, void *args)
{
    struct training_args *a = args;
    int rc = ctl_connect(x);
    struct ksm_training_config c;
    uint64_t step = 0;
    bool change = false;
    for (int i = 0; i < 8; i++) change |= a->set[i];
    if (rc == 0 && ksm_client_configure_training(x->client, a->pos.v[0], NULL, a->reset && !change,
                                                 &c, &step, &x->err) != 0)
        rc = ctl_call_failed(x);
    if (rc == 0 && change) {
        if (a->set[0]) c.host.lr = a->host_lr;
        if (a->set[1]) c.host.momentum = a->host_momentum;
        if (a->set[2]) c.host.weight_decay = a->host_wd;
        if (a->set[3]) c.seed.lr = a->seed_lr;
        if (a->set[4]) c.seed.momentum = a->seed_momentum;
        if (a->set[5]) c.seed.weight_decay = a->seed_wd;
        if (a->set[6]) c.max_grad_norm = a->max_grad_norm;
        if (a->set[7]) c.gradient_telemetry_stride = a->stride;
        if (ksm_client_configure_training(x->client, a->pos.v[0], &c, a->reset, &c, &step,
                                          &x->err) != 0)
            rc = ctl_call_failed(x);
    }
    if (rc == 0) ctl_show_training(x->json, a->pos.v[0], &c, step, stdout);
    return rc;
}

const struct ctl_cmd ctl_cmd_training = {
    .name = "training",
    .summary = "show or change the model's training configuration (ConfigureTraining)",
    .positionals = "MODEL",
    .min_pos = 1,
    .max_pos = 1,
    .opts = training_opts,
    .notes = "  Without options: the configuration in force and the steps applied.",
    .args_size = sizeof(struct training_args),
    .run = run_training,
};

// ---- checkpoint (Checkpoint) ----

static int run_checkpoint(struct ctl *x, void *args)
{
    const struct ctl_pos *p = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_client_checkpoint *v = NULL;
    size_t n = 0;
    if (ksm_client_checkpoint(x->client, p->n > 0 ? p->v[0] : "", &v, &n, &x->err) != 0)
        return ctl_call_failed(x);
    ctl_show_checkpoint(x->json, v, n, stdout);
    free(v);
    return 0;
}

const struct ctl_cmd ctl_cmd_checkpoint = {
    .name = "checkpoint",
    .summary = "make training progress durable: weights, momentum, train_step (Checkpoint)",
    .positionals = "[MODEL]",
    .max_pos = 1,
    .notes =
        "  Without MODEL: every model. One line per model: the train_step now durable\n"
        "  (--json: {\"checkpoint_step\": {model: step}}). Needs a daemon that persists state.",
    .args_size = sizeof(struct ctl_pos),
    .run = run_checkpoint,
};
