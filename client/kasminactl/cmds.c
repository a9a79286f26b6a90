/*
 * kasminactl subcommands: one per RPC of kasmina.v1 (plus health). Each parses its options,
 * connects, makes the call and prints a table (or JSON with --json).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmds.h"
#include "kasmina/safetensors.h"

#define MAX_POS 8

struct pos {
    const char *v[MAX_POS];
    int n;
};

/* Adds a positional argument; returns an exit code on too many. */
static int add_pos(struct ctl *x, struct pos *p, const char *arg)
{
    if (p->n == MAX_POS) return ctl_usage_error(x, "too many arguments");
    p->v[p->n++] = arg;
    return 0;
}

/* Checks the number of positionals is in [lo, hi]; names says what they are. */
static int want_pos(struct ctl *x, const struct pos *p, int lo, int hi, const char *names)
{
    if (p->n < lo) return ctl_usage_error(x, "missing argument(s): %s", names);
    if (p->n > hi) return ctl_usage_error(x, "unexpected argument '%s'", p->v[hi]);
    return 0;
}

#define PARSE(call)                                                                                \
    do {                                                                                           \
        char e_[256];                                                                              \
        int r_ = (call);                                                                           \
        (void)e_;                                                                                  \
        if (r_) return ctl_usage_error(x, "%s", e_);                                               \
    } while (0)
#define E_ e_, sizeof e_

/* Runs the option loop: positionals to p, command options to handler code below. */
#define OPT_LOOP(opts)                                                                             \
    int opt_, ec_ = 0;                                                                             \
    while ((opt_ = ctl_next_opt(x, argc, argv, opts, &ec_)) != -1)                                 \
        if (opt_ == CTL_OPT_EXIT)                                                                  \
            return ec_;                                                                            \
        else if (opt_ == 1) {                                                                      \
            if ((ec_ = add_pos(x, &p, optarg))) return ec_;                                        \
        } else

#define CALL(expr)                                                                                 \
    do {                                                                                           \
        int c_ = ctl_connect(x);                                                                   \
        if (c_) return c_;                                                                         \
        if ((expr) != 0) return ctl_call_failed(x);                                                \
    } while (0)

static void print_report(struct ctl *x, const struct ksm_slot_report *r)
{
    if (x->json)
        ctl_json_print(ctl_json_slot_report(r), stdout);
    else
        ctl_print_slot_reports(r, 1, stdout);
}

// ---- Tensors from and to safetensors files ----

/* Loads tensor ref ("FILE[:NAME]") into a malloc'd host tensor. Without NAME: the file's only
 * tensor, else the first of names[] present. */
static int load_tensor(struct ctl *x, const char *opt, const char *ref, const char *const *names,
                       ksm_tensor *out)
{
    char *file;
    const char *tname;
    PARSE(ctl_parse_tensor_ref(opt, ref, &file, &tname, E_));
    char e[256];
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

static void print_tensor_rows(const ksm_tensor *t, FILE *f)
{
    char d[64];
    fprintf(f, "output %s", ksm_tensor_describe(t, d, sizeof d));
    if (t->ndim < 1) {
        fputc('\n', f);
        return;
    }
    int64_t rows = t->shape[0], cols = rows ? ksm_tensor_numel(t) / rows : 0;
    fputc('\n', f);
    for (int64_t r = 0; r < rows && r < 16; r++) {
        int64_t best = 0;
        for (int64_t c = 1; c < cols; c++)
            if (ctl_tensor_get(t, r * cols + c) > ctl_tensor_get(t, r * cols + best)) best = c;
        fprintf(f, "  row %" PRId64 ": argmax %" PRId64 " [", r, best);
        for (int64_t c = 0; c < cols && c < 8; c++)
            fprintf(f, "%s%.5g", c ? ", " : "", ctl_tensor_get(t, r * cols + c));
        fprintf(f, "%s]\n", cols > 8 ? ", ..." : "");
    }
    if (rows > 16) fprintf(f, "  ... %" PRId64 " more rows\n", rows - 16);
}

// ---- server ----

static int cmd_info(struct ctl *x, int argc, char **argv)
{
    struct pos p = {0};
    OPT_LOOP(NULL) return ctl_usage_error(x, "bad option");
    int rc = want_pos(x, &p, 0, 0, "");
    if (rc) return rc;
    struct ksm_client_server_info s;
    CALL(ksm_client_server_info(x->client, &s, &x->err));
    if (x->json) {
        json_t *ext = json_array(), *dev = json_array(), *cnn = json_array(), *tf = json_array();
        for (size_t i = 0; i < s.n_extensions; i++)
            json_array_append_new(ext, json_string(s.extensions[i]));
        for (size_t i = 0; i < s.n_cnn_blueprints; i++)
            json_array_append_new(cnn, json_string(s.cnn_blueprints[i]));
        for (size_t i = 0; i < s.n_transformer_blueprints; i++)
            json_array_append_new(tf, json_string(s.transformer_blueprints[i]));
        for (size_t i = 0; i < s.n_devices; i++) {
            const struct ksm_client_device *d = &s.devices[i];
            json_array_append_new(dev,
                                  json_pack("{s:s, s:s, s:s, s:I, s:I}", "name", d->name, "kind",
                                            d->kind, "description", d->description, "total_bytes",
                                            (json_int_t)d->total_bytes, "memory_cap_bytes",
                                            (json_int_t)d->memory_cap_bytes));
        }
        ctl_json_print(json_pack("{s:s, s:s, s:b, s:o, s:o, s:o, s:o}", "name", s.name, "version",
                                 s.version, "ready", s.ready, "extensions", ext, "devices", dev,
                                 "cnn_blueprints", cnn, "transformer_blueprints", tf),
                       stdout);
    } else {
        printf("server      %s %s (%s)\n", s.name, s.version, s.ready ? "ready" : "not ready");
        printf("target      %s\n", x->target);
        printf("extensions ");
        for (size_t i = 0; i < s.n_extensions; i++) printf(" %s", s.extensions[i]);
        printf("\ncnn         ");
        for (size_t i = 0; i < s.n_cnn_blueprints; i++)
            printf("%s%s", i ? " " : "", s.cnn_blueprints[i]);
        printf("\ntransformer ");
        for (size_t i = 0; i < s.n_transformer_blueprints; i++)
            printf("%s%s", i ? " " : "", s.transformer_blueprints[i]);
        printf("\n\n");
        static const char *const h[] = {"DEVICE", "KIND", "TOTAL", "CAP", "DESCRIPTION"};
        struct ctl_table *t = ctl_table_new(5, h);
        ctl_table_right(t, 2);
        ctl_table_right(t, 3);
        for (size_t i = 0; i < s.n_devices; i++) {
            char b1[32], b2[32];
            ctl_table_row(t);
            ctl_table_cell(t, "%s", s.devices[i].name);
            ctl_table_cell(t, "%s", s.devices[i].kind);
            ctl_table_cell(t, "%s", ctl_bytes(s.devices[i].total_bytes, b1, sizeof b1));
            ctl_table_cell(t, "%s",
                           s.devices[i].memory_cap_bytes
                               ? ctl_bytes(s.devices[i].memory_cap_bytes, b2, sizeof b2)
                               : "-");
            ctl_table_cell(t, "%s", s.devices[i].description);
        }
        ctl_table_print(t, stdout);
        ctl_table_free(t);
    }
    ksm_client_server_info_free(&s);
    return 0;
}

static int cmd_health(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"service", required_argument, NULL, 's'}, {0}};
    struct pos p = {0};
    const char *service = "";
    OPT_LOOP(o) switch (opt_)
    {
    case 's': service = optarg; break;
    }
    int rc = want_pos(x, &p, 0, 0, "");
    if (rc) return rc;
    enum ksm_health_status st;
    CALL(ksm_client_health(x->client, service, &st, &x->err));
    if (x->json)
        ctl_json_print(
            json_pack("{s:s, s:s}", "service", service, "status", ksm_health_status_name(st)),
            stdout);
    else
        printf("%s\n", ksm_health_status_name(st));
    return st == KSM_HEALTH_SERVING ? 0 : CTL_EXIT_UNAVAILABLE;
}

