/*
 * fuzz_safetensors: the safetensors reader (ksm_st_parse and the accessors) and weight loading
 * (ksm_model_load_weights: parse, esper name mapping, shape checks, extra-state JSON in
 * __metadata__) into a small CNN ("cnn", base_channels 4) and a tiny transformer ("tf").
 *
 * Input: a file image. The low bits of the first byte's parity choose the model and strict
 * mode, so every input is also a plain safetensors file (tests/unit/data/safetensors seeds).
 *
 * Oracles: no sanitizer report; a parsed file's tensors lie inside the image, in order, without
 * overlap, with nbytes = numel * dtype size; a failed load leaves the model's weights unchanged
 * (the engine's "a failed call changes nothing").
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kasmina/log.h"
#include "kasmina/safetensors.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ksm_engine *engine;
static ksm_model *models[2];
static uint64_t sink;

static void die(const char *what, int rc, const char *err)
{
    fprintf(stderr, "fuzz_safetensors: %s: %s (%s)\n", what, ksm_err_name(rc), err ? err : "");
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    ksm_log_set_level(KSM_LOG_ERROR);
    char err[256] = "";
    struct ksm_engine_config ec = {.cpu_devices = 1, .memory_cap = 64u << 20, .max_models = 4};
    int rc = ksm_engine_new(&ec, &engine, err, sizeof err);
    if (rc != 0) die("engine", rc, err);
    struct ksm_model_spec cnn = {.topology = KSM_TOPOLOGY_CNN,
                                 .cnn = {.base_channels = 4, .num_classes = 5},
                                 .init_seed = 7};
    struct ksm_model_spec tf = {.topology = KSM_TOPOLOGY_TRANSFORMER,
                                .transformer = {.vocab_size = 16,
                                                .n_embd = 8,
                                                .n_head = 2,
                                                .n_layer = 2,
                                                .block_size = 8,
                                                .num_segments = 2},
                                .init_seed = 7};
    if ((rc = ksm_engine_model_create(engine, "cnn", &cnn, &models[0], err, sizeof err)) != 0)
        die("cnn", rc, err);
    if ((rc = ksm_engine_model_create(engine, "tf", &tf, &models[1], err, sizeof err)) != 0)
        die("tf", rc, err);
    /* One seed in each slot, so seed weights and extra states have somewhere to go. */
    struct ksm_germinate_args g = {.blueprint_id = "conv_light"};
    if ((rc = ksm_model_germinate(models[0], "r0c1", &g, NULL, err, sizeof err)) != 0)
        die("germinate cnn", rc, err);
    g.blueprint_id = "lora";
    if ((rc = ksm_model_germinate(models[1], "r0c0", &g, NULL, err, sizeof err)) != 0)
        die("germinate tf", rc, err);
    return 0;
}

static void check_file(const ksm_st_file *f, size_t size)
{
    size_t n = ksm_st_count(f);
    const uint8_t *prev_end = NULL;
    for (size_t i = 0; i < n; i++) {
        const struct ksm_st_tensor *t = ksm_st_get(f, i);
        if (t == NULL || t->name == NULL || t->ndim < 0 || t->ndim > KSM_MAX_DIMS) abort();
        if (t->nbytes > size) abort();
        uint64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0) abort();
            numel *= (uint64_t)t->shape[d];
        }
        if (numel * ksm_dtype_size(t->dtype) != t->nbytes) abort();
        const uint8_t *p = t->data;
        if (t->nbytes > 0 && prev_end != NULL && p < prev_end) abort();
        for (size_t k = 0; k < t->nbytes; k++) sink += p[k]; /* ASan checks every byte */
        if (t->nbytes > 0) prev_end = p + t->nbytes;
        if (ksm_st_find(f, t->name) != t) abort();
    }
    if (ksm_st_get(f, n) != NULL) abort();
    (void)ksm_st_metadata(f, "format");
    (void)ksm_st_metadata(f, "kasmina.extra_state");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    ksm_st_file *f = NULL;
    int rc = ksm_st_parse(data, size, &f, err, sizeof err);
    if (rc == 0) {
        check_file(f, size);
        ksm_st_close(f);
    } else if (f != NULL || rc >= 0) {
        abort();
    }
    if (size == 0) return 0;
    ksm_model *m = models[data[0] & 1];
    bool strict = (data[0] >> 1) & 1;
    uint64_t gen = ksm_model_generation(m);
    struct ksm_load_result lr;
    memset(&lr, 0, sizeof lr);
    rc = ksm_model_load_weights(m, data, size, strict, &lr, err, sizeof err);
    if (rc == 0) {
        for (size_t i = 0; i < lr.n_loaded; i++) sink += strlen(lr.loaded[i]);
        for (size_t i = 0; i < lr.n_missing; i++) sink += strlen(lr.missing[i]);
        for (size_t i = 0; i < lr.n_unexpected; i++) sink += strlen(lr.unexpected[i]);
        ksm_load_result_free(&lr);
    } else if (ksm_model_generation(m) != gen) {
        fprintf(stderr, "fuzz_safetensors: a failed load (%s) changed the model\n",
                ksm_err_name(rc));
        abort();
    }
    return 0;
}
