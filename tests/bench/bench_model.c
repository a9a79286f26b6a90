/*
 * Whole-engine throughput through the public API (include/kasmina/kasmina.h) and over the wire
 * (libkasmina-client against a kasminad), against tests/bench/torch_model.py running
 * esper-lite's own code on the same models with the same weights.
 *
 *   bench_model export DIR
 *       Builds the models, writes their weights with ksm_model_export_weights to
 *       DIR/cnn.safetensors, DIR/cnn8.safetensors and DIR/tf.safetensors (esper state_dict names
 *       + each slot's _extra_state), and DIR/io.safetensors: the inputs and targets, and
 *       kasmina's outputs (CNN logits, Evaluate logits/losses/accuracies, base-8 CNN logits,
 *       transformer logits of row 0) for the numerics check in torch_model.py.
 *   bench_model serve DIR [TARGET]
 *       Builds the models and loads DIR/{cnn,cnn8,tf}.safetensors (strict) so the weights are
 *       exactly the exported ones, prints "ready", then answers one command per stdin line,
 *       "<row> <reps>": reps 0 runs the row's untimed warm-up (plans, caches; two steps for a
 *       training row, each printing "loss name=<row> step=<k> loss=... correct=... total=...")
 *       and prints "ok <row>"; otherwise it prints the median of reps timed calls:
 *           row name=cnn_forward ms=12.3 per_s=10406.5 unit=img/s
 *       In-process rows: cnn_forward, cnn_eval_k8, tf_forward, tf_eval_k2, cnn8_forward,
 *       cnn_train_inproc and tf_train_inproc (ksm_model_train_step on models of their own, on
 *       cpu:2 and cpu:3).
 *       With TARGET (a kasminad address, "unix:/path/to.sock"; the daemon started with
 *       --cpu-devices 3 and --max-message-bytes of at least 256M), the rows over the wire, each
 *       model built in that daemon on first use through libkasmina-client (CreateModel, the same
 *       lifecycle RPCs, LoadWeights of the exported file):
 *         cnn_forward_rpc       ksm_client_forward of the same input (model "cnn", cpu:0); its
 *                               warm-up call checks the logits against the in-process engine's
 *         cnn_forward_rpc_wire  the same Forward request to a model id the daemon does not
 *                               hold: the request's whole way without the engine
 *         cnn_train             ksm_client_train_step (TrainStep) on model "cnn_train" (cpu:1):
 *                               esper's defaults (ConfigureTraining: host SGD lr 0.01 momentum
 *                               0.9 weight decay 5e-4, seeds lr 0.01 momentum 0.9, clip 1.0,
 *                               gradient statistics every 10 steps), every slot, batch 128
 *         tf_train              the same on the transformer (model "tf_train", cpu:2), batch
 *                               8 x 256 tokens. Where the daemon answers UNIMPLEMENTED (a
 *                               device it does not train on), the warm-up prints
 *                               "unimplemented name=tf_train msg=..." and the row answers
 *                               "skip tf_train".
 *       The command "mem" prints, per row, the device allocator's figures over that row's
 *       timed calls (steady state: after the warm-up), then "ok mem":
 *           mem name=cnn_forward device=cpu:0 calls=8 allocs=0 cache_hits=0 device_allocs=0
 *               peak_reserved=... peak_allocated=... mallocs=0
 *       allocs: requests to the caching allocator; device_allocs: those that needed new device
 *       memory; mallocs: glibc malloc/calloc/realloc/memalign calls of this process during the
 *       calls (every thread; in-process rows only, -1 otherwise or in sanitizer builds). The
 *       engine's devices: the CNNs on cpu:0, the transformer on cpu:1, the in-process training
 *       models on cpu:2 (CNN) and cpu:3 (TF) (logical CPU devices, one compute pool), so each
 *       workload has an allocator of its own; the peaks are the high-water marks over the row's
 *       calls (ksm_alloc_reset_peak_stats before each batch of calls). The rpc rows' figures are
 * the daemon's allocator of the model's device, through MemoryStats (no reset over the wire: the
 * peaks since the daemon started; each device holds one model). tests/bench/run.sh model|train
 * drives this and torch_model.py's same protocol call by call, alternating the two sides (the VM's
 * speed drifts). Both modes first print "info openblas_core=<core>": the OpenBLAS kernels the
 * engine's CPU backend runs (run.sh gives PyTorch's configurations the same).
 *
 * Models (issue 7 a-c, issue 14 part 9):
 *   cnn:  base 32, 3 blocks, all 6 slots; conv_light r0c1, attention r1c1, bottleneck r0c2,
 *         ADD, BLENDING (permissive gates) at alpha 0.5; batch 128 at 32x32 F32.
 *         Evaluate: K = 8 explicit configs (every on/off combination of the three seeds,
 *         on = 1, off = 0; config c sets seed j on when bit j of c is set) x 128 rows.
 *   cnn8: esper's cifar_baseline host (base 8, 3 blocks), the same slots and seeds.
 *   tf:   TinyStories preset (V 50257, D 384, 6 layers, 6 heads, block 256, 3 segments), dropout
 *         0; lora r0c0 and mlp r0c1, ADD, BLENDING at alpha 0.5; batch 8 x 256 tokens.
 *         Evaluate: K = 2 configs ("main": both 0.5, "all_off": both 0), loss in the engine.
 */
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"
#include "kasmina/alloc.h"
#include "kasmina/client.h"
#include "kasmina/kasmina.h"
#include "kasmina/safetensors.h"
#include "kasmina/training.h"

#define CNN_B  128
#define CNN_HW 32
#define CNN_K  8
#define TF_B   8
#define TF_T   256
#define TF_V   50257
#define TF_K   2

/* ---- glibc malloc calls of this process (every thread), for the "mem" figures ----
 * The benchmark defines malloc & co. itself and forwards them to glibc's __libc_* entry
 * points, counting the calls: one relaxed atomic increment each. Not in sanitizer builds (the
 * sanitizers interpose malloc themselves). */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define BENCH_COUNT_MALLOC 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) ||                         \
    __has_feature(memory_sanitizer)
#define BENCH_COUNT_MALLOC 0
#endif
#endif
#if !defined(BENCH_COUNT_MALLOC) && defined(__GLIBC__)
#define BENCH_COUNT_MALLOC 1
#endif