// ---- models ----

static void print_model_detail(const struct ksm_model_info *m)
{
    ctl_print_models(m, 1, stdout);
    printf("\n");
    static const char *const h[] = {"SLOT", "ORDER", "CHANNELS", "SURFACE"};
    struct ctl_table *t = ctl_table_new(4, h);
    ctl_table_right(t, 1);
    ctl_table_right(t, 2);
    for (int i = 0; i < m->n_slots && i < KSM_MAX_SLOTS; i++) {
        ctl_table_row(t);
        ctl_table_cell(t, "%s", m->slots[i].slot_id);
        ctl_table_cell(t, "%u", m->slots[i].order);
        ctl_table_cell(t, "%u", m->slots[i].channels);
        ctl_table_cell(t, "%s", m->slots[i].surface ? m->slots[i].surface : "");
    }
    ctl_table_print(t, stdout);
    ctl_table_free(t);
}

static int cmd_models(struct ctl *x, int argc, char **argv)
{
    struct pos p = {0};
    OPT_LOOP(NULL) return ctl_usage_error(x, "bad option");
    int rc = want_pos(x, &p, 0, 1, "[MODEL]");
    if (rc) return rc;
    if (p.n == 1) {
        struct ksm_model_info *m = calloc(1, sizeof *m);
        if (!m) return CTL_EXIT_OTHER;
        int c = ctl_connect(x);
        if (c || ksm_client_model_get(x->client, p.v[0], m, &x->err) != 0) {
            free(m);
            return c ? c : ctl_call_failed(x);
        }
        if (x->json)
            ctl_json_print(ctl_json_model(m), stdout);
        else
            print_model_detail(m);
        free(m);
        return 0;
    }
    struct ksm_model_info *v;
    size_t n;
    CALL(ksm_client_model_list(x->client, &v, &n, &x->err));
    if (x->json) {
        json_t *a = json_array();
        for (size_t i = 0; i < n; i++) json_array_append_new(a, ctl_json_model(&v[i]));
        ctl_json_print(json_pack("{s:o}", "models", a), stdout);
    } else {
        ctl_print_models(v, n, stdout);
    }
    free(v);
    return 0;
}

static int cmd_create(struct ctl *x, int argc, char **argv)
{
    enum {
        O_CNN = 'c',
        O_TF = 't',
        O_CLASSES = 256,
        O_BLOCKS,
        O_CHANNELS,
        O_POOL,
        O_KERNEL,
        O_IN,
        O_VOCAB,
        O_EMBD,
        O_HEADS,
        O_LAYERS,
        O_BLOCK,
        O_SEGMENTS,
        O_SLOT,
        O_DEVICE,
        O_DTYPE,
        O_SEED,
        O_PERMISSIVE,
        O_AUTO
    };
    static const struct option o[] = {
        {"cnn", no_argument, NULL, O_CNN},
        {"transformer", no_argument, NULL, O_TF},
        {"classes", required_argument, NULL, O_CLASSES},
        {"blocks", required_argument, NULL, O_BLOCKS},
        {"channels", required_argument, NULL, O_CHANNELS},
        {"pool-layers", required_argument, NULL, O_POOL},
        {"kernel", required_argument, NULL, O_KERNEL},
        {"in-channels", required_argument, NULL, O_IN},
        {"vocab", required_argument, NULL, O_VOCAB},
        {"embd", required_argument, NULL, O_EMBD},
        {"heads", required_argument, NULL, O_HEADS},
        {"layers", required_argument, NULL, O_LAYERS},
        {"block-size", required_argument, NULL, O_BLOCK},
        {"segments", required_argument, NULL, O_SEGMENTS},
        {"slot", required_argument, NULL, O_SLOT},
        {"device", required_argument, NULL, O_DEVICE},
        {"dtype", required_argument, NULL, O_DTYPE},
        {"init-seed", required_argument, NULL, O_SEED},
        {"permissive", no_argument, NULL, O_PERMISSIVE},
        {"auto-forward", required_argument, NULL, O_AUTO},
        {0},
    };
    struct pos p = {0};
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN, .cnn.pool_layers = -1};
    const char *slots[KSM_MAX_SLOTS];
    uint32_t u;
    OPT_LOOP(o) switch (opt_)
    {
    case O_CNN: spec.topology = KSM_TOPOLOGY_CNN; break;
    case O_TF: spec.topology = KSM_TOPOLOGY_TRANSFORMER; break;
    case O_CLASSES: PARSE(ctl_parse_u32("--classes", optarg, &spec.cnn.num_classes, E_)); break;
    case O_BLOCKS: PARSE(ctl_parse_u32("--blocks", optarg, &spec.cnn.n_blocks, E_)); break;
    case O_CHANNELS: PARSE(ctl_parse_u32("--channels", optarg, &spec.cnn.base_channels, E_)); break;
    case O_POOL:
        PARSE(ctl_parse_u32("--pool-layers", optarg, &u, E_));
        spec.cnn.pool_layers = (int32_t)u;
        spec.pool_layers_set = true;
        break;
    case O_KERNEL: PARSE(ctl_parse_u32("--kernel", optarg, &spec.cnn.kernel_size, E_)); break;
    case O_IN: PARSE(ctl_parse_u32("--in-channels", optarg, &spec.cnn.in_channels, E_)); break;
    case O_VOCAB: PARSE(ctl_parse_u32("--vocab", optarg, &spec.transformer.vocab_size, E_)); break;
    case O_EMBD: PARSE(ctl_parse_u32("--embd", optarg, &spec.transformer.n_embd, E_)); break;
    case O_HEADS: PARSE(ctl_parse_u32("--heads", optarg, &spec.transformer.n_head, E_)); break;
    case O_LAYERS: PARSE(ctl_parse_u32("--layers", optarg, &spec.transformer.n_layer, E_)); break;
    case O_BLOCK:
        PARSE(ctl_parse_u32("--block-size", optarg, &spec.transformer.block_size, E_));
        break;
    case O_SEGMENTS:
        PARSE(ctl_parse_u32("--segments", optarg, &spec.transformer.num_segments, E_));
        break;
    case O_SLOT:
        if (spec.n_slots == KSM_MAX_SLOTS) return ctl_usage_error(x, "too many --slot");
        slots[spec.n_slots++] = optarg;
        break;
    case O_DEVICE: spec.device = optarg; break;
    case O_DTYPE: PARSE(ctl_parse_dtype("--dtype", optarg, &spec.dtype, E_)); break;
    case O_SEED: PARSE(ctl_parse_u64("--init-seed", optarg, &spec.init_seed, E_)); break;
    case O_PERMISSIVE: spec.permissive_gates = true; break;
    case O_AUTO:
        PARSE(ctl_parse_gates("--auto-forward", optarg, &spec.auto_forward_gates, E_));
        break;
    }
    int rc = want_pos(x, &p, 0, 1, "[MODEL]");
    if (rc) return rc;
    spec.slots = slots;
    struct ksm_model_info *m = calloc(1, sizeof *m);
    if (!m) return CTL_EXIT_OTHER;
    int c = ctl_connect(x);
    if (c || ksm_client_model_create(x->client, p.n ? p.v[0] : NULL, &spec, m, &x->err) != 0) {
        free(m);
        return c ? c : ctl_call_failed(x);
    }
    if (x->json)
        ctl_json_print(ctl_json_model(m), stdout);
    else
        print_model_detail(m);
    free(m);
    return 0;
}

