/*
 * kasminactl subcommands that compute: forward, fused-forward, evaluate. Tensors come from and
 * go to safetensors files.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

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
             "  Without TENSOR: input/x and targets/y are looked up by name.",
    .args_size = sizeof(struct evaluate_args),
    .run = run_evaluate,
    .fini = fini_evaluate,
};