#if BENCH_COUNT_MALLOC
static atomic_ullong n_mallocs;
extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t n);
extern void *__libc_memalign(size_t align, size_t n);
extern void __libc_free(void *p);

#define COUNT() atomic_fetch_add_explicit(&n_mallocs, 1, memory_order_relaxed)
void *malloc(size_t n)
{
    COUNT();
    return __libc_malloc(n);
}
void *calloc(size_t n, size_t size)
{
    COUNT();
    return __libc_calloc(n, size);
}
void *realloc(void *p, size_t n)
{
    COUNT();
    return __libc_realloc(p, n);
}
void free(void *p) { __libc_free(p); }
void *memalign(size_t align, size_t n)
{
    COUNT();
    return __libc_memalign(align, n);
}
void *aligned_alloc(size_t align, size_t n)
{
    COUNT();
    return __libc_memalign(align, n);
}
int posix_memalign(void **out, size_t align, size_t n)
{
    COUNT();
    if (align % sizeof(void *) != 0 || (align & (align - 1)) != 0) return EINVAL;
    void *p = __libc_memalign(align, n);
    if (p == NULL) return ENOMEM;
    *out = p;
    return 0;
}
#undef COUNT
static long long mallocs_now(void)
{
    return (long long)atomic_load_explicit(&n_mallocs, memory_order_relaxed);
}
#else
static long long mallocs_now(void) { return -1; }
#endif

static char err[512];