static int cmd_delete(struct ctl *x, int argc, char **argv)
{
    struct pos p = {0};
    OPT_LOOP(NULL) return ctl_usage_error(x, "bad option");
    int rc = want_pos(x, &p, 1, 1, "MODEL");
    if (rc) return rc;
    uint64_t freed = 0;
    CALL(ksm_client_model_delete(x->client, p.v[0], &freed, &x->err));
    char b[32];
    if (x->json)
        ctl_json_print(
            json_pack("{s:s, s:I}", "model_id", p.v[0], "freed_bytes", (json_int_t)freed), stdout);
    else
        printf("deleted %s (%s freed)\n", p.v[0], ctl_bytes(freed, b, sizeof b));
    return 0;
}

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

static void names_json(json_t *o, const char *key, char **v, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(a, json_string(v[i]));
    json_object_set_new(o, key, a);
}

static int cmd_load_weights(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"strict", no_argument, NULL, 's'}, {0}};
    struct pos p = {0};
    bool strict = false;
    OPT_LOOP(o) switch (opt_)
    {
    case 's': strict = true; break;
    }
    int rc = want_pos(x, &p, 2, 2, "MODEL FILE");
    if (rc) return rc;
    void *buf;
    size_t len;
    if ((rc = read_whole(x, p.v[1], &buf, &len))) return rc;
    struct ksm_load_result r;
    int c = ctl_connect(x);
    if (c || ksm_client_load_weights(x->client, p.v[0], buf, len, strict, &r, &x->err) != 0) {
        free(buf);
        return c ? c : ctl_call_failed(x);
    }
    free(buf);
    if (x->json) {
        json_t *j = json_object();
        names_json(j, "loaded", r.loaded, r.n_loaded);
        names_json(j, "missing", r.missing, r.n_missing);
        names_json(j, "unexpected", r.unexpected, r.n_unexpected);
        ctl_json_print(j, stdout);
    } else {
        printf("loaded %zu tensors into %s; %zu missing, %zu unexpected\n", r.n_loaded, p.v[0],
               r.n_missing, r.n_unexpected);
        for (size_t i = 0; i < r.n_missing; i++) printf("  missing    %s\n", r.missing[i]);
        for (size_t i = 0; i < r.n_unexpected; i++) printf("  unexpected %s\n", r.unexpected[i]);
    }
    ksm_load_result_free(&r);
    return 0;
}

static int cmd_export_weights(struct ctl *x, int argc, char **argv)
{
    struct pos p = {0};
    OPT_LOOP(NULL) return ctl_usage_error(x, "bad option");
    int rc = want_pos(x, &p, 2, 2, "MODEL FILE");
    if (rc) return rc;
    void *buf;
    size_t len;
    CALL(ksm_client_export_weights(x->client, p.v[0], &buf, &len, &x->err));
    bool to_stdout = !strcmp(p.v[1], "-");
    FILE *f = to_stdout ? stdout : fopen(p.v[1], "wb");
    bool ok = f && fwrite(buf, 1, len, f) == len;
    if (f && !to_stdout) ok = (fclose(f) == 0) && ok;
    free(buf);
    if (!ok) {
        fprintf(stderr, "%s %s: cannot write %s: %s\n", x->prog, x->cmd, p.v[1], strerror(errno));
        return CTL_EXIT_OTHER;
    }
    if (to_stdout) return 0;
    ksm_st_file *sf;
    size_t n = 0;
    if (ksm_st_open(p.v[1], &sf, NULL, 0) == 0) {
        n = ksm_st_count(sf);
        ksm_st_close(sf);
    }
    if (x->json)
        ctl_json_print(json_pack("{s:s, s:I, s:I}", "file", p.v[1], "bytes", (json_int_t)len,
                                 "tensors", (json_int_t)n),
                       stdout);
    else
        printf("wrote %s: %zu tensors, %zu bytes\n", p.v[1], n, len);
    return 0;
}

static int cmd_move(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {
        {"device", required_argument, NULL, 'd'}, {"dtype", required_argument, NULL, 't'}, {0}};
    struct pos p = {0};
    const char *device = NULL;
    int dtype = -1;
    enum ksm_dtype dt;
    OPT_LOOP(o) switch (opt_)
    {
    case 'd': device = optarg; break;
    case 't':
        PARSE(ctl_parse_dtype("--dtype", optarg, &dt, E_));
        dtype = (int)dt;
        break;
    }
    int rc = want_pos(x, &p, 1, 1, "MODEL");
    if (rc) return rc;
    struct ksm_model_info *m = calloc(1, sizeof *m);
    if (!m) return CTL_EXIT_OTHER;
    int c = ctl_connect(x);
    if (c || ksm_client_model_move(x->client, p.v[0], device, dtype, m, &x->err) != 0) {
        free(m);
        return c ? c : ctl_call_failed(x);
    }
    if (x->json)
        ctl_json_print(ctl_json_model(m), stdout);
    else
        ctl_print_models(m, 1, stdout);
    free(m);
    return 0;
}

// ---- lifecycle ----

