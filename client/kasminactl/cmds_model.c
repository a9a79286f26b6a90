/*
 * kasminactl subcommands about models: models, create, delete, load-weights, export-weights,
 * move.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cmds.h"
#include "kasmina/safetensors.h"

// ---- models ----

static int run_models(struct ctl *x, void *args)
{
    const struct ctl_pos *p = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    if (p->n == 1) {
        struct ksm_model_info *m = calloc(1, sizeof *m);
        if (!m) return CTL_EXIT_OTHER;
        if (ksm_client_model_get(x->client, p->v[0], m, &x->err) != 0) {
            free(m);
            return ctl_call_failed(x);
        }
        ctl_show_model(x->json, m, stdout);
        free(m);
        return 0;
    }
    struct ksm_model_info *v;
    size_t n;
    if (ksm_client_model_list(x->client, &v, &n, &x->err) != 0) return ctl_call_failed(x);
    ctl_show_models(x->json, v, n, stdout);
    free(v);
    return 0;
}

const struct ctl_cmd ctl_cmd_models = {
    .name = "models",
    .summary = "list models, or show one (ListModels, GetModel)",
    .positionals = "[MODEL]",
    .max_pos = 1,
    .args_size = sizeof(struct ctl_pos),
    .run = run_models,
};

// ---- create ----

struct create_args {
    struct ctl_pos pos;
    struct ksm_model_spec spec;
    const char *slots[KSM_MAX_SLOTS];
    uint32_t pool_layers; /* into spec.cnn.pool_layers when spec.pool_layers_set */
};

static int set_cnn(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    (void)opt;
    (void)arg;
    (void)err;
    (void)errlen;
    ((struct create_args *)args)->spec.topology = KSM_TOPOLOGY_CNN;
    return 0;
}

static int set_transformer(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    (void)opt;
    (void)arg;
    (void)err;
    (void)errlen;
    ((struct create_args *)args)->spec.topology = KSM_TOPOLOGY_TRANSFORMER;
    return 0;
}

static int add_slot(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    struct create_args *a = args;
    if (a->spec.n_slots == KSM_MAX_SLOTS) {
        snprintf(err, errlen, "too many %s", opt);
        return KSM_EINVAL;
    }
    a->slots[a->spec.n_slots++] = arg;
    return 0;
}