#define CHECKE(x)                                                                                  \
    do {                                                                                           \
        int rc_ = (x);                                                                             \
        if (rc_ != 0) {                                                                            \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #x,                  \
                    ksm_strerror(rc_), err);                                                       \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static const char *const CNN_SEED_SLOTS[3] = {"r0c1", "r1c1", "r0c2"};
static const char *const CNN_SEED_BPS[3] = {"conv_light", "attention", "bottleneck"};
static const char *const TF_SEED_SLOTS[2] = {"r0c0", "r0c1"};
static const char *const TF_SEED_BPS[2] = {"lora", "mlp"};

/* The benchmark's model configurations. */
enum cfg { CFG_CNN, CFG_CNN8, CFG_TF, N_CFG };
static const char *const CFG_FILE[N_CFG] = {"cnn", "cnn8", "tf"};

static void model_spec(enum cfg c, const char *device, struct ksm_model_spec *spec)
{
    memset(spec, 0, sizeof *spec);
    spec->permissive_gates = true;
    spec->init_seed = (uint64_t)c + 1;
    spec->device = device;
    if (c == CFG_TF) {
        spec->topology = KSM_TOPOLOGY_TRANSFORMER; /* zero fields = the TinyStories preset */
        /* dropout 0 (esper's preset and kasmina's default: 0.1): the training steps of both
         * sides are then deterministic and their losses comparable (torch_model.py builds
         * esper's host with dropout 0 too); Forward and Evaluate never apply it */
        spec->transformer.dropout = 0.0;
        spec->transformer.dropout_set = true;
        return;
    }
    spec->topology = KSM_TOPOLOGY_CNN;
    spec->cnn.base_channels = c == CFG_CNN8 ? 8 : 32; /* 8: esper's cifar_baseline */
    spec->cnn.n_blocks = 3;
}

static int cfg_seeds(enum cfg c, const char *const **slots, const char *const **bps)
{
    *slots = c == CFG_TF ? TF_SEED_SLOTS : CNN_SEED_SLOTS;
    *bps = c == CFG_TF ? TF_SEED_BPS : CNN_SEED_BPS;
    return c == CFG_TF ? 2 : 3;
}

/* G2 wants 10 recorded epochs of training (the same sequence as tests/engine). */
static const struct ksm_metrics_update GROW_METRICS = {.has_val_accuracy = true,
                                                       .val_accuracy = 50,
                                                       .has_gradient_health = true,
                                                       .gradient_health = 0.9,
                                                       .has_exploding = true,
                                                       .exploding = false};

static struct ksm_germinate_args germ_args(const char *bp, uint64_t seed)
{
    return (struct ksm_germinate_args){.blueprint_id = bp,
                                       .blend_algorithm_id = "linear",
                                       .alpha_algorithm = KSM_ALGO_ADD,
                                       .init_seed = seed};
}

static void check_grown(const char *where, const char *slot, const struct ksm_slot_report *r)
{
    if (r->stage != KSM_STAGE_BLENDING || r->controller.alpha != 0.5) {
        fprintf(stderr, "%s%s: expected BLENDING at 0.5, got %s at %g\n", where, slot,
                ksm_stage_name(r->stage), r->controller.alpha);
        exit(1);
    }
}

static void check_gate(const char *where, const char *slot, enum ksm_stage want,
                       const struct ksm_gate_result *gate, const struct ksm_slot_report *r)
{
    if (!gate->passed || r->stage != want) {
        fprintf(stderr, "%s%s: gate %s to %s failed: %s\n", where, slot,
                ksm_gate_level_name(gate->gate), ksm_stage_name(want),
                gate->n_failed ? gate->checks_failed[0] : "");
        exit(1);
    }
}

/* Germinates, advances to BLENDING (permissive gates) and sets alpha 0.5. */
static void grow(ksm_model *m, const char *slot, const char *bp, uint64_t seed)
{
    struct ksm_germinate_args g = germ_args(bp, seed);
    CHECKE(ksm_model_germinate(m, slot, &g, NULL, err, sizeof err));
    struct ksm_gate_result gate;
    struct ksm_slot_report r;
    for (enum ksm_stage want = KSM_STAGE_TRAINING; want <= KSM_STAGE_BLENDING; want++) {
        if (want == KSM_STAGE_BLENDING)
            for (int i = 0; i < 10; i++)
                CHECKE(ksm_model_record_metrics(m, slot, &GROW_METRICS, NULL, err, sizeof err));
        CHECKE(ksm_model_advance(m, slot, want, &gate, &r, err, sizeof err));
        check_gate("", slot, want, &gate, &r);
    }
    CHECKE(ksm_model_set_alpha(m, slot, 0.5, &r, err, sizeof err));
    check_grown("", slot, &r);
}

/* Device names of the engine side: the CNNs on cpu:0, the transformer on cpu:1, the in-process
 * training models on cpu:2 and cpu:3 (logical CPU devices sharing one compute pool), so that each
 * workload has an allocator of its own (the "mem" figures). On another default device
 * (KASMINA_BENCH_DEVICE) everything shares it (NULL). */
static const char *dev_cnn, *dev_tf, *dev_train, *dev_train_tf;

static ksm_model *make_model(ksm_engine *e, const char *id, enum cfg c, const char *device)
{
    struct ksm_model_spec spec;
    model_spec(c, device, &spec);
    ksm_model *m;
    CHECKE(ksm_engine_model_create(e, id, &spec, &m, err, sizeof err));
    const char *const *slots, *const *bps;
    int n = cfg_seeds(c, &slots, &bps);
    for (int i = 0; i < n; i++) grow(m, slots[i], bps[i], (c == CFG_TF ? 100 : 10) + (uint64_t)i);
    return m;
}

/* ---- inputs (deterministic) ---- */

static uint64_t xs(uint64_t *x)
{
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 0x2545F4914F6CDD1Dull;
}

struct inputs {
    float *cnn_x;
    int64_t *cnn_y, *tf_x, *tf_y;
    ksm_tensor tcnn_x, tcnn_y, ttf_x, ttf_y;
};

static void make_inputs(struct inputs *in)
{
    size_t nx = (size_t)CNN_B * 3 * CNN_HW * CNN_HW, nt = (size_t)TF_B * TF_T;
    in->cnn_x = malloc(nx * sizeof(float));
    in->cnn_y = malloc(CNN_B * sizeof(int64_t));
    in->tf_x = malloc(nt * sizeof(int64_t));
    in->tf_y = malloc(nt * sizeof(int64_t));
    bench_fill(in->cnn_x, nx, 42);
    uint64_t s = 0x1234567ull;
    for (int i = 0; i < CNN_B; i++) in->cnn_y[i] = (int64_t)(xs(&s) % 10);
    for (size_t i = 0; i < nt; i++) in->tf_x[i] = (int64_t)(xs(&s) % TF_V);
    for (int b = 0; b < TF_B; b++)
        for (int t = 0; t < TF_T; t++)
            in->tf_y[b * TF_T + t] =
                t + 1 < TF_T ? in->tf_x[b * TF_T + t + 1] : (int64_t)(xs(&s) % TF_V);
    ksm_tensor_init(&in->tcnn_x, NULL, in->cnn_x, KSM_DTYPE_F32, 4,
                    (const int64_t[]){CNN_B, 3, CNN_HW, CNN_HW});
    ksm_tensor_init(&in->tcnn_y, NULL, in->cnn_y, KSM_DTYPE_I64, 1, (const int64_t[]){CNN_B});
    ksm_tensor_init(&in->ttf_x, NULL, in->tf_x, KSM_DTYPE_I64, 2, (const int64_t[]){TF_B, TF_T});
    ksm_tensor_init(&in->ttf_y, NULL, in->tf_y, KSM_DTYPE_I64, 2, (const int64_t[]){TF_B, TF_T});
}

static void free_inputs(struct inputs *in)
{
    free(in->cnn_x);
    free(in->cnn_y);
    free(in->tf_x);
    free(in->tf_y);
}

/* ---- Evaluate configs ---- */

struct configs {
    struct ksm_alpha_config c[CNN_K];
    char names[CNN_K][16];
    float alpha[CNN_K][3];
    size_t n;
};

static void cnn_configs(struct configs *cf)
{
    cf->n = CNN_K;
    for (int c = 0; c < CNN_K; c++) {
        snprintf(cf->names[c], sizeof cf->names[c], "on:%d%d%d", c & 1, (c >> 1) & 1, (c >> 2) & 1);
        for (int j = 0; j < 3; j++) cf->alpha[c][j] = (c >> j) & 1 ? 1.0f : 0.0f;
        cf->c[c] = (struct ksm_alpha_config){
            .name = cf->names[c], .slot_ids = CNN_SEED_SLOTS, .alpha = cf->alpha[c], .n = 3};
    }
}

static void tf_configs(struct configs *cf)
{
    cf->n = TF_K;
    snprintf(cf->names[0], sizeof cf->names[0], "main");
    snprintf(cf->names[1], sizeof cf->names[1], "all_off");
    for (int j = 0; j < 2; j++) {
        cf->alpha[0][j] = 0.5f;
        cf->alpha[1][j] = 0.0f;
    }
    for (int c = 0; c < TF_K; c++)
        cf->c[c] = (struct ksm_alpha_config){
            .name = cf->names[c], .slot_ids = TF_SEED_SLOTS, .alpha = cf->alpha[c], .n = 2};
}

/* ---- timing ---- */

/* Timed calls reuse one output buffer, as an embedding application would (the logits of the
 * transformer row are 411 MB: a fresh buffer per call would be page-faulted in each time). */
static void *out_buf;
static size_t out_cap;

static double time_forward(ksm_model *m, const ksm_tensor *x, ksm_tensor *keep)
{
    struct ksm_forward_args a = {.input = x};
    if (!keep) {
        a.output_buffer = out_buf;
        a.output_capacity = out_cap;
    }
    struct ksm_forward_result r;
    double t0 = bench_now();
    CHECKE(ksm_model_forward(m, &a, &r, err, sizeof err));
    double dt = bench_now() - t0;
    if (keep)
        *keep = r.output;
    else if (r.output.data != out_buf) { /* a bigger output: adopt its buffer for the next ones */
        free(out_buf);
        out_buf = r.output.data;
        out_cap = ksm_tensor_nbytes(&r.output);
    }
    return dt;
}

static double time_evaluate(ksm_model *m, const ksm_tensor *x, const ksm_tensor *y,
                            const struct configs *cf, struct ksm_evaluate_result *keep)
{
    struct ksm_evaluate_args a = {.input = x, .targets = y, .configs = cf->c, .n_configs = cf->n};
    struct ksm_evaluate_result r;
    double t0 = bench_now();
    CHECKE(ksm_model_evaluate(m, &a, &r, err, sizeof err));
    double dt = bench_now() - t0;
    if (r.n != cf->n) {
        fprintf(stderr, "evaluate returned %zu results, expected %zu\n", r.n, cf->n);
        exit(1);
    }
    if (keep)
        *keep = r;
    else
        ksm_evaluate_result_free(&r);
    return dt;
}

static void report(const char *name, double *s, int reps, double items, const char *unit)
{
    double med = bench_median(s, reps);
    printf("row name=%s ms=%.3f per_s=%.1f unit=%s\n", name, med * 1e3, items / med, unit);
    fflush(stdout);
}

static void *read_whole(const char *dir, const char *name, size_t *len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, name);
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "%s: %s (run `bench_model export %s` first)\n", path, strerror(errno), dir);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(*len);
    if (buf == NULL || fread(buf, 1, *len, f) != *len) {
        fprintf(stderr, "%s: short read\n", path);
        exit(1);
    }
    fclose(f);
    return buf;
}