static int cmd_germinate(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"seed-id", required_argument, NULL, 's'},
                                      {"blend", required_argument, NULL, 'b'},
                                      {"tempo", required_argument, NULL, 't'},
                                      {"alpha-algorithm", required_argument, NULL, 'a'},
                                      {"alpha-target", required_argument, NULL, 'T'},
                                      {"init-seed", required_argument, NULL, 'i'},
                                      {0}};
    struct pos p = {0};
    struct ksm_germinate_args g = {0};
    OPT_LOOP(o) switch (opt_)
    {
    case 's': g.seed_id = optarg; break;
    case 'b': g.blend_algorithm_id = optarg; break;
    case 't': PARSE(ctl_parse_u32("--tempo", optarg, &g.blend_tempo_epochs, E_)); break;
    case 'a':
        PARSE(ctl_parse_algorithm("--alpha-algorithm", optarg, &g.alpha_algorithm, E_));
        break;
    case 'T':
        PARSE(ctl_parse_double("--alpha-target", optarg, &g.alpha_target, E_));
        g.has_alpha_target = true;
        break;
    case 'i': PARSE(ctl_parse_u64("--init-seed", optarg, &g.init_seed, E_)); break;
    }
    int rc = want_pos(x, &p, 3, 3, "MODEL SLOT BLUEPRINT");
    if (rc) return rc;
    g.blueprint_id = p.v[2];
    struct ksm_slot_report r;
    CALL(ksm_client_germinate(x->client, p.v[0], p.v[1], &g, &r, &x->err));
    print_report(x, &r);
    return 0;
}

static int cmd_advance(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"to", required_argument, NULL, 't'}, {0}};
    struct pos p = {0};
    enum ksm_stage target = KSM_STAGE_UNKNOWN;
    OPT_LOOP(o) switch (opt_)
    {
    case 't': PARSE(ctl_parse_stage("--to", optarg, &target, E_)); break;
    }
    int rc = want_pos(x, &p, 2, 2, "MODEL SLOT");
    if (rc) return rc;
    struct ksm_gate_result g;
    struct ksm_slot_report r;
    CALL(ksm_client_advance(x->client, p.v[0], p.v[1], target, &g, &r, &x->err));
    if (x->json) {
        ctl_json_print(
            json_pack("{s:o, s:o}", "gate", ctl_json_gate(&g), "slot", ctl_json_slot_report(&r)),
            stdout);
    } else {
        ctl_print_gate(&g, stdout);
        ctl_print_slot_reports(&r, 1, stdout);
    }
    return 0;
}

static void print_accepted(struct ctl *x, bool accepted, const struct ksm_slot_report *r)
{
    if (x->json) {
        ctl_json_print(
            json_pack("{s:b, s:o}", "accepted", accepted, "slot", ctl_json_slot_report(r)), stdout);
    } else {
        printf("accepted: %s\n", accepted ? "yes" : "no (nothing to do)");
        ctl_print_slot_reports(r, 1, stdout);
    }
}

static int cmd_prune(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {
        {"reason", required_argument, NULL, 'r'}, {"initiator", required_argument, NULL, 'i'}, {0}};
    struct pos p = {0};
    const char *reason = NULL, *initiator = NULL;
    OPT_LOOP(o) switch (opt_)
    {
    case 'r': reason = optarg; break;
    case 'i': initiator = optarg; break;
    }
    int rc = want_pos(x, &p, 2, 2, "MODEL SLOT");
    if (rc) return rc;
    bool acc;
    struct ksm_slot_report r;
    CALL(ksm_client_prune(x->client, p.v[0], p.v[1], reason, initiator, &acc, &r, &x->err));
    print_accepted(x, acc, &r);
    return 0;
}

static int cmd_schedule_prune(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {
        {"steps", required_argument, NULL, 'n'},     {"curve", required_argument, NULL, 'c'},
        {"steepness", required_argument, NULL, 'k'}, {"reason", required_argument, NULL, 'r'},
        {"initiator", required_argument, NULL, 'i'}, {0}};
    struct pos p = {0};
    const char *reason = NULL, *initiator = NULL;
    uint32_t steps = 0;
    enum ksm_alpha_curve curve = KSM_CURVE_UNSPECIFIED;
    bool has_k = false;
    double k = 0;
    OPT_LOOP(o) switch (opt_)
    {
    case 'n': PARSE(ctl_parse_u32("--steps", optarg, &steps, E_)); break;
    case 'c': PARSE(ctl_parse_curve("--curve", optarg, &curve, E_)); break;
    case 'k':
        PARSE(ctl_parse_double("--steepness", optarg, &k, E_));
        has_k = true;
        break;
    case 'r': reason = optarg; break;
    case 'i': initiator = optarg; break;
    }
    int rc = want_pos(x, &p, 2, 2, "MODEL SLOT");
    if (rc) return rc;
    bool acc;
    struct ksm_slot_report r;
    CALL(ksm_client_schedule_prune(x->client, p.v[0], p.v[1], steps, curve, has_k, k, reason,
                                   initiator, &acc, &r, &x->err));
    print_accepted(x, acc, &r);
    return 0;
}

static int cmd_set_alpha_target(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"steps", required_argument, NULL, 'n'},
                                      {"curve", required_argument, NULL, 'c'},
                                      {"steepness", required_argument, NULL, 'k'},
                                      {"alpha-algorithm", required_argument, NULL, 'a'},
                                      {0}};
    struct pos p = {0};
    uint32_t steps = 0;
    enum ksm_alpha_curve curve = KSM_CURVE_UNSPECIFIED;
    enum ksm_alpha_algorithm algo = KSM_ALGO_UNSPECIFIED;
    bool has_k = false;
    double k = 0, target;
    OPT_LOOP(o) switch (opt_)
    {
    case 'n': PARSE(ctl_parse_u32("--steps", optarg, &steps, E_)); break;
    case 'c': PARSE(ctl_parse_curve("--curve", optarg, &curve, E_)); break;
    case 'k':
        PARSE(ctl_parse_double("--steepness", optarg, &k, E_));
        has_k = true;
        break;
    case 'a': PARSE(ctl_parse_algorithm("--alpha-algorithm", optarg, &algo, E_)); break;
    }
    int rc = want_pos(x, &p, 3, 3, "MODEL SLOT TARGET");
    if (rc) return rc;
    PARSE(ctl_parse_double("TARGET", p.v[2], &target, E_));
    bool acc;
    struct ksm_slot_report r;
    CALL(ksm_client_set_alpha_target(x->client, p.v[0], p.v[1], target, steps, curve, has_k, k,
                                     algo, &acc, &r, &x->err));
    print_accepted(x, acc, &r);
    return 0;
}

static int cmd_set_alpha(struct ctl *x, int argc, char **argv)
{
    struct pos p = {0};
    OPT_LOOP(NULL) return ctl_usage_error(x, "bad option");
    int rc = want_pos(x, &p, 3, 3, "MODEL SLOT ALPHA");
    if (rc) return rc;
    double a;
    PARSE(ctl_parse_double("ALPHA", p.v[2], &a, E_));
    struct ksm_slot_report r;
    CALL(ksm_client_set_alpha(x->client, p.v[0], p.v[1], a, &r, &x->err));
    print_report(x, &r);
    return 0;
}

static int print_reports(struct ctl *x, const struct ksm_slot_report *r, size_t n)
{
    if (x->json) {
        json_t *a = json_array();
        for (size_t i = 0; i < n; i++) json_array_append_new(a, ctl_json_slot_report(&r[i]));
        ctl_json_print(json_pack("{s:o}", "slots", a), stdout);
    } else {
        ctl_print_slot_reports(r, n, stdout);
    }
    return 0;
}