#define CREATE(f) offsetof(struct create_args, f)
static const struct ctl_opt create_opts[] = {
    {"cnn", NULL, CTL_ARG_SETTER, 0, 0, set_cnn, "host topology cnn (the default)"},
    {"transformer", NULL, CTL_ARG_SETTER, 0, 0, set_transformer, "host topology transformer"},
    {"classes", "N", CTL_ARG_U32, CREATE(spec.cnn.num_classes), 0, NULL, "output classes (cnn)"},
    {"blocks", "N", CTL_ARG_U32, CREATE(spec.cnn.n_blocks), 0, NULL,
     "convolution blocks, at least 2 (cnn)"},
    {"channels", "N", CTL_ARG_U32, CREATE(spec.cnn.base_channels), 0, NULL,
     "base channel count (cnn)"},
    {"pool-layers", "N", CTL_ARG_U32, CREATE(pool_layers), CREATE(spec.pool_layers_set), NULL,
     "pooling layers, 0 = none (cnn; default: as many as blocks)"},
    {"kernel", "N", CTL_ARG_U32, CREATE(spec.cnn.kernel_size), 0, NULL,
     "convolution kernel size, odd (cnn)"},
    {"in-channels", "N", CTL_ARG_U32, CREATE(spec.cnn.in_channels), 0, NULL,
     "channels of the input (cnn)"},
    {"vocab", "N", CTL_ARG_U32, CREATE(spec.transformer.vocab_size), 0, NULL,
     "vocabulary size (transformer)"},
    {"embd", "N", CTL_ARG_U32, CREATE(spec.transformer.n_embd), 0, NULL,
     "embedding width (transformer)"},
    {"heads", "N", CTL_ARG_U32, CREATE(spec.transformer.n_head), 0, NULL,
     "attention heads; --embd must be a multiple (transformer)"},
    {"layers", "N", CTL_ARG_U32, CREATE(spec.transformer.n_layer), 0, NULL,
     "transformer layers (transformer)"},
    {"block-size", "N", CTL_ARG_U32, CREATE(spec.transformer.block_size), 0, NULL,
     "context length in tokens (transformer)"},
    {"segments", "N", CTL_ARG_U32, CREATE(spec.transformer.num_segments), 0, NULL,
     "layer segments; --layers must be a multiple (transformer)"},
    {"dropout", "P", CTL_ARG_DOUBLE, CREATE(spec.transformer.dropout),
     CREATE(spec.transformer.dropout_set), NULL,
     "dropout probability in [0, 1), applied by train only (transformer; default 0.1)"},
    {"slot", "ID", CTL_ARG_SETTER, 0, 0, add_slot,
     "register this slot (repeat; default every injection point)"},
    {"device", "NAME", CTL_ARG_STRING, CREATE(spec.device), 0, NULL,
     "cpu:0, cuda:0 (default: the server's)"},
    {"dtype", "T", CTL_ARG_DTYPE, CREATE(spec.dtype), 0, NULL, "compute dtype f32|f16|bf16"},
    {"init-seed", "N", CTL_ARG_U64, CREATE(spec.init_seed), 0, NULL,
     "deterministic initialisation"},
    {"permissive", NULL, CTL_ARG_FLAG, CREATE(spec.permissive_gates), 0, NULL,
     "permissive quality gates"},
    {"auto-forward", "G1,G2,G3", CTL_ARG_GATES, CREATE(spec.auto_forward_gates), 0, NULL,
     "gates StepEpoch may auto-advance through"},
    {0},
};
#undef CREATE

static void init_create(void *args)
{
    struct create_args *a = args;
    a->spec.topology = KSM_TOPOLOGY_CNN;
    a->spec.cnn.pool_layers = -1;
}

static int run_create(struct ctl *x, void *args)
{
    struct create_args *a = args;
    if (a->spec.pool_layers_set) a->spec.cnn.pool_layers = (int32_t)a->pool_layers;
    a->spec.slots = a->slots;
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_model_info *m = calloc(1, sizeof *m);
    if (!m) return CTL_EXIT_OTHER;
    if (ksm_client_model_create(x->client, a->pos.n ? a->pos.v[0] : NULL, &a->spec, m, &x->err) !=
        0) {
        free(m);
        return ctl_call_failed(x);
    }
    ctl_show_model(x->json, m, stdout);
    free(m);
    return 0;
}

const struct ctl_cmd ctl_cmd_create = {
    .name = "create",
    .summary = "create a model (CreateModel)",
    .positionals = "[MODEL]",
    .max_pos = 1,
    .opts = create_opts,
    .args_size = sizeof(struct create_args),
    .init = init_create,
    .run = run_create,
};

// ---- delete ----

static int run_delete(struct ctl *x, void *args)
{
    const struct ctl_pos *p = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    uint64_t freed = 0;
    if (ksm_client_model_delete(x->client, p->v[0], &freed, &x->err) != 0)
        return ctl_call_failed(x);
    char b[32];
    if (x->json)
        ctl_json_print(
            json_pack("{s:s, s:I}", "model_id", p->v[0], "freed_bytes", (json_int_t)freed), stdout);
    else
        printf("deleted %s (%s freed)\n", p->v[0], ctl_bytes(freed, b, sizeof b));
    return 0;
}

const struct ctl_cmd ctl_cmd_delete = {
    .name = "delete",
    .summary = "delete a model (DeleteModel)",
    .positionals = "MODEL",
    .min_pos = 1,
    .max_pos = 1,
    .args_size = sizeof(struct ctl_pos),
    .run = run_delete,
};

// ---- load-weights, export-weights ----