static ksm_model *load_model(ksm_engine *e, const char *dir, const char *id, enum cfg c,
                             const char *device)
{
    ksm_model *m = make_model(e, id, c, device);
    size_t len;
    void *buf = read_whole(dir, CFG_FILE[c], &len);
    struct ksm_load_result lr;
    CHECKE(ksm_model_load_weights(m, buf, len, true, &lr, err, sizeof err));
    ksm_load_result_free(&lr);
    free(buf);
    return m;
}

/* ---- training ---- */

/* esper's trainer (process_train_batch as env_factory/vectorized_trainer configure it): host
 * SGD lr 0.01 momentum 0.9 weight decay 5e-4, seed SGD lr 0.01 momentum 0.9, clip 1.0,
 * gradient statistics every 10 batches: kasmina's defaults, set explicitly. */
static struct ksm_training_config esper_training(void)
{
    struct ksm_training_config c;
    ksm_training_config_defaults(&c);
    c.host = (struct ksm_sgd_settings){.lr = 0.01, .momentum = 0.9, .weight_decay = 5e-4};
    c.seed = (struct ksm_sgd_settings){.lr = 0.01, .momentum = 0.9};
    c.max_grad_norm = 1.0;
    c.gradient_telemetry_stride = 10;
    return c;
}

static void print_loss(const char *row, int step, const struct ksm_train_result *r)
{
    printf("loss name=%s step=%d loss=%.9g correct=%llu total=%llu\n", row, step, r->loss,
           (unsigned long long)r->correct, (unsigned long long)r->total);
    fflush(stdout);
}

/* One in-process step: its seconds, or -1 when the engine does not train this model here
 * (KSM_EUNSUPPORTED, e.g. on a CUDA device: printed once per call, "unimplemented name=..."). */
static double time_train(ksm_model *m, const char *row, const ksm_tensor *x, const ksm_tensor *y,
                         struct ksm_train_result *r)
{
    struct ksm_train_args a = {.input = x, .targets = y, .collect_gradients = -1};
    double t0 = bench_now();
    int rc = ksm_model_train_step(m, &a, r, err, sizeof err);
    double dt = bench_now() - t0;
    if (rc == KSM_EUNSUPPORTED) {
        printf("unimplemented name=%s msg=%s\n", row, err);
        fflush(stdout);
        return -1;
    }
    CHECKE(rc);
    return dt;
}

/* ---- the same models in a kasminad, through libkasmina-client ---- */

static struct ksm_client_error cerr;

#define CHECKC(x)                                                                                  \
    do {                                                                                           \
        int rc_ = (x);                                                                             \
        if (rc_ != 0) {                                                                            \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #x,                  \
                    ksm_strerror(rc_), cerr.message);                                              \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* grow() through the RPCs: Germinate, RecordMetrics x 10 before G2, Advance to each stage up to
 * BLENDING, SetAlpha 0.5. */
static void rpc_grow(ksm_client *c, const char *model, const char *slot, const char *bp,
                     uint64_t seed)
{
    struct ksm_germinate_args g = germ_args(bp, seed);
    CHECKC(ksm_client_germinate(c, model, slot, &g, NULL, &cerr));
    struct ksm_gate_result gate;
    struct ksm_slot_report r;
    for (enum ksm_stage want = KSM_STAGE_TRAINING; want <= KSM_STAGE_BLENDING; want++) {
        if (want == KSM_STAGE_BLENDING)
            for (int i = 0; i < 10; i++)
                CHECKC(ksm_client_record_metrics(c, model, slot, &GROW_METRICS, NULL, &cerr));
        CHECKC(ksm_client_advance(c, model, slot, want, &gate, &r, &cerr));
        check_gate("rpc ", slot, want, &gate, &r);
    }
    CHECKC(ksm_client_set_alpha(c, model, slot, 0.5, &r, &cerr));
    check_grown("rpc ", slot, &r);
}

/* The daemon side's models: the forward rows' CNN and the two training models. */
enum rpc_model { RM_CNN, RM_CNN_TRAIN, RM_TF_TRAIN, N_RM };
static const char *const RM_ID[N_RM] = {"cnn", "cnn_train", "tf_train"};
static const enum cfg RM_CFG[N_RM] = {CFG_CNN, CFG_CNN, CFG_TF};
static const char *const RM_CPU_DEV[N_RM] = {"cpu:0", "cpu:1", "cpu:2"};

struct rpc_side {
    ksm_client *c;
    const char *dir;
    bool on_cpu;              /* the daemon's models on its CPU devices (else its default) */
    bool made[N_RM];          /* created in the daemon */
    char device[N_RM][32];    /* the daemon's device of each model */
    bool unimplemented[N_RM]; /* TrainStep answered UNIMPLEMENTED */
};

static ksm_client *rpc_connect(const char *target)
{
    ksm_client *c;
    /* The daemon may still be starting: wait for it. A transformer TrainStep takes seconds, its
     * weights are 125 MB (the daemon runs with --max-message-bytes 256M or more). */
    struct ksm_client_options o = {
        .wait_for_ready = true, .deadline_ms = 600000, .max_message_bytes = 512u << 20};
    CHECKC(ksm_client_connect(target, &o, &c, &cerr));
    return c;
}

/* Builds model k in the daemon (once): CreateModel, the lifecycle RPCs, LoadWeights (strict) of
 * the exported file, and for the training models ConfigureTraining with esper's settings. */
static void rpc_model(struct rpc_side *rs, enum rpc_model k)
{
    if (rs->made[k]) return;
    struct ksm_model_spec spec;
    model_spec(RM_CFG[k], rs->on_cpu ? RM_CPU_DEV[k] : NULL, &spec);
    ksm_client_model_delete(rs->c, RM_ID[k], NULL, NULL); /* one left by an earlier run */
    struct ksm_model_info info;
    CHECKC(ksm_client_model_create(rs->c, RM_ID[k], &spec, &info, &cerr));
    snprintf(rs->device[k], sizeof rs->device[k], "%s", info.device);
    const char *const *slots, *const *bps;
    int n = cfg_seeds(RM_CFG[k], &slots, &bps);
    for (int i = 0; i < n; i++)
        rpc_grow(rs->c, RM_ID[k], slots[i], bps[i], (RM_CFG[k] == CFG_TF ? 100 : 10) + (uint64_t)i);
    size_t len;
    void *buf = read_whole(rs->dir, CFG_FILE[RM_CFG[k]], &len);
    struct ksm_load_result lr;
    CHECKC(ksm_client_load_weights(rs->c, RM_ID[k], buf, len, true, &lr, &cerr));
    ksm_load_result_free(&lr);
    free(buf);
    if (k != RM_CNN) {
        struct ksm_training_config tc = esper_training();
        CHECKC(ksm_client_configure_training(rs->c, RM_ID[k], &tc, true, NULL, NULL, &cerr));
    }
    rs->made[k] = true;
}

/* The rpc row's result is compared with this (the in-process engine's logits). */
static ksm_tensor ref_logits;

static void check_rpc_logits(const ksm_tensor *out)
{
    int64_t n = ksm_tensor_numel(&ref_logits);
    bool same_shape = ksm_tensor_numel(out) == n && out->ndim == ref_logits.ndim;
    double maxd = 0, maxr = 0;
    const float *a = out->data, *b = ref_logits.data;
    for (int64_t i = 0; same_shape && i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= maxd)) maxd = d; /* NaN propagates */
        if (fabs((double)b[i]) > maxr) maxr = fabs((double)b[i]);
    }
    if (!same_shape) maxd = INFINITY;
    printf("check name=cnn_forward_rpc_logits_vs_in_process max_abs_diff=%.3g max_rel_err=%.3g "
           "%s\n",
           maxd, maxr > 0 ? maxd / maxr : maxd, maxd <= 1e-6 * maxr ? "ok" : "FAIL");
}