static int cmd_step(struct ctl *x, int argc, char **argv)
{
    struct pos p = {0};
    OPT_LOOP(NULL) return ctl_usage_error(x, "bad option");
    int rc = want_pos(x, &p, 1, 2, "MODEL [SLOT]");
    if (rc) return rc;
    struct ksm_slot_report *r = calloc(KSM_MAX_SLOTS, sizeof *r);
    size_t n = 0;
    if (!r) return CTL_EXIT_OTHER;
    int c = ctl_connect(x);
    if (c || ksm_client_step_epoch(x->client, p.v[0], p.n > 1 ? p.v[1] : NULL, r, KSM_MAX_SLOTS, &n,
                                   &x->err) != 0) {
        free(r);
        return c ? c : ctl_call_failed(x);
    }
    print_reports(x, r, n < KSM_MAX_SLOTS ? n : KSM_MAX_SLOTS);
    free(r);
    return 0;
}

static int cmd_slots(struct ctl *x, int argc, char **argv)
{
    struct pos p = {0};
    OPT_LOOP(NULL) return ctl_usage_error(x, "bad option");
    int rc = want_pos(x, &p, 1, 2, "MODEL [SLOT]");
    if (rc) return rc;
    struct ksm_slot_report *r = calloc(KSM_MAX_SLOTS, sizeof *r);
    size_t n = 0;
    if (!r) return CTL_EXIT_OTHER;
    int c = ctl_connect(x);
    if (c || ksm_client_slot_reports(x->client, p.v[0], p.n > 1 ? p.v[1] : NULL, r, KSM_MAX_SLOTS,
                                     &n, &x->err) != 0) {
        free(r);
        return c ? c : ctl_call_failed(x);
    }
    print_reports(x, r, n < KSM_MAX_SLOTS ? n : KSM_MAX_SLOTS);
    free(r);
    return 0;
}

static int cmd_metrics(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"val-accuracy", required_argument, NULL, 'a'},
                                      {"counterfactual", required_argument, NULL, 'c'},
                                      {"gradient-norm", required_argument, NULL, 'n'},
                                      {"gradient-health", required_argument, NULL, 'h'},
                                      {"vanishing", required_argument, NULL, 'v'},
                                      {"exploding", required_argument, NULL, 'x'},
                                      {"grad-ratio", required_argument, NULL, 'r'},
                                      {"epoch", required_argument, NULL, 'e'},
                                      {"max-epochs", required_argument, NULL, 'm'},
                                      {0}};
    struct pos p = {0};
    struct ksm_metrics_update u = {0};
    OPT_LOOP(o) switch (opt_)
    {
    case 'a':
        PARSE(ctl_parse_double("--val-accuracy", optarg, &u.val_accuracy, E_));
        u.has_val_accuracy = true;
        break;
    case 'c':
        PARSE(ctl_parse_double("--counterfactual", optarg, &u.counterfactual, E_));
        u.has_counterfactual = true;
        break;
    case 'n':
        PARSE(ctl_parse_double("--gradient-norm", optarg, &u.gradient_norm, E_));
        u.has_gradient_norm = true;
        break;
    case 'h':
        PARSE(ctl_parse_double("--gradient-health", optarg, &u.gradient_health, E_));
        u.has_gradient_health = true;
        break;
    case 'v':
        PARSE(ctl_parse_bool("--vanishing", optarg, &u.vanishing, E_));
        u.has_vanishing = true;
        break;
    case 'x':
        PARSE(ctl_parse_bool("--exploding", optarg, &u.exploding, E_));
        u.has_exploding = true;
        break;
    case 'r':
        PARSE(ctl_parse_double("--grad-ratio", optarg, &u.seed_gradient_norm_ratio, E_));
        u.has_grad_ratio = true;
        break;
    case 'e':
        PARSE(ctl_parse_u32("--epoch", optarg, &u.epoch, E_));
        u.has_epoch = true;
        break;
    case 'm':
        PARSE(ctl_parse_u32("--max-epochs", optarg, &u.max_epochs, E_));
        u.has_max_epochs = true;
        break;
    }
    int rc = want_pos(x, &p, 2, 2, "MODEL SLOT");
    if (rc) return rc;
    struct ksm_slot_report r;
    CALL(ksm_client_record_metrics(x->client, p.v[0], p.v[1], &u, &r, &x->err));
    print_report(x, &r);
    return 0;
}

struct events_ctx {
    struct ctl *x;
    uint64_t count, limit;
};

static int on_event(void *ud, uint64_t seq, const struct ksm_lifecycle_event *ev)
{
    struct events_ctx *e = ud;
    if (e->x->json) {
        json_t *j = ctl_json_event(seq, ev);
        json_dumpf(j, stdout, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(10));
        fputc('\n', stdout);
        json_decref(j);
    } else {
        ctl_print_event(seq, ev, stdout);
    }
    fflush(stdout);
    return e->limit && ++e->count >= e->limit ? 1 : 0;
}

static int cmd_events(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"after", required_argument, NULL, 'a'},
                                      {"follow", no_argument, NULL, 'f'},
                                      {"idle", required_argument, NULL, 'i'},
                                      {"count", required_argument, NULL, 'n'},
                                      {0}};
    struct pos p = {0};
    uint64_t after = 0;
    bool follow = false;
    uint32_t idle = 500;
    struct events_ctx e = {.x = x};
    OPT_LOOP(o) switch (opt_)
    {
    case 'a': PARSE(ctl_parse_u64("--after", optarg, &after, E_)); break;
    case 'f': follow = true; break;
    case 'i': PARSE(ctl_parse_u32("--idle", optarg, &idle, E_)); break;
    case 'n': PARSE(ctl_parse_u64("--count", optarg, &e.limit, E_)); break;
    }
    int rc = want_pos(x, &p, 0, 1, "[MODEL]");
    if (rc) return rc;
    int c = ctl_connect(x);
    if (c) return c;
    rc = ksm_client_watch_events(x->client, p.n ? p.v[0] : NULL, after, follow ? 0 : idle, on_event,
                                 &e, &x->err);
    return rc < 0 ? ctl_call_failed(x) : 0;
}

// ---- compute ----

static const char *const input_names[] = {"input", "x", "inputs", NULL};
static const char *const target_names[] = {"targets", "target", "y", "labels", NULL};