static int read_whole(struct ctl *x, const char *path, void **buf, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s %s: cannot open %s: %s\n", x->prog, x->cmd, path, strerror(errno));
        return CTL_EXIT_OTHER;
    }
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    size_t r;
    while (b && (r = fread(b + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(b, cap *= 2);
            if (!nb) free(b);
            b = nb;
        }
    }
    bool bad = ferror(f) || !b;
    fclose(f);
    if (bad) {
        free(b);
        fprintf(stderr, "%s %s: cannot read %s\n", x->prog, x->cmd, path);
        return CTL_EXIT_OTHER;
    }
    *buf = b;
    *len = n;
    return 0;
}

struct load_args {
    struct ctl_pos pos;
    bool strict;
    bool stream, no_stream;
};

static const struct ctl_opt load_opts[] = {
    {"strict", NULL, CTL_ARG_FLAG, offsetof(struct load_args, strict), 0, NULL,
     "every tensor of the model must be in FILE with its shape, and no other"},
    {"stream", NULL, CTL_ARG_FLAG, offsetof(struct load_args, stream), 0, NULL,
     "send FILE in checksummed chunks (LoadWeightsStream); default: when it is too large for "
     "one message"},
    {"no-stream", NULL, CTL_ARG_FLAG, offsetof(struct load_args, no_stream), 0, NULL,
     "one LoadWeights message only"},
    {0},
};

static enum ksm_client_stream_mode stream_mode(bool stream, bool no_stream)
{
    return stream      ? KSM_CLIENT_STREAM_ALWAYS
           : no_stream ? KSM_CLIENT_STREAM_NEVER
                       : KSM_CLIENT_STREAM_AUTO;
}

static int run_load_weights(struct ctl *x, void *args)
{
    struct load_args *a = args;
    const char *model = a->pos.v[0];
    if (a->stream && a->no_stream) return ctl_usage_error(x, "--stream and --no-stream conflict");
    void *buf;
    size_t len;
    int rc = read_whole(x, a->pos.v[1], &buf, &len);
    if (rc) return rc;
    struct ksm_load_result r;
    struct ksm_client_weights_options o = {.stream = stream_mode(a->stream, a->no_stream)};
    rc = ctl_connect(x);
    if (rc == 0 &&
        ksm_client_load_weights_ex(x->client, model, buf, len, a->strict, &o, &r, &x->err) != 0)
        rc = ctl_call_failed(x);
    free(buf);
    if (rc) return rc;
    ctl_show_load_result(x->json, model, &r, stdout);
    ksm_load_result_free(&r);
    return 0;
}

const struct ctl_cmd ctl_cmd_load_weights = {
    .name = "load-weights",
    .summary = "load a safetensors state_dict (LoadWeights)",
    .positionals = "MODEL FILE",
    .min_pos = 2,
    .max_pos = 2,
    .opts = load_opts,
    .args_size = sizeof(struct load_args),
    .run = run_load_weights,
};

struct export_args {
    struct ctl_pos pos;
    const char *slots[KSM_MAX_SLOTS];
    size_t n_slots;
    bool include_host;
    bool stream, no_stream;
};

static int add_export_slot(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    struct export_args *a = args;
    if (a->n_slots == KSM_MAX_SLOTS) {
        snprintf(err, errlen, "%s: at most %d slots", opt, KSM_MAX_SLOTS);
        return KSM_EINVAL;
    }
    a->slots[a->n_slots++] = arg;
    return 0;
}

static const struct ctl_opt export_opts[] = {
    {"slot", "ID", CTL_ARG_SETTER, 0, 0, add_export_slot,
     "export only this slot's tensors and extra state (repeat; default: everything)"},
    {"include-host", NULL, CTL_ARG_FLAG, offsetof(struct export_args, include_host), 0, NULL,
     "with --slot: the host's tensors too"},
    {"stream", NULL, CTL_ARG_FLAG, offsetof(struct export_args, stream), 0, NULL,
     "receive the file in checksummed chunks (ExportWeightsStream); default: when it is too large "
     "for one message"},
    {"no-stream", NULL, CTL_ARG_FLAG, offsetof(struct export_args, no_stream), 0, NULL,
     "one ExportWeights message only"},
    {0},
};