/* Seconds of one ksm_client_forward of x to model "cnn" (its logits are checked when check
 * is set: the warm-up call), or for the wire row a model the daemon does not hold. */
static double time_rpc_forward(ksm_client *c, const ksm_tensor *x, bool wire, bool check)
{
    struct ksm_forward_args a = {.input = x};
    struct ksm_forward_result r;
    double t0 = bench_now();
    int rc = ksm_client_forward(c, wire ? "no-such-model" : RM_ID[RM_CNN], &a, &r, &cerr);
    double dt = bench_now() - t0;
    if (wire) {
        /* the daemon must have decoded the request and then found no model */
        if (rc != KSM_ENOMODEL) {
            fprintf(stderr, "rpc forward to a missing model: expected KSM_ENOMODEL, got %s: %s\n",
                    ksm_err_name(rc), cerr.message);
            exit(1);
        }
        return dt;
    }
    CHECKC(rc);
    if (check) check_rpc_logits(&r.output);
    ksm_host_tensor_free(&r.output);
    return dt;
}

/* One TrainStep of model k: its seconds, or -1 when the daemon answers UNIMPLEMENTED (the
 * transformer while kasmina does not train it: printed once, "unimplemented name=..."). */
static double time_rpc_train(struct rpc_side *rs, enum rpc_model k, const char *row,
                             const ksm_tensor *x, const ksm_tensor *y, struct ksm_train_result *r)
{
    if (rs->unimplemented[k]) return -1;
    struct ksm_train_args a = {.input = x, .targets = y, .collect_gradients = -1};
    double t0 = bench_now();
    int rc = ksm_client_train_step(rs->c, RM_ID[k], &a, r, &cerr);
    double dt = bench_now() - t0;
    if (rc != 0 && cerr.grpc_status == 12 /* GRPC_STATUS_UNIMPLEMENTED */) {
        rs->unimplemented[k] = true;
        printf("unimplemented name=%s msg=%s\n", row, cerr.message);
        fflush(stdout);
        return -1;
    }
    CHECKC(rc);
    return dt;
}

/* ---- device allocator figures per row ---- */

struct mem_acc {
    bool used;
    int calls;
    int64_t allocs;
    uint64_t hits, dev_allocs;
    int64_t peak_reserved, peak_allocated;
    long long mallocs; /* -1: not measured */
};

struct mem_src {
    ksm_allocator *al; /* in-process; NULL: the daemon's device dev, over MemoryStats */
    ksm_client *c;
    const char *dev;
};

static void mem_read(const struct mem_src *src, struct ksm_mem_stats *out)
{
    if (src->al != NULL) {
        ksm_alloc_get_stats(src->al, out);
        return;
    }
    struct ksm_client_memory_stats ms;
    CHECKC(ksm_client_memory_stats(src->c, src->dev, &ms, &cerr));
    if (ms.n != 1) {
        fprintf(stderr, "MemoryStats of %s returned %zu devices\n", src->dev, ms.n);
        exit(1);
    }
    *out = ms.devices[0].stats;
    ksm_client_memory_stats_free(&ms);
}

/* Before a row's timed calls: the engine's peaks restart from the current level. */
static void mem_before(const struct mem_src *src, struct ksm_mem_stats *s0, long long *m0)
{
    if (src->al != NULL) ksm_alloc_reset_peak_stats(src->al);
    mem_read(src, s0);
    *m0 = mallocs_now();
}

static void mem_after(const struct mem_src *src, const struct ksm_mem_stats *s0, long long m0,
                      int calls, struct mem_acc *acc)
{
    long long m1 = mallocs_now();
    struct ksm_mem_stats s1;
    mem_read(src, &s1);
    const struct ksm_pool_stats *a0 = &s0->pool[KSM_POOL_ALL], *a1 = &s1.pool[KSM_POOL_ALL];
    if (!acc->used) acc->mallocs = src->al != NULL && m0 >= 0 ? 0 : -1;
    acc->used = true;
    acc->calls += calls;
    acc->allocs += a1->allocation.allocated - a0->allocation.allocated;
    acc->hits += s1.cache_hits - s0->cache_hits;
    acc->dev_allocs += s1.num_device_alloc - s0->num_device_alloc;
    if (acc->mallocs >= 0) acc->mallocs += m1 - m0;
    /* After a reset, peak >= current: the row's own high-water mark over the calls. For the
     * daemon (no reset over the wire) it is the high-water mark since it started. */
    if (a1->reserved_bytes.peak > acc->peak_reserved) acc->peak_reserved = a1->reserved_bytes.peak;
    if (a1->allocated_bytes.peak > acc->peak_allocated)
        acc->peak_allocated = a1->allocated_bytes.peak;
}