static int forward_common(struct ctl *x, int argc, char **argv, bool fused)
{
    static const struct option o[] = {{"input", required_argument, NULL, 'i'},
                                      {"output", required_argument, NULL, 'o'},
                                      {"override", required_argument, NULL, 'O'},
                                      {"stream", required_argument, NULL, 's'},
                                      {0}};
    struct pos p = {0};
    const char *in = NULL, *outp = NULL;
    struct ksm_forward_args a = {.fused = fused};
    struct ksm_alpha_override ov[KSM_MAX_SLOTS];
    size_t n_ov = 0;
    int rc = 0;
    int opt_, ec_ = 0;
    while ((opt_ = ctl_next_opt(x, argc, argv, o, &ec_)) != -1) {
        char e[256];
        if (opt_ == CTL_OPT_EXIT) {
            rc = ec_;
            goto out;
        }
        switch (opt_) {
        case 1:
            if ((rc = add_pos(x, &p, optarg))) goto out;
            break;
        case 'i': in = optarg; break;
        case 'o': outp = optarg; break;
        case 's': a.stream = optarg; break;
        case 'O':
            if (!fused) {
                rc = ctl_usage_error(x, "--override is for fused-forward");
                goto out;
            }
            if (n_ov == KSM_MAX_SLOTS) {
                rc = ctl_usage_error(x, "too many --override");
                goto out;
            }
            if (ctl_parse_override("--override", optarg, &ov[n_ov], e, sizeof e)) {
                rc = ctl_usage_error(x, "%s", e);
                goto out;
            }
            n_ov++;
            break;
        }
    }
    if ((rc = want_pos(x, &p, 1, 1, "MODEL"))) goto out;
    if (!in) {
        rc = ctl_usage_error(x, "--input FILE is required");
        goto out;
    }
    ksm_tensor input;
    if ((rc = load_tensor(x, "--input", in, input_names, &input))) goto out;
    a.input = &input;
    a.overrides = ov;
    a.n_overrides = n_ov;
    struct ksm_forward_result r;
    if ((rc = ctl_connect(x)) == 0 && ksm_client_forward(x->client, p.v[0], &a, &r, &x->err) != 0)
        rc = ctl_call_failed(x);
    free(input.data);
    if (rc) goto out;
    if (outp) {
        static const char *const names[] = {"output"};
        rc = write_tensors(x, outp, names, &r.output, 1);
    }
    if (rc == 0) {
        if (x->json) {
            json_t *j = json_pack("{s:I, s:I}", "model_generation", (json_int_t)r.model_generation,
                                  "compute_ns", (json_int_t)r.compute_ns);
            if (outp)
                json_object_set_new(j, "output_file", json_string(outp));
            else
                json_object_set_new(j, "output", ctl_json_tensor(&r.output));
            ctl_json_print(j, stdout);
        } else {
            printf("generation %" PRIu64 ", compute %.3f ms\n", r.model_generation,
                   (double)r.compute_ns / 1e6);
            if (outp) {
                char d[64];
                printf("wrote %s to %s\n", ksm_tensor_describe(&r.output, d, sizeof d), outp);
            } else {
                print_tensor_rows(&r.output, stdout);
            }
        }
    }
    ksm_host_tensor_free(&r.output);
out:
    for (size_t i = 0; i < n_ov; i++) ctl_alpha_override_free(&ov[i]);
    return rc;
}

static int cmd_forward(struct ctl *x, int argc, char **argv)
{
    return forward_common(x, argc, argv, false);
}
static int cmd_fused_forward(struct ctl *x, int argc, char **argv)
{
    return forward_common(x, argc, argv, true);
}

static int cmd_evaluate(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"input", required_argument, NULL, 'i'},
                                      {"targets", required_argument, NULL, 't'},
                                      {"config", required_argument, NULL, 'c'},
                                      {"standard", no_argument, NULL, 'S'},
                                      {"logits", required_argument, NULL, 'l'},
                                      {"stream", required_argument, NULL, 's'},
                                      {0}};
    struct pos p = {0};
    const char *in = NULL, *tg = NULL, *logits = NULL;
    struct ksm_evaluate_args a = {0};
    struct ksm_alpha_config cfg[64];
    size_t n_cfg = 0;
    int rc = 0, opt_, ec_ = 0;
    ksm_tensor input = {0}, targets = {0};
    struct ksm_evaluate_result r = {0};
    while ((opt_ = ctl_next_opt(x, argc, argv, o, &ec_)) != -1) {
        char e[256];
        if (opt_ == CTL_OPT_EXIT) {
            rc = ec_;
            goto out;
        }
        switch (opt_) {
        case 1:
            if ((rc = add_pos(x, &p, optarg))) goto out;
            break;
        case 'i': in = optarg; break;
        case 't': tg = optarg; break;
        case 'l': logits = optarg; break;
        case 's': a.stream = optarg; break;
        case 'S': a.generate_standard = true; break;
        case 'c':
            if (n_cfg == 64) {
                rc = ctl_usage_error(x, "too many --config");
                goto out;
            }
            if (ctl_parse_alpha_config("--config", optarg, &cfg[n_cfg], e, sizeof e)) {
                rc = ctl_usage_error(x, "%s", e);
                goto out;
            }
            n_cfg++;
            break;
        }
    }
    if ((rc = want_pos(x, &p, 1, 1, "MODEL"))) goto out;
    if (!in || !tg) {
        rc = ctl_usage_error(x, "--input FILE and --targets FILE are required");
        goto out;
    }
    if ((rc = load_tensor(x, "--input", in, input_names, &input))) goto out;
    if ((rc = load_tensor(x, "--targets", tg, target_names, &targets))) goto out;
    /* Neither --config nor --standard: the model as it is ("main"). */
    static const struct ksm_alpha_config main_cfg = {.name = "main"};
    a.input = &input;
    a.targets = &targets;
    a.configs = n_cfg ? cfg : (a.generate_standard ? NULL : &main_cfg);
    a.n_configs = n_cfg ? n_cfg : (a.generate_standard ? 0 : 1);
    a.return_logits = logits != NULL;
    if ((rc = ctl_connect(x))) goto out;
    if (ksm_client_evaluate(x->client, p.v[0], &a, &r, &x->err) != 0) {
        rc = ctl_call_failed(x);
        goto out;
    }
    if (logits) {
        const char *names[64];
        ksm_tensor ts[64];
        size_t n = 0;
        for (size_t i = 0; i < r.n && n < 64; i++) {
            if (!r.results[i].logits.data) continue;
            names[n] = r.results[i].name;
            ts[n++] = r.results[i].logits;
        }
        if ((rc = write_tensors(x, logits, names, ts, n))) goto out;
    }
    if (x->json) {
        json_t *res = json_array();
        for (size_t i = 0; i < r.n; i++) {
            const struct ksm_config_result *c = &r.results[i];
            json_array_append_new(res,
                                  json_pack("{s:s, s:f, s:f, s:I, s:I}", "name", c->name, "loss",
                                            c->loss, "accuracy", c->accuracy, "correct",
                                            (json_int_t)c->correct, "total", (json_int_t)c->total));
        }
        ctl_json_print(json_pack("{s:o, s:I, s:I}", "results", res, "model_generation",
                                 (json_int_t)r.model_generation, "compute_ns",
                                 (json_int_t)r.compute_ns),
                       stdout);
    } else {
        static const char *const h[] = {"CONFIG", "LOSS", "ACCURACY", "CORRECT", "TOTAL"};
        struct ctl_table *t = ctl_table_new(5, h);
        for (int c = 1; c < 5; c++) ctl_table_right(t, c);
        for (size_t i = 0; i < r.n; i++) {
            ctl_table_row(t);
            ctl_table_cell(t, "%s", r.results[i].name);
            ctl_table_cell(t, "%.6f", r.results[i].loss);
            ctl_table_cell(t, "%.2f%%", r.results[i].accuracy);
            ctl_table_cell(t, "%" PRIu64, r.results[i].correct);
            ctl_table_cell(t, "%" PRIu64, r.results[i].total);
        }
        ctl_table_print(t, stdout);
        ctl_table_free(t);
        printf("generation %" PRIu64 ", compute %.3f ms\n", r.model_generation,
               (double)r.compute_ns / 1e6);
    }
