/* The README's model example (engine API), built and run by ctest so that it keeps working. */
#include <stdio.h>
#include <stdlib.h>
#include <kasmina/errors.h>
#include <kasmina/kasmina.h>

int main(void)
{
    char err[256];
    ksm_engine *e;
    struct ksm_engine_config cfg = {.cpu_devices = 1}; /* .enable_cuda = true on a GPU */
    if (ksm_engine_new(&cfg, &e, err, sizeof err) != 0) return fprintf(stderr, "%s\n", err), 1;

    /* esper's CNNHost (zero fields = esper defaults), every injection point registered */
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                  .cnn = {.base_channels = 8},
                                  .init_seed = 1,
                                  .permissive_gates = true};
    ksm_model *m;
    if (ksm_engine_model_create(e, "demo", &spec, &m, err, sizeof err) != 0)
        return fprintf(stderr, "%s\n", err), 1;

    /* germinate a seed and advance it GERMINATED -> TRAINING (gate G1) */
    struct ksm_germinate_args g = {.blueprint_id = "conv_light", .init_seed = 7};
    struct ksm_slot_report r;
    struct ksm_gate_result gate;
    ksm_model_germinate(m, "r0c1", &g, &r, err, sizeof err);
    ksm_model_advance(m, "r0c1", KSM_STAGE_UNKNOWN, &gate, &r, err, sizeof err);
    printf("r0c1: %s via %s (%s)\n", ksm_stage_name(r.stage), ksm_gate_level_name(gate.gate),
           gate.passed ? "passed" : "failed");
    ksm_model_set_alpha(m, "r0c1", 0.5, NULL, err, sizeof err);

    /* a blended forward of 2 random 16x16 images on the model's default stream */
    static float pixels[2 * 3 * 16 * 16];
    for (int i = 0; i < 2 * 3 * 16 * 16; i++) pixels[i] = (float)((i * 37) % 101) / 101.0f;
    ksm_tensor x;
    ksm_tensor_init(&x, NULL, pixels, KSM_DTYPE_F32, 4, (int64_t[]){2, 3, 16, 16});
    struct ksm_forward_result out;
    int rc = ksm_model_forward(m, &(struct ksm_forward_args){.input = &x}, &out, err, sizeof err);
    if (rc != 0) return fprintf(stderr, "forward: %s\n", err), 1;
    printf("logits[0][0..2] = %.4f %.4f %.4f\n", ((float *)out.output.data)[0],
           ((float *)out.output.data)[1], ((float *)out.output.data)[2]);
    ksm_host_tensor_free(&out.output);

    /* counterfactual evaluation: esper's standard configs in one fused pass */
    int64_t labels[2] = {3, 5};
    ksm_tensor t;
    ksm_tensor_init(&t, NULL, labels, KSM_DTYPE_I64, 1, (int64_t[]){2});
    struct ksm_evaluate_result ev;
    struct ksm_evaluate_args ea = {.input = &x, .targets = &t, .generate_standard = true};
    if (ksm_model_evaluate(m, &ea, &ev, err, sizeof err) != 0)
        return fprintf(stderr, "%s\n", err), 1;
    for (size_t i = 0; i < ev.n; i++)
        printf("%-14s loss %.4f  accuracy %5.1f%%\n", ev.results[i].name, ev.results[i].loss,
               ev.results[i].accuracy);
    ksm_evaluate_result_free(&ev);

    ksm_model_unref(m);
    ksm_engine_free(e);
    return 0;
}