/* ---- serve ---- */

enum row_id {
    R_CNN_FWD,
    R_CNN_EVAL,
    R_TF_FWD,
    R_TF_EVAL,
    R_CNN8_FWD,
    R_CNN_TRAIN_INPROC,
    R_TF_TRAIN_INPROC,
    R_CNN_RPC, /* the rows from here on need TARGET */
    R_CNN_WIRE,
    R_CNN_TRAIN,
    R_TF_TRAIN,
    N_ROWS
};

static const struct {
    const char *name, *unit;
    double items;
} ROWS[N_ROWS] = {
    [R_CNN_FWD] = {"cnn_forward", "img/s", CNN_B},
    [R_CNN_EVAL] = {"cnn_eval_k8", "rows/s", (double)CNN_K *CNN_B},
    [R_TF_FWD] = {"tf_forward", "tok/s", (double)TF_B *TF_T},
    [R_TF_EVAL] = {"tf_eval_k2", "tok/s", (double)TF_K *TF_B *TF_T},
    [R_CNN8_FWD] = {"cnn8_forward", "img/s", CNN_B},
    [R_CNN_TRAIN_INPROC] = {"cnn_train_inproc", "img/s", CNN_B},
    [R_TF_TRAIN_INPROC] = {"tf_train_inproc", "tok/s", (double)TF_B *TF_T},
    [R_CNN_RPC] = {"cnn_forward_rpc", "img/s", CNN_B},
    [R_CNN_WIRE] = {"cnn_forward_rpc_wire", "req/s", 1},
    [R_CNN_TRAIN] = {"cnn_train", "img/s", CNN_B},
    [R_TF_TRAIN] = {"tf_train", "tok/s", (double)TF_B *TF_T},
};

struct server {
    ksm_engine *e;
    const char *dir;
    ksm_model *cnn, *cnn8, *tf, *train[2]; /* the training models (CNN, TF): on first use */
    struct inputs in;
    struct configs ccf, tcf;
    struct rpc_side rs; /* rs.c NULL: no daemon */
    struct mem_acc mem[N_ROWS];
};

static ksm_allocator *model_allocator(ksm_engine *e, ksm_model *m)
{
    struct ksm_model_info info;
    CHECKE(ksm_model_get_info(m, &info));
    return ksm_engine_allocator(e, ksm_engine_find_device(e, info.device));
}

static const char *model_device(ksm_model *m, char *buf, size_t len)
{
    struct ksm_model_info info;
    CHECKE(ksm_model_get_info(m, &info));
    snprintf(buf, len, "%s", info.device);
    return buf;
}

/* The row's allocator source and device name. */
static void row_mem_src(struct server *sv, int w, struct mem_src *src, char *dev, size_t len)
{
    memset(src, 0, sizeof *src);
    ksm_model *m = NULL;
    switch (w) {
    case R_CNN_FWD:
    case R_CNN_EVAL: m = sv->cnn; break;
    case R_CNN8_FWD: m = sv->cnn8; break;
    case R_TF_FWD:
    case R_TF_EVAL: m = sv->tf; break;
    case R_CNN_TRAIN_INPROC: m = sv->train[0]; break;
    case R_TF_TRAIN_INPROC: m = sv->train[1]; break;
    default: break;
    }
    if (m != NULL) {
        src->al = model_allocator(sv->e, m);
        model_device(m, dev, len);
        return;
    }
    enum rpc_model k = w == R_CNN_TRAIN ? RM_CNN_TRAIN : w == R_TF_TRAIN ? RM_TF_TRAIN : RM_CNN;
    src->c = sv->rs.c;
    src->dev = sv->rs.device[k];
    snprintf(dev, len, "kasminad:%s", sv->rs.device[k]);
}

/* One call of row w; its seconds (< 0: the row cannot run, "skip"). warm: the warm-up. */
static double run_row(struct server *sv, int w, bool warm)
{
    struct ksm_train_result tr;
    double dt = -1;
    switch (w) {
    case R_CNN_FWD: return time_forward(sv->cnn, &sv->in.tcnn_x, NULL);
    case R_CNN_EVAL: return time_evaluate(sv->cnn, &sv->in.tcnn_x, &sv->in.tcnn_y, &sv->ccf, NULL);
    case R_TF_FWD: return time_forward(sv->tf, &sv->in.ttf_x, NULL);
    case R_TF_EVAL: return time_evaluate(sv->tf, &sv->in.ttf_x, &sv->in.ttf_y, &sv->tcf, NULL);
    case R_CNN8_FWD: return time_forward(sv->cnn8, &sv->in.tcnn_x, NULL);
    case R_CNN_TRAIN_INPROC:
    case R_TF_TRAIN_INPROC: {
        const int k = w == R_TF_TRAIN_INPROC;
        if (sv->train[k] == NULL) {
            sv->train[k] = load_model(sv->e, sv->dir, k ? "tf_train" : "cnn_train",
                                      k ? CFG_TF : CFG_CNN, k ? dev_train_tf : dev_train);
            struct ksm_training_config tc = esper_training();
            CHECKE(ksm_model_configure_training(sv->train[k], &tc, true, err, sizeof err));
        }
        const ksm_tensor *x = k ? &sv->in.ttf_x : &sv->in.tcnn_x;
        const ksm_tensor *y = k ? &sv->in.ttf_y : &sv->in.tcnn_y;
        for (int s = 0; s < (warm ? 2 : 1); s++) {
            if ((dt = time_train(sv->train[k], ROWS[w].name, x, y, &tr)) < 0) return dt;
            if (warm) print_loss(ROWS[w].name, s, &tr);
        }
        return dt;
    }
    case R_CNN_RPC:
        if (!sv->rs.made[RM_CNN]) {
            rpc_model(&sv->rs, RM_CNN);
            time_forward(sv->cnn, &sv->in.tcnn_x, &ref_logits);
        }
        return time_rpc_forward(sv->rs.c, &sv->in.tcnn_x, false, warm);
    case R_CNN_WIRE: return time_rpc_forward(sv->rs.c, &sv->in.tcnn_x, true, false);
    case R_CNN_TRAIN:
    case R_TF_TRAIN: {
        enum rpc_model k = w == R_CNN_TRAIN ? RM_CNN_TRAIN : RM_TF_TRAIN;
        const ksm_tensor *x = k == RM_CNN_TRAIN ? &sv->in.tcnn_x : &sv->in.ttf_x;
        const ksm_tensor *y = k == RM_CNN_TRAIN ? &sv->in.tcnn_y : &sv->in.ttf_y;
        rpc_model(&sv->rs, k);
        for (int s = 0; s < (warm ? 2 : 1); s++) {
            dt = time_rpc_train(&sv->rs, k, ROWS[w].name, x, y, &tr);
            if (dt < 0) return dt;
            if (warm) print_loss(ROWS[w].name, s, &tr);
        }
        return dt;
    }
    default: return -1;
    }
}