out:
    ksm_evaluate_result_free(&r);
    free(input.data);
    free(targets.data);
    for (size_t i = 0; i < n_cfg; i++) ctl_alpha_config_free(&cfg[i]);
    return rc;
}

// ---- statistics ----

static void print_memory(struct ctl *x, const struct ksm_client_memory_stats *s)
{
    if (x->json) {
        json_t *a = json_array();
        for (size_t i = 0; i < s->n; i++) {
            json_t *d = ctl_json_mem_stats(&s->devices[i].stats);
            json_object_set_new(d, "device", json_string(s->devices[i].device));
            json_t *pm = json_object();
            for (size_t k = 0; k < s->devices[i].n_per_model; k++)
                json_object_set_new(pm, s->devices[i].per_model[k].model_id,
                                    json_integer((json_int_t)s->devices[i].per_model[k].bytes));
            json_object_set_new(d, "per_model_bytes", pm);
            json_array_append_new(a, d);
        }
        ctl_json_print(json_pack("{s:o}", "devices", a), stdout);
        return;
    }
    static const char *const h[] = {"DEVICE",   "ALLOCATED", "PEAK",       "RESERVED", "ACTIVE",
                                    "SEGMENTS", "ALLOCS",    "CACHE_HITS", "OOMS",     "CAP"};
    struct ctl_table *t = ctl_table_new(10, h);
    for (int c = 1; c < 10; c++) ctl_table_right(t, c);
    bool any_model = false;
    for (size_t i = 0; i < s->n; i++) {
        const struct ksm_mem_stats *m = &s->devices[i].stats;
        const struct ksm_pool_stats *a = &m->pool[KSM_POOL_ALL];
        char b1[32], b2[32], b3[32], b4[32], b5[32];
        ctl_table_row(t);
        ctl_table_cell(t, "%s", s->devices[i].device);
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)a->allocated_bytes.current, b1, sizeof b1));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)a->allocated_bytes.peak, b2, sizeof b2));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)a->reserved_bytes.current, b3, sizeof b3));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)a->active_bytes.current, b4, sizeof b4));
        ctl_table_cell(t, "%" PRId64, a->segment.current);
        ctl_table_cell(t, "%" PRId64, a->allocation.current);
        ctl_table_cell(t, "%" PRIu64, m->cache_hits);
        ctl_table_cell(t, "%" PRIu64, m->num_ooms);
        ctl_table_cell(t, "%s",
                       m->memory_cap_bytes ? ctl_bytes(m->memory_cap_bytes, b5, sizeof b5) : "-");
        any_model |= s->devices[i].n_per_model > 0;
    }
    ctl_table_print(t, stdout);
    ctl_table_free(t);
    if (!any_model) return;
    printf("\n");
    static const char *const h2[] = {"DEVICE", "MODEL", "BYTES"};
    t = ctl_table_new(3, h2);
    ctl_table_right(t, 2);
    for (size_t i = 0; i < s->n; i++)
        for (size_t k = 0; k < s->devices[i].n_per_model; k++) {
            char b[32];
            ctl_table_row(t);
            ctl_table_cell(t, "%s", s->devices[i].device);
            ctl_table_cell(t, "%s", s->devices[i].per_model[k].model_id);
            ctl_table_cell(t, "%s", ctl_bytes(s->devices[i].per_model[k].bytes, b, sizeof b));
        }
    ctl_table_print(t, stdout);
    ctl_table_free(t);
}

static int cmd_stats(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"device", required_argument, NULL, 'd'}, {0}};
    struct pos p = {0};
    const char *device = NULL;
    OPT_LOOP(o) switch (opt_)
    {
    case 'd': device = optarg; break;
    }
    int rc = want_pos(x, &p, 1, 2, "memory|cache [MODEL]");
    if (rc) return rc;
    if (!strcmp(p.v[0], "memory")) {
        if (p.n > 1) return ctl_usage_error(x, "stats memory takes no MODEL (use --device)");
        struct ksm_client_memory_stats s;
        CALL(ksm_client_memory_stats(x->client, device, &s, &x->err));
        print_memory(x, &s);
        ksm_client_memory_stats_free(&s);
        return 0;
    }
    if (strcmp(p.v[0], "cache"))
        return ctl_usage_error(x, "expected memory or cache, got '%s'", p.v[0]);
    struct ksm_client_cache_counters *v;
    size_t n;
    CALL(ksm_client_cache_stats(x->client, p.n > 1 ? p.v[1] : NULL, &v, &n, &x->err));
    if (x->json) {
        json_t *a = json_array();
        for (size_t i = 0; i < n; i++)
            json_array_append_new(a, ctl_json_cache_counters(v[i].model_id, &v[i].c));
        ctl_json_print(json_pack("{s:o}", "caches", a), stdout);
    } else {
        static const char *const h[] = {"CACHE",     "MODEL",   "SLOT",    "HITS",     "MISSES",
                                        "EVICTIONS", "INVALID", "ENTRIES", "CAPACITY", "BYTES"};
        struct ctl_table *t = ctl_table_new(10, h);
        for (int c = 3; c < 10; c++) ctl_table_right(t, c);
        for (size_t i = 0; i < n; i++) {
            const struct ksm_cache_counters *c = &v[i].c;
            char b[32];
            ctl_table_row(t);
            ctl_table_cell(t, "%s", c->cache);
            ctl_table_cell(t, "%s", v[i].model_id);
            ctl_table_cell(t, "%s", c->slot_id[0] ? c->slot_id : "-");
            ctl_table_cell(t, "%" PRIu64, c->hits);
            ctl_table_cell(t, "%" PRIu64, c->misses);
            ctl_table_cell(t, "%" PRIu64, c->evictions);
            ctl_table_cell(t, "%" PRIu64, c->invalidations);
            ctl_table_cell(t, "%" PRIu64, c->entries);
            if (c->capacity)
                ctl_table_cell(t, "%" PRIu64, c->capacity);
            else
                ctl_table_cell(t, "-");
            ctl_table_cell(t, "%s", ctl_bytes(c->bytes, b, sizeof b));
        }
        ctl_table_print(t, stdout);
        ctl_table_free(t);
    }
    free(v);
    return 0;
}

static int cmd_empty_cache(struct ctl *x, int argc, char **argv)
{
    static const struct option o[] = {{"device", required_argument, NULL, 'd'}, {0}};
    struct pos p = {0};
    const char *device = NULL;
    OPT_LOOP(o) switch (opt_)
    {
    case 'd': device = optarg; break;
    }
    int rc = want_pos(x, &p, 0, 0, "");
    if (rc) return rc;
    struct ksm_client_memory_stats s;
    CALL(ksm_client_empty_cache(x->client, device, &s, &x->err));
    print_memory(x, &s);
    ksm_client_memory_stats_free(&s);
    return 0;
}