static int run_export_weights(struct ctl *x, void *args)
{
    const struct export_args *a = args;
    const struct ctl_pos *p = &a->pos;
    const char *path = p->v[1];
    if (a->stream && a->no_stream) return ctl_usage_error(x, "--stream and --no-stream conflict");
    if (a->include_host && a->n_slots == 0)
        return ctl_usage_error(x, "--include-host needs --slot (without it the whole model is "
                                  "exported)");
    int rc = ctl_connect(x);
    if (rc) return rc;
    void *buf;
    size_t len;
    struct ksm_client_weights_options o = {.stream = stream_mode(a->stream, a->no_stream),
                                           .slots = a->slots,
                                           .n_slots = a->n_slots,
                                           .include_host = a->include_host};
    if (ksm_client_export_weights_ex(x->client, p->v[0], &o, &buf, &len, &x->err) != 0)
        return ctl_call_failed(x);
    bool to_stdout = !strcmp(path, "-");
    FILE *f = to_stdout ? stdout : fopen(path, "wb");
    bool ok = f && fwrite(buf, 1, len, f) == len;
    if (f && !to_stdout) ok = (fclose(f) == 0) && ok;
    free(buf);
    if (!ok) {
        fprintf(stderr, "%s %s: cannot write %s: %s\n", x->prog, x->cmd, path, strerror(errno));
        return CTL_EXIT_OTHER;
    }
    if (to_stdout) return 0;
    ksm_st_file *sf;
    size_t n = 0;
    if (ksm_st_open(path, &sf, NULL, 0) == 0) {
        n = ksm_st_count(sf);
        ksm_st_close(sf);
    }
    if (x->json)
        ctl_json_print(json_pack("{s:s, s:I, s:I}", "file", path, "bytes", (json_int_t)len,
                                 "tensors", (json_int_t)n),
                       stdout);
    else
        printf("wrote %s: %zu tensors, %zu bytes\n", path, n, len);
    return 0;
}

const struct ctl_cmd ctl_cmd_export_weights = {
    .name = "export-weights",
    .summary = "export the state_dict as safetensors (ExportWeights)",
    .positionals = "MODEL FILE",
    .min_pos = 2,
    .max_pos = 2,
    .opts = export_opts,
    .notes = "  FILE '-' = stdout.",
    .args_size = sizeof(struct export_args),
    .run = run_export_weights,
};

// ---- move ----

struct move_args {
    struct ctl_pos pos;
    const char *device;
    enum ksm_dtype dtype;
    bool dtype_given;
};

static const struct ctl_opt move_opts[] = {
    {"device", "NAME", CTL_ARG_STRING, offsetof(struct move_args, device), 0, NULL,
     "the device to move to (default: keep)"},
    {"dtype", "f32|f16|bf16", CTL_ARG_DTYPE, offsetof(struct move_args, dtype),
     offsetof(struct move_args, dtype_given), NULL,
     "the compute dtype to convert to (default: keep)"},
    {0},
};

static int run_move(struct ctl *x, void *args)
{
    struct move_args *a = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_model_info *m = calloc(1, sizeof *m);
    if (!m) return CTL_EXIT_OTHER;
    int dtype = a->dtype_given ? (int)a->dtype : -1;
    if (ksm_client_model_move(x->client, a->pos.v[0], a->device, dtype, m, &x->err) != 0) {
        free(m);
        return ctl_call_failed(x);
    }
    if (x->json)
        ctl_json_print(ctl_json_model(m), stdout);
    else
        ctl_print_models(m, 1, stdout);
    free(m);
    return 0;
}

const struct ctl_cmd ctl_cmd_move = {
    .name = "move",
    .summary = "move a model to another device or dtype (MoveModel)",
    .positionals = "MODEL",
    .min_pos = 1,
    .max_pos = 1,
    .opts = move_opts,
    .args_size = sizeof(struct move_args),
    .run = run_move,
};