/* Answers "<row> <reps>" lines on stdin until EOF or "quit": reps 0 = the warm-up ("ok <row>"),
 * else the median of reps calls (a "row" line); "mem": the allocator figures. */
static void serve(ksm_engine *e, const char *dir, const char *target)
{
    static struct server sv;
    sv.e = e;
    sv.dir = dir;
    sv.cnn = load_model(e, dir, "cnn", CFG_CNN, dev_cnn);
    sv.cnn8 = load_model(e, dir, "cnn8", CFG_CNN8, dev_cnn);
    sv.tf = load_model(e, dir, "tf", CFG_TF, dev_tf);
    make_inputs(&sv.in);
    cnn_configs(&sv.ccf);
    tf_configs(&sv.tcf);
    if (target != NULL) {
        sv.rs.c = rpc_connect(target);
        sv.rs.dir = dir;
        sv.rs.on_cpu = dev_cnn != NULL;
    }
    printf("ready\n");
    fflush(stdout);
    char line[256], name[64];
    int reps;
    while (fgets(line, sizeof line, stdin) && strncmp(line, "quit", 4) != 0) {
        if (strncmp(line, "mem", 3) == 0 && (line[3] == '\n' || line[3] == '\0')) {
            for (int i = 0; i < N_ROWS; i++) {
                if (!sv.mem[i].used) continue;
                struct mem_src src;
                char dev[48];
                row_mem_src(&sv, i, &src, dev, sizeof dev);
                const struct mem_acc *m = &sv.mem[i];
                printf("mem name=%s device=%s calls=%d allocs=%lld cache_hits=%llu "
                       "device_allocs=%llu peak_reserved=%lld peak_allocated=%lld mallocs=%lld\n",
                       ROWS[i].name, dev, m->calls, (long long)m->allocs,
                       (unsigned long long)m->hits, (unsigned long long)m->dev_allocs,
                       (long long)m->peak_reserved, (long long)m->peak_allocated, m->mallocs);
            }
            printf("ok mem\n");
            fflush(stdout);
            continue;
        }
        if (sscanf(line, "%63s %d", name, &reps) != 2 || reps < 0 || reps > 1000) {
            fprintf(stderr, "bad command: %s", line);
            exit(2);
        }
        int w = -1;
        for (int i = 0; i < N_ROWS; i++)
            if (!strcmp(name, ROWS[i].name)) w = i;
        if (w < 0 || (w >= R_CNN_RPC && sv.rs.c == NULL)) {
            printf("skip %s\n", name); /* a row only the PyTorch side has, or no daemon */
            fflush(stdout);
            continue;
        }
        if (reps == 0) {
            if (run_row(&sv, w, true) < 0)
                printf("skip %s\n", name);
            else
                printf("ok %s\n", name);
            fflush(stdout);
            continue;
        }
        double *s = calloc((size_t)reps, sizeof *s);
        struct mem_src src;
        char dev[48];
        row_mem_src(&sv, w, &src, dev, sizeof dev);
        struct ksm_mem_stats s0;
        long long m0;
        mem_before(&src, &s0, &m0);
        bool ran = true;
        for (int r = 0; r < reps && ran; r++) ran = (s[r] = run_row(&sv, w, false)) >= 0;
        if (ran) {
            mem_after(&src, &s0, m0, reps, &sv.mem[w]);
            report(name, s, reps, ROWS[w].items, ROWS[w].unit);
        } else {
            printf("skip %s\n", name);
            fflush(stdout);
        }
        free(s);
    }
    if (sv.rs.c != NULL) {
        for (int k = 0; k < N_RM; k++)
            if (sv.rs.made[k]) ksm_client_model_delete(sv.rs.c, RM_ID[k], NULL, NULL);
        ksm_client_close(sv.rs.c);
        ksm_host_tensor_free(&ref_logits);
    }
    ksm_model_unref(sv.cnn);
    ksm_model_unref(sv.cnn8);
    ksm_model_unref(sv.tf);
    for (int k = 0; k < 2; k++)
        if (sv.train[k]) ksm_model_unref(sv.train[k]);
    free_inputs(&sv.in);
    free(out_buf);
}

/* ---- export ---- */

static void write_file(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(buf, 1, len, f) != len || fclose(f) != 0) {
        fprintf(stderr, "%s: write failed: %s\n", path, strerror(errno));
        exit(1);
    }
}

static struct ksm_st_tensor st_tensor(const char *name, enum ksm_dtype dt, const void *data,
                                      int ndim, const int64_t *shape)
{
    struct ksm_st_tensor t = {.name = name, .dtype = dt, .ndim = ndim, .data = data};
    size_t n = 1;
    for (int i = 0; i < ndim; i++) {
        t.shape[i] = shape[i];
        n *= (size_t)shape[i];
    }
    t.nbytes = n * (dt == KSM_DTYPE_I64 ? 8 : 4);
    return t;
}