// ---- The table ----

const struct ctl_cmd ctl_cmds[] = {
    {"info", cmd_info, "server name, version, devices and blueprints (GetServerInfo)", "info"},
    {"health", cmd_health, "grpc.health.v1 Check: SERVING or not (exit 6 when not)",
     "health [--service NAME]\n"
     "  --service NAME   the service to check ('' = the server, kasmina.v1.Kasmina)"},
    {"models", cmd_models, "list models, or show one (ListModels, GetModel)", "models [MODEL]"},
    {"create", cmd_create, "create a model (CreateModel)",
     "create [MODEL] [options]\n"
     "  --cnn | --transformer     host topology (default cnn)\n"
     "  --classes N --blocks N --channels N --pool-layers N --kernel N --in-channels N   (cnn)\n"
     "  --vocab N --embd N --heads N --layers N --block-size N --segments N       (transformer)\n"
     "  --slot ID                 register this slot (repeat; default every injection point)\n"
     "  --device NAME             cpu:0, cuda:0 (default: the server's)\n"
     "  --dtype T                 compute dtype f32|f16|bf16\n"
     "  --init-seed N             deterministic initialisation\n"
     "  --permissive              permissive quality gates\n"
     "  --auto-forward G1,G2,G3   gates StepEpoch may auto-advance through"},
    {"delete", cmd_delete, "delete a model (DeleteModel)", "delete MODEL"},
    {"germinate", cmd_germinate, "plant a seed in a slot (Germinate)",
     "germinate MODEL SLOT BLUEPRINT [options]\n"
     "  --seed-id ID             default SLOT-BLUEPRINT\n"
     "  --blend ALGO             linear|sigmoid|gated (default sigmoid)\n"
     "  --tempo N                blend tempo in epochs (default 5)\n"
     "  --alpha-algorithm A      add|multiply|gate\n"
     "  --alpha-target X         (0, 1], default 1\n"
     "  --init-seed N            deterministic seed weights"},
    {"advance", cmd_advance, "evaluate the gate and advance a seed (AdvanceStage)",
     "advance MODEL SLOT [--to STAGE]\n"
     "  --to STAGE   next (default), training, blending, holding, fossilized, ..."},
    {"prune", cmd_prune, "prune a seed now (Prune)",
     "prune MODEL SLOT [--reason TEXT] [--initiator WHO]"},
    {"schedule-prune", cmd_schedule_prune, "ramp a seed's alpha down, then prune (SchedulePrune)",
     "schedule-prune MODEL SLOT --steps N [--curve linear|cosine|sigmoid] [--steepness K]\n"
     "               [--reason TEXT] [--initiator WHO]"},
    {"set-alpha", cmd_set_alpha, "set a slot's alpha at once (SetAlpha)",
     "set-alpha MODEL SLOT ALPHA"},
    {"set-alpha-target", cmd_set_alpha_target, "schedule an alpha ramp (SetAlphaTarget)",
     "set-alpha-target MODEL SLOT TARGET [--steps N] [--curve C] [--steepness K]\n"
     "                 [--alpha-algorithm add|multiply|gate]"},
    {"step", cmd_step, "one lifecycle tick for a slot or all slots (StepEpoch)",
     "step MODEL [SLOT]"},
    {"metrics", cmd_metrics, "record measurements the gates read (RecordMetrics)",
     "metrics MODEL SLOT [options]\n"
     "  --val-accuracy PCT        validation accuracy, 0..100\n"
     "  --counterfactual PP       counterfactual contribution (percentage points)\n"
     "  --gradient-norm X --gradient-health X --grad-ratio X\n"
     "  --vanishing BOOL --exploding BOOL\n"
     "  --epoch N --max-epochs N"},
    {"slots", cmd_slots, "slot reports (GetSlotReports)", "slots MODEL [SLOT]"},
    {"forward", cmd_forward, "blended forward of a safetensors input (Forward)",
     "forward MODEL --input FILE[:TENSOR] [--output OUT.safetensors] [--stream KEY]\n"
     "  Without TENSOR: the file's only tensor, or the one named input/x.\n"
     "  Without --output the rows are printed (argmax and the first values)."},
    {"fused-forward", cmd_fused_forward, "fused forward with per-row alphas (FusedForward)",
     "fused-forward MODEL --input FILE[:TENSOR] --override SLOT=A,A,... [--override ...]\n"
     "              [--output OUT.safetensors] [--stream KEY]\n"
     "  One alpha per input row for every overridden slot."},
    {"evaluate", cmd_evaluate, "counterfactual evaluation: loss and accuracy (Evaluate)",
     "evaluate MODEL --input FILE[:TENSOR] --targets FILE[:TENSOR] [options]\n"
     "  --config NAME[:SLOT=A,...]   a config forcing slots' alphas (repeat)\n"
     "  --standard                   esper's standard configs (main, solo, all_off, ...)\n"
     "  --logits OUT.safetensors     also fetch the logits (one tensor per config)\n"
     "  --stream KEY\n"
     "  Without --config or --standard: one config 'main' (the model as it is).\n"
     "  Without TENSOR: input/x and targets/y are looked up by name."},
    {"load-weights", cmd_load_weights, "load a safetensors state_dict (LoadWeights)",
     "load-weights MODEL FILE [--strict]"},
    {"export-weights", cmd_export_weights, "export the state_dict as safetensors (ExportWeights)",
     "export-weights MODEL FILE   (FILE '-' = stdout)"},
    {"move", cmd_move, "move a model to another device or dtype (MoveModel)",
     "move MODEL [--device NAME] [--dtype f32|f16|bf16]"},
    {"stats", cmd_stats, "allocator or cache statistics (GetMemoryStats, GetCacheStats)",
     "stats memory [--device NAME]\n"
     "       stats cache [MODEL]"},
    {"empty-cache", cmd_empty_cache, "release cached device blocks (EmptyCache)",
     "empty-cache [--device NAME]"},
    {"events", cmd_events, "lifecycle events (WatchEvents)",
     "events [MODEL] [--after SEQ] [--follow] [--idle MS] [--count N]\n"
     "  --after SEQ   resume after this sequence number (default 0: what the server keeps)\n"
     "  --follow      keep waiting for new events (until interrupted)\n"
     "  --idle MS     without --follow: stop after MS without an event (default 500)\n"
     "  --count N     stop after N events"},
    {"top", ctl_cmd_top, "live view: memory, caches, models and slots, refreshed in place",
     "top [--interval SECONDS] [--once] [--count N]\n"
     "  --interval S   seconds between frames (default 2, 0.1..3600)\n"
     "  --once         print one plain-text frame and exit (for scripts)\n"
     "  --count N      stop after N frames (default: until Ctrl-C)"},
};
const size_t ctl_n_cmds = sizeof ctl_cmds / sizeof ctl_cmds[0];