static void export(ksm_engine *e, const char *dir)
{
    struct inputs in;
    make_inputs(&in);
    struct st_out {
        float loss[CNN_K], acc[CNN_K];
    } cnn_ev, tf_ev;
    ksm_tensor cnn_logits, cnn8_logits, tf_logits;
    float *cnn_ev_logits = NULL;
    char path[4096];
    for (int c = 0; c < N_CFG; c++) {
        ksm_model *m = make_model(e, CFG_FILE[c], (enum cfg)c, NULL);
        void *buf;
        size_t len;
        CHECKE(ksm_model_export_weights(m, &buf, &len, err, sizeof err));
        snprintf(path, sizeof path, "%s/%s.safetensors", dir, CFG_FILE[c]);
        write_file(path, buf, len);
        free(buf);
        struct configs cf;
        struct ksm_evaluate_result r;
        if (c == CFG_CNN8) {
            time_forward(m, &in.tcnn_x, &cnn8_logits);
            ksm_model_unref(m);
            continue;
        }
        struct st_out *o = c == CFG_TF ? &tf_ev : &cnn_ev;
        if (c == CFG_TF) {
            tf_configs(&cf);
            time_forward(m, &in.ttf_x, &tf_logits);
            time_evaluate(m, &in.ttf_x, &in.ttf_y, &cf, &r);
        } else {
            cnn_configs(&cf);
            time_forward(m, &in.tcnn_x, &cnn_logits);
            struct ksm_evaluate_args a = {.input = &in.tcnn_x,
                                          .targets = &in.tcnn_y,
                                          .configs = cf.c,
                                          .n_configs = cf.n,
                                          .return_logits = true};
            CHECKE(ksm_model_evaluate(m, &a, &r, err, sizeof err));
            cnn_ev_logits = malloc(sizeof(float) * CNN_K * CNN_B * 10);
            for (size_t k = 0; k < r.n; k++)
                memcpy(cnn_ev_logits + k * CNN_B * 10, r.results[k].logits.data,
                       sizeof(float) * CNN_B * 10);
        }
        for (size_t k = 0; k < r.n; k++) {
            o->loss[k] = (float)r.results[k].loss;
            o->acc[k] = (float)r.results[k].accuracy;
        }
        ksm_evaluate_result_free(&r);
        ksm_model_unref(m);
    }
    struct ksm_st_tensor t[] = {
        st_tensor("cnn.x", KSM_DTYPE_F32, in.cnn_x, 4, (const int64_t[]){CNN_B, 3, CNN_HW, CNN_HW}),
        st_tensor("cnn.y", KSM_DTYPE_I64, in.cnn_y, 1, (const int64_t[]){CNN_B}),
        st_tensor("tf.x", KSM_DTYPE_I64, in.tf_x, 2, (const int64_t[]){TF_B, TF_T}),
        st_tensor("tf.y", KSM_DTYPE_I64, in.tf_y, 2, (const int64_t[]){TF_B, TF_T}),
        st_tensor("ksm.cnn.logits", KSM_DTYPE_F32, cnn_logits.data, 2,
                  (const int64_t[]){CNN_B, 10}),
        st_tensor("ksm.cnn8.logits", KSM_DTYPE_F32, cnn8_logits.data, 2,
                  (const int64_t[]){CNN_B, 10}),
        st_tensor("ksm.cnn.eval_logits", KSM_DTYPE_F32, cnn_ev_logits, 3,
                  (const int64_t[]){CNN_K, CNN_B, 10}),
        st_tensor("ksm.cnn.eval_loss", KSM_DTYPE_F32, cnn_ev.loss, 1, (const int64_t[]){CNN_K}),
        st_tensor("ksm.cnn.eval_acc", KSM_DTYPE_F32, cnn_ev.acc, 1, (const int64_t[]){CNN_K}),
        /* row 0 of [B, T, V] only: 51 MB rather than 411 */
        st_tensor("ksm.tf.logits0", KSM_DTYPE_F32, tf_logits.data, 2,
                  (const int64_t[]){TF_T, TF_V}),
        st_tensor("ksm.tf.eval_loss", KSM_DTYPE_F32, tf_ev.loss, 1, (const int64_t[]){TF_K}),
        st_tensor("ksm.tf.eval_acc", KSM_DTYPE_F32, tf_ev.acc, 1, (const int64_t[]){TF_K}),
    };
    snprintf(path, sizeof path, "%s/io.safetensors", dir);
    CHECKE(ksm_st_write(path, t, sizeof t / sizeof t[0], NULL, 0));
    printf("exported %s/{cnn,cnn8,tf,io}.safetensors\n", dir);
    ksm_host_tensor_free(&cnn_logits);
    ksm_host_tensor_free(&cnn8_logits);
    ksm_host_tensor_free(&tf_logits);
    free(cnn_ev_logits);
    free_inputs(&in);
}

int main(int argc, char **argv)
{
    if (argc < 3 || (strcmp(argv[1], "export") != 0 && strcmp(argv[1], "serve") != 0)) {
        fprintf(stderr, "usage: bench_model export DIR | bench_model serve DIR [TARGET]\n");
        return 2;
    }
    ksm_engine *e;
    /* KASMINA_BENCH_DEVICE=cuda:0 (tests/bench/gpu.sh) runs the engine side on the GPU through
     * the plugin at KASMINA_CUDA_PLUGIN. */
    const char *dev = getenv("KASMINA_BENCH_DEVICE");
    if (dev == NULL || strcmp(dev, "cpu:0") == 0) {
        dev_cnn = "cpu:0";
        dev_tf = "cpu:1";
        dev_train = "cpu:2";
        dev_train_tf = "cpu:3";
    }
    struct ksm_engine_config cfg = {.cpu_devices = 4,
                                    .enable_cuda = dev && strncmp(dev, "cuda", 4) == 0,
                                    .cuda_plugin = getenv("KASMINA_CUDA_PLUGIN"),
                                    .default_device = dev};
    CHECKE(ksm_engine_new(&cfg, &e, err, sizeof err));
    fprintf(stderr, "bench_model: engine on %s\n", ksm_device_name(ksm_engine_default_device(e)));
    /* the OpenBLAS kernels the engine picked (run.sh gives PyTorch the same) */
    const char *core = ksm_cpu_backend_blas_core();
    printf("info openblas_core=%s\n", core ? core : "none");
    if (strcmp(argv[1], "export") == 0)
        export(e, argv[2]);
    else
        serve(e, argv[2], argc > 3 ? argv[3] : NULL);
    ksm_engine_free(e);
    return 0;
}
