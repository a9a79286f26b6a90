/*
 * Slot lifecycle (docs/lifecycle.md#seed-lifecycle, docs/lifecycle.md#events,
 * docs/README.md#invariants items 1, 2, 8, 9, 11; docs/weights.md#extra-state) against a fake
 * ksm_slot_env that records events and module callbacks.
 * (Over 900 lines on purpose: the lifecycle is one state machine, and its tests share one fake
 * environment and one event recorder; they follow docs/lifecycle.md section by section.)
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/alpha.h"
#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kasmina/slot.h"

TestSuite(slot, .timeout = 20);

/* ---- fake environment ---- */

#define MAX_EV 256

static struct {
    struct ksm_lifecycle_event ev[MAX_EV];
    int n_ev;
    int free_seed, create_gate, drop_gate, alpha_changed;
    int create_gate_rc;
    uint32_t last_gate_steps;
    int seed_token, gate_token;
} F;

static void fake_emit(void *ud, struct ksm_slot *s, struct ksm_lifecycle_event *ev)
{
    (void)ud;
    (void)s;
    cr_assert_lt(F.n_ev, MAX_EV);
    F.ev[F.n_ev++] = *ev;
}
static void fake_free_seed(void *ud, struct ksm_slot *s)
{
    (void)ud;
    cr_assert_not_null(s->seed);
    F.free_seed++;
}
static int fake_create_gate(void *ud, struct ksm_slot *s, uint32_t total_steps)
{
    (void)ud;
    F.create_gate++;
    if (F.create_gate_rc) return F.create_gate_rc;
    F.last_gate_steps = total_steps;
    s->gate = &F.gate_token;
    return 0;
}
static void fake_drop_gate(void *ud, struct ksm_slot *s)
{
    (void)ud;
    cr_assert_not_null(s->gate);
    F.drop_gate++;
}
static void fake_alpha_changed(void *ud, struct ksm_slot *s)
{
    (void)ud;
    (void)s;
    F.alpha_changed++;
}

static struct ksm_slot_env ENV;
static struct ksm_slot S;
static int64_t NOW = 1750000000000000000;

static int64_t tick(void) { return NOW += 1000000; /* whole microseconds */ }

static void setup_env(bool permissive, unsigned auto_fwd, enum ksm_topology topo)
{
    memset(&F, 0, sizeof F);
    ENV = (struct ksm_slot_env){
        .permissive = permissive,
        .auto_forward = auto_fwd,
        .topology = topo,
        .emit = fake_emit,
        .free_seed = fake_free_seed,
        .create_gate = fake_create_gate,
        .drop_gate = fake_drop_gate,
        .alpha_changed = fake_alpha_changed,
    };
    ksm_slot_init(&S, "r0c1", 32, &ENV);
}

static void setup(bool permissive) { setup_env(permissive, 0, KSM_TOPOLOGY_CNN); }

static void germinate_full(const char *blend, enum ksm_alpha_algorithm algo, bool has_target,
                           double target, uint32_t tempo)
{
    struct ksm_germinate_args a = {.blueprint_id = "conv_light",
                                   .blend_algorithm_id = blend,
                                   .alpha_algorithm = algo,
                                   .has_alpha_target = has_target,
                                   .alpha_target = target,
                                   .blend_tempo_epochs = tempo};
    char err[160] = "";
    cr_assert_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_slot_germinate_commit(&S, &a, &F.seed_token, 1234, 99999, tick()), 0);
}

static void germinate(void) { germinate_full("linear", KSM_ALGO_ADD, false, 0, 5); }

static void record(const struct ksm_metrics_update *u)
{
    char err[160] = "";
    cr_assert_eq(ksm_slot_record_metrics(&S, u, err, sizeof err), 0, "%s", err);
}

static void record_acc(double acc)
{
    record(&(struct ksm_metrics_update){.has_val_accuracy = true, .val_accuracy = acc});
}

static void record_grads(double health, bool exploding, double ratio)
{
    record(&(struct ksm_metrics_update){.has_gradient_norm = true,
                                        .gradient_norm = 1.5,
                                        .has_gradient_health = true,
                                        .gradient_health = health,
                                        .has_vanishing = true,
                                        .vanishing = false,
                                        .has_exploding = true,
                                        .exploding = exploding,
                                        .has_grad_ratio = true,
                                        .seed_gradient_norm_ratio = ratio,
                                        .has_epoch = true,
                                        .epoch = 3});
}

static void record_cf(double cf)
{
    record(&(struct ksm_metrics_update){.has_counterfactual = true, .counterfactual = cf});
}

static struct ksm_gate_result advance(enum ksm_stage target)
{
    struct ksm_gate_result g;
    char err[160] = "";
    cr_assert_eq(ksm_slot_advance(&S, target, &g, tick(), err, sizeof err), 0, "%s", err);
    return g;
}

static void step(void) { cr_assert_eq(ksm_slot_step_epoch(&S, tick()), 0); }

/* GERMINATED -> TRAINING and enough training for either mode's G2. */
static void to_training_ready(void)
{
    cr_assert(advance(KSM_STAGE_TRAINING).passed);
    for (int i = 0; i < 10; i++) record_acc(50.0 + i * 0.25);
    record_grads(0.9, false, 0.5);
}

static void to_blending(void)
{
    to_training_ready();
    cr_assert(advance(KSM_STAGE_BLENDING).passed);
}

static void to_holding(void)
{
    to_blending();
    for (uint32_t i = 0; i < S.state.blend_tempo_epochs; i++) step();
    for (int i = 0; i < 10; i++) record_acc(60.0);
    cr_assert(advance(KSM_STAGE_HOLDING).passed);
}

static void to_fossilized(void)
{
    to_holding();
    record_cf(2.5);
    cr_assert(advance(KSM_STAGE_FOSSILIZED).passed);
}

static bool has_check(char (*list)[KSM_CHECK_MAX], int n, const char *want)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(list[i], want)) return true;
    return false;
}

#define EXPECT_PASSED(g, s)                                                                        \
    cr_expect(has_check((g).checks_passed, (g).n_passed, s), "missing passed check %s", s)
#define EXPECT_FAILED(g, s)                                                                        \
    cr_expect(has_check((g).checks_failed, (g).n_failed, s), "missing failed check %s", s)

static struct ksm_gate_result gate(enum ksm_stage target)
{
    struct ksm_gate_result g;
    ksm_slot_check_gate(&S, target, &g);
    return g;
}

static double ev_val(const struct ksm_lifecycle_event *e, const char *key)
{
    for (int i = 0; i < e->n_values; i++)
        if (!strcmp(e->values[i].key, key)) return e->values[i].value;
    return NAN;
}

static void report(struct ksm_slot_report *r)
{
    ksm_slot_report(&S, r);
    r->stage_entered_at_ns = 0;
}

/* A refused call: the report is byte-identical and nothing was emitted or called. */
#define EXPECT_NOTHING_CHANGED(call)                                                               \
    do {                                                                                           \
        struct ksm_slot_report before_, after_;                                                    \
        report(&before_);                                                                          \
        struct ksm_slot slot_before_ = S;                                                          \
        int n_ev_ = F.n_ev, cb_ = F.free_seed + F.create_gate + F.drop_gate + F.alpha_changed;     \
        call;                                                                                      \
        report(&after_);                                                                           \
        cr_expect_eq(memcmp(&before_, &after_, sizeof before_), 0, "report changed: " #call);      \
        cr_expect_eq(memcmp(&slot_before_, &S, sizeof S), 0, "slot changed: " #call);              \
        cr_expect_eq(F.n_ev, n_ev_, "events emitted: " #call);                                     \
        cr_expect_eq(F.free_seed + F.create_gate + F.drop_gate + F.alpha_changed, cb_,             \
                     "callbacks: " #call);                                                         \
    } while (0)

/* ---- transitions (docs/lifecycle.md#transitions) ---- */

static const int all_stages[] = {0, 1, 2, 3, 4, 6, 7, 8, 9, 10};

static bool table_legal(int from, int to)
{
    switch (from) {
    case 0: return to == 1;
    case 1: return to == 2;
    case 2: return to == 3 || to == 8;
    case 3: return to == 4 || to == 8;
    case 4: return to == 6 || to == 8;
    case 6: return to == 7 || to == 4 || to == 8;
    case 7: return false;
    case 8: return to == 9;
    case 9: return to == 10;
    case 10: return to == 1;
    }
    return false;
}

Test(slot, advance_follows_the_transition_table_for_every_pair)
{
    for (size_t i = 0; i < sizeof all_stages / sizeof all_stages[0]; i++) {
        int from = all_stages[i];
        if (from >= 8) continue; /* cooldown rows: step_epoch tests below */
        for (size_t j = 1; j < sizeof all_stages / sizeof all_stages[0]; j++) {
            int to = all_stages[j];
            setup(true);
            germinate();
            S.state.stage = (enum ksm_stage)from;
            struct ksm_gate_result g;
            char err[160] = "";
            if (to >= 8) {
                EXPECT_NOTHING_CHANGED(cr_expect_eq(
                    ksm_slot_advance(&S, (enum ksm_stage)to, &g, tick(), err, sizeof err),
                    KSM_EINVAL));
                char want[96];
                snprintf(want, sizeof want, "advance_stage() cannot target failure stage %s",
                         ksm_stage_name((enum ksm_stage)to));
                cr_expect(strstr(err, want), "%s", err);
            } else if (table_legal(from, to)) {
                int n = F.n_ev;
                cr_expect_eq(ksm_slot_advance(&S, (enum ksm_stage)to, &g, tick(), err, sizeof err),
                             0, "%d->%d: %s", from, to, err);
                cr_expect_gt(F.n_ev, n, "%d->%d emitted no gate event", from, to);
                cr_expect_eq(F.ev[n].type, KSM_EV_SEED_GATE_EVALUATED);
            } else {
                EXPECT_NOTHING_CHANGED(cr_expect_eq(
                    ksm_slot_advance(&S, (enum ksm_stage)to, &g, tick(), err, sizeof err),
                    KSM_ESTAGE, "%d->%d", from, to));
                cr_expect(strstr(err, ksm_stage_name((enum ksm_stage)from)) &&
                              strstr(err, ksm_stage_name((enum ksm_stage)to)),
                          "%s", err);
            }
        }
    }
}

Test(slot, advance_rejects_stage_five_and_unknown_values)
{
    setup(true);
    germinate();
    struct ksm_gate_result g;
    EXPECT_NOTHING_CHANGED(
        cr_expect_eq(ksm_slot_advance(&S, (enum ksm_stage)5, &g, tick(), NULL, 0), KSM_EINVAL));
    EXPECT_NOTHING_CHANGED(
        cr_expect_eq(ksm_slot_advance(&S, (enum ksm_stage)42, &g, tick(), NULL, 0), KSM_EINVAL));
    EXPECT_NOTHING_CHANGED(
        cr_expect_eq(ksm_slot_advance(&S, (enum ksm_stage) - 1, &g, tick(), NULL, 0), KSM_EINVAL));
}

Test(slot, advance_without_target_picks_first_non_failure_entry)
{
    setup(true);
    germinate();
    struct ksm_gate_result g = advance(KSM_STAGE_UNKNOWN);
    cr_expect_eq(g.gate, KSM_GATE_G1);
    cr_expect_eq(S.state.stage, KSM_STAGE_TRAINING);
    cr_expect_eq(F.ev[F.n_ev - 2].target_stage, KSM_STAGE_TRAINING);
}

Test(slot, advance_on_empty_or_cooling_slot_is_no_active_seed)
{
    setup(true);
    int n = F.n_ev;
    struct ksm_gate_result g = advance(KSM_STAGE_UNKNOWN);
    cr_expect_not(g.passed);
    cr_expect_eq(g.gate, KSM_GATE_G0);
    cr_expect_eq(g.n_failed, 1);
    cr_expect_str_eq(g.checks_failed[0], "no_active_seed");
    germinate();
    bool ok;
    ksm_slot_prune(&S, "", NULL, &ok, tick());
    cr_assert(ok);
    n = F.n_ev;
    EXPECT_NOTHING_CHANGED(g = advance(KSM_STAGE_TRAINING));
    cr_expect_str_eq(g.checks_failed[0], "no_active_seed");
    cr_expect_eq(F.n_ev, n);
}

Test(slot, fossilized_is_terminal)
{
    setup(true);
    germinate();
    to_fossilized();
    int n = F.n_ev;
    struct ksm_gate_result g;
    EXPECT_NOTHING_CHANGED(g = advance(KSM_STAGE_UNKNOWN));
    cr_expect_eq(g.gate, KSM_GATE_G0);
    cr_expect_str_eq(g.checks_failed[0], "no_valid_transition");
    cr_expect_eq(F.n_ev, n);
    bool ok = true;
    EXPECT_NOTHING_CHANGED(ksm_slot_prune(&S, "governor_nan", "governor", &ok, tick()));
    cr_expect_not(ok);
    ok = true;
    EXPECT_NOTHING_CHANGED(
        cr_expect_eq(ksm_slot_schedule_prune(&S, 3, 0, 12, "", NULL, &ok, tick(), NULL, 0), 0));
    cr_expect_not(ok);
    cr_expect_eq(ksm_slot_set_alpha_target(&S, 0.5, 3, 0, 12, 0, tick(), NULL, 0), KSM_ESTAGE);
    for (int i = 0; i < 20; i++) step();
    cr_expect_eq(S.state.stage, KSM_STAGE_FOSSILIZED);
    cr_expect_eq(S.state.alpha, 1.0);
}

/* ---- gates (docs/gates.md#quality-gates) ---- */

Test(slot, g0_checks)
{
    setup(false);
    germinate();
    struct ksm_gate_result g = gate(KSM_STAGE_GERMINATED);
    cr_expect(g.passed);
    cr_expect_eq(g.score, 1.0);
    EXPECT_PASSED(g, "seed_id_present");
    EXPECT_PASSED(g, "blueprint_id_present");
    S.state.seed_id[0] = '\0';
    g = gate(KSM_STAGE_GERMINATED);
    cr_expect_not(g.passed);
    cr_expect_eq(g.score, 0.0);
    EXPECT_FAILED(g, "seed_id_missing");
    EXPECT_PASSED(g, "blueprint_id_present");
    S.state.blueprint_id[0] = '\0';
    g = gate(KSM_STAGE_GERMINATED);
    EXPECT_FAILED(g, "blueprint_id_missing");
    cr_expect_str_eq(g.message, "Missing required fields");
}

Test(slot, g1_checks_in_both_modes)
{
    for (int perm = 0; perm < 2; perm++) {
        setup(perm);
        germinate();
        struct ksm_gate_result g = gate(KSM_STAGE_TRAINING);
        cr_expect(g.passed);
        cr_expect_eq(g.n_passed, 1);
        cr_expect_str_eq(g.checks_passed[0], "germinated");
        cr_expect_str_eq(g.message, "Ready for training");
        advance(KSM_STAGE_TRAINING);
        g = gate(KSM_STAGE_TRAINING);
        cr_expect_not(g.passed);
        cr_expect_eq(g.n_failed, 1);
        cr_expect_str_eq(g.checks_failed[0], "not_germinated");
    }
}

Test(slot, g2_strict_pass)
{
    setup(false);
    germinate();
    advance(KSM_STAGE_TRAINING);
    record_acc(50.0);
    for (int i = 0; i < 9; i++) record_acc(51.234);
    record_grads(0.9, false, 0.5);
    struct ksm_gate_result g = gate(KSM_STAGE_BLENDING);
    cr_expect(g.passed);
    cr_expect_eq(g.n_passed, 3);
    EXPECT_PASSED(g, "global_improvement_1.23%");
    EXPECT_PASSED(g, "seed_ready");
    EXPECT_PASSED(g, "seed_gradient_active_0.50");
    cr_expect(fabs(g.score - 1.234 / 5.0) < 1e-9);
    cr_expect_str_eq(g.message, "Improvement: 1.23%");
}

Test(slot, g2_strict_failures)
{
    setup(false);
    germinate();
    advance(KSM_STAGE_TRAINING);
    record_acc(50.0);
    record_acc(50.2);
    struct ksm_gate_result g = gate(KSM_STAGE_BLENDING);
    cr_expect_not(g.passed);
    cr_expect_eq(g.n_passed, 0);
    EXPECT_FAILED(g, "global_improvement_insufficient_0.20%");
    EXPECT_FAILED(g, "seed_not_ready");
    EXPECT_FAILED(g, "gradient_stats_never_measured");
    record(&(struct ksm_metrics_update){.has_grad_ratio = true, .seed_gradient_norm_ratio = 0.05});
    g = gate(KSM_STAGE_BLENDING);
    EXPECT_FAILED(g, "seed_gradient_low_0.05");
    /* negative improvement formats like Python */
    record_acc(49.0);
    g = gate(KSM_STAGE_BLENDING);
    EXPECT_FAILED(g, "global_improvement_insufficient_-1.00%");
    cr_expect_eq(g.score, 0.0);
}

Test(slot, g2_permissive_pass)
{
    setup(true);
    germinate();
    advance(KSM_STAGE_TRAINING);
    for (int i = 0; i < 10; i++) record_acc(40.0);
    record_grads(0.9, false, 0.0);
    struct ksm_gate_result g = gate(KSM_STAGE_BLENDING);
    cr_expect(g.passed);
    cr_expect_eq(g.n_passed, 3);
    cr_expect_eq(g.n_failed, 0);
    EXPECT_PASSED(g, "trained_10_epochs");
    EXPECT_PASSED(g, "no_exploding_gradients");
    EXPECT_PASSED(g, "gradient_health_0.90");
    cr_expect_str_eq(g.message, "Permissive G2 Safety: PASS");
    cr_expect_eq(g.score, 0.0);
}

Test(slot, unmeasured_gradient_health_fails_permissive_g2)
{
    setup(true);
    germinate();
    advance(KSM_STAGE_TRAINING);
    for (int i = 0; i < 12; i++) record_acc(40.0 + i);
    /* everything but health: norm, flags and ratio measured, health never */
    record(&(struct ksm_metrics_update){.has_gradient_norm = true,
                                        .gradient_norm = 1,
                                        .has_exploding = true,
                                        .has_grad_ratio = true,
                                        .seed_gradient_norm_ratio = 1,
                                        .has_epoch = true,
                                        .epoch = 1});
    struct ksm_gate_result g = gate(KSM_STAGE_BLENDING);
    cr_expect_not(g.passed);
    EXPECT_PASSED(g, "trained_12_epochs");
    cr_expect_eq(g.n_failed, 1);
    cr_expect_str_eq(g.checks_failed[0], "gradient_health_not_measured");
    cr_expect_str_eq(g.message, "Permissive G2 Safety: FAIL");
    /* an advance attempt says so in the event and stays in TRAINING */
    g = advance(KSM_STAGE_BLENDING);
    cr_expect_not(g.passed);
    cr_expect_eq(S.state.stage, KSM_STAGE_TRAINING);
    cr_expect_eq(F.ev[F.n_ev - 1].type, KSM_EV_SEED_GATE_EVALUATED);
    cr_expect_not(F.ev[F.n_ev - 1].gate.passed);
}

Test(slot, g2_permissive_failures)
{
    setup(true);
    germinate();
    advance(KSM_STAGE_TRAINING);
    for (int i = 0; i < 3; i++) record_acc(40.0);
    record_grads(0.5, false, 1);
    struct ksm_gate_result g = gate(KSM_STAGE_BLENDING);
    cr_expect_not(g.passed);
    EXPECT_FAILED(g, "insufficient_training_3_of_10");
    EXPECT_PASSED(g, "no_exploding_gradients");
    EXPECT_FAILED(g, "gradient_health_low_0.50_need_0.70");
    record_grads(0.95, true, 1);
    g = gate(KSM_STAGE_BLENDING);
    EXPECT_FAILED(g, "exploding_gradients");
    cr_expect_eq(g.n_passed, 0);
    cr_expect_eq(g.n_failed, 2);
}

Test(slot, g3_checks_in_both_modes)
{
    for (int perm = 0; perm < 2; perm++) {
        setup(perm);
        germinate();
        to_blending();
        struct ksm_gate_result g = gate(KSM_STAGE_HOLDING);
        cr_expect_not(g.passed);
        EXPECT_PASSED(g, "alpha_target_full");
        EXPECT_FAILED(g, "alpha_not_at_target_0.00_target_1.00_mode_UP");
        cr_expect_eq(g.score, 0.0);
        step();
        step();
        g = gate(KSM_STAGE_HOLDING);
        EXPECT_FAILED(g, "alpha_not_at_target_0.40_target_1.00_mode_UP");
        cr_expect(fabs(g.score - 0.4) < 1e-12);
        step();
        step();
        step();
        g = gate(KSM_STAGE_HOLDING);
        EXPECT_PASSED(g, "alpha_target_reached");
        if (perm) {
            cr_expect(g.passed);
            cr_expect_str_eq(g.message, "Permissive G3: alpha completion only");
            cr_expect_eq(g.n_passed, 2);
        } else {
            cr_expect_not(g.passed);
            EXPECT_FAILED(g, "blending_incomplete_0");
            for (int i = 0; i < 10; i++) record_acc(70);
            g = gate(KSM_STAGE_HOLDING);
            cr_expect(g.passed);
            EXPECT_PASSED(g, "blending_complete");
            cr_expect_eq(g.n_passed, 3);
        }
        cr_expect_eq(g.score, 1.0);
    }
}

Test(slot, g5_requires_a_counterfactual)
{
    for (int perm = 0; perm < 2; perm++) {
        setup(perm);
        germinate();
        to_holding();
        struct ksm_gate_result g = gate(KSM_STAGE_FOSSILIZED);
        cr_expect_not(g.passed);
        cr_expect_eq(g.gate, KSM_GATE_G5);
        cr_expect_eq(g.n_passed, 0);
        cr_expect_eq(g.n_failed, 1);
        cr_expect_str_eq(g.checks_failed[0], "counterfactual_not_available");
        cr_expect_eq(g.score, 0.0);
        cr_expect_str_eq(g.message, "");
    }
}

Test(slot, g5_checks_in_both_modes)
{
    setup(false);
    germinate();
    to_holding();
    record_cf(2.5);
    struct ksm_gate_result g = gate(KSM_STAGE_FOSSILIZED);
    cr_expect(g.passed);
    EXPECT_PASSED(g, "counterfactual_available_2.50%");
    EXPECT_PASSED(g, "healthy");
    EXPECT_PASSED(g, "sufficient_contribution_2.50%");
    cr_expect_eq(g.score, 0.25);
    record_cf(0.5);
    g = gate(KSM_STAGE_FOSSILIZED);
    cr_expect_not(g.passed);
    EXPECT_FAILED(g, "insufficient_contribution_0.50%_below_1.0%");
    cr_expect_eq(g.score, 0.05);

    setup(true);
    germinate();
    to_holding();
    record_cf(-0.5);
    g = gate(KSM_STAGE_FOSSILIZED);
    cr_expect(g.passed);
    cr_expect_eq(g.n_passed, 2);
    EXPECT_PASSED(g, "counterfactual_available_-0.50%");
    cr_expect_str_eq(g.message, "Permissive G5: -0.50% contribution (no threshold)");
    cr_expect_eq(g.score, 0.0);

    /* is_healthy is only settable through a restore */
    char *js = ksm_slot_extra_state_json(&S);
    char *p = strstr(js, "\"is_healthy\":true");
    cr_assert_not_null(p);
    char *mod = malloc(strlen(js) + 2);
    size_t off = (size_t)(p - js);
    memcpy(mod, js, off);
    strcpy(mod + off, "\"is_healthy\":false");
    strcat(mod, p + strlen("\"is_healthy\":true"));
    struct ksm_slot out;
    bool ns, ng;
    char err[200] = "";
    cr_assert_eq(ksm_slot_extra_state_parse(&S, mod, &out, &ns, &ng, err, sizeof err), 0, "%s",
                 err);
    out.seed = S.seed;
    S = out;
    g = gate(KSM_STAGE_FOSSILIZED);
    cr_expect_not(g.passed);
    EXPECT_FAILED(g, "unhealthy");
    struct ksm_slot_report r;
    report(&r);
    cr_expect_not(r.is_healthy);
    cr_expect(r.needs_attention);
    free(js);
    free(mod);
}

/* ---- event order and payloads (docs/lifecycle.md#events) ---- */

Test(slot, happy_path_event_order)
{
    setup(false);
    germinate();
    cr_expect_eq(F.n_ev, 1);
    cr_expect_eq(F.ev[0].type, KSM_EV_SEED_GERMINATED);
    to_fossilized();
    const enum ksm_lifecycle_type want[] = {KSM_EV_SEED_GERMINATED,    KSM_EV_SEED_GATE_EVALUATED,
                                            KSM_EV_SEED_STAGE_CHANGED, KSM_EV_SEED_GATE_EVALUATED,
                                            KSM_EV_SEED_STAGE_CHANGED, KSM_EV_SEED_GATE_EVALUATED,
                                            KSM_EV_SEED_STAGE_CHANGED, KSM_EV_SEED_GATE_EVALUATED,
                                            KSM_EV_SEED_STAGE_CHANGED, KSM_EV_SEED_FOSSILIZED};
    cr_assert_eq(F.n_ev, 10);
    for (int i = 0; i < 10; i++) cr_expect_eq(F.ev[i].type, want[i], "event %d", i);
    const enum ksm_stage to[] = {KSM_STAGE_TRAINING, KSM_STAGE_BLENDING, KSM_STAGE_HOLDING,
                                 KSM_STAGE_FOSSILIZED};
    for (int i = 0; i < 4; i++) {
        cr_expect_eq(F.ev[1 + 2 * i].target_stage, to[i]);
        cr_expect(F.ev[1 + 2 * i].gate.passed);
        cr_expect_eq(F.ev[2 + 2 * i].to_stage, to[i]);
    }
    /* payloads */
    const struct ksm_lifecycle_event *g = &F.ev[0];
    cr_expect_str_eq(g->slot_id, "r0c1");
    cr_expect_str_eq(g->seed_id, "r0c1-conv_light");
    cr_expect_str_eq(g->blueprint_id, "conv_light");
    cr_expect_eq(ev_val(g, "params"), 1234);
    cr_expect_eq(ev_val(g, "blend_tempo_epochs"), 5);
    cr_expect_eq(ev_val(g, "grad_ratio"), 0);
    cr_expect_eq(ev_val(g, "epochs_in_stage"), 0);
    cr_expect_str_eq(g->alpha_curve, "LINEAR");
    const struct ksm_lifecycle_event *sc = &F.ev[4]; /* ->BLENDING */
    cr_expect_eq(sc->from_stage, KSM_STAGE_TRAINING);
    cr_expect_eq(ev_val(sc, "epochs_in_stage"), 10);
    cr_expect_eq(ev_val(sc, "grad_ratio"), 0.5);
    cr_expect(fabs(ev_val(sc, "accuracy_delta") - 2.25) < 1e-12);
    cr_expect_eq(sc->alpha, 0.0);
    cr_expect_eq(F.ev[6].alpha, 1.0); /* ->HOLDING: post-entry-hook alpha */
    const struct ksm_lifecycle_event *fo = &F.ev[9];
    cr_expect_eq(ev_val(fo, "counterfactual"), 2.5);
    cr_expect_eq(ev_val(fo, "epochs_total"), 20);
    cr_expect_eq(ev_val(fo, "params_added"), 1234);
    cr_expect(fabs(ev_val(fo, "improvement") - 10.0) < 1e-12);
    cr_expect(fabs(ev_val(fo, "blending_delta") - (60.0 - 52.25)) < 1e-12);
    cr_expect_eq(fo->alpha, 1.0);
    cr_expect_eq(S.state.stage, KSM_STAGE_FOSSILIZED);
    cr_expect_eq(S.state.previous_stage, KSM_STAGE_HOLDING);
}

Test(slot, failed_gate_emits_only_the_gate_event)
{
    setup(false);
    germinate();
    advance(KSM_STAGE_TRAINING);
    int n = F.n_ev;
    struct ksm_gate_result g = advance(KSM_STAGE_BLENDING);
    cr_expect_not(g.passed);
    cr_expect_eq(F.n_ev, n + 1);
    cr_expect_eq(F.ev[n].type, KSM_EV_SEED_GATE_EVALUATED);
    cr_expect_eq(F.ev[n].gate.n_failed, 3);
    cr_expect_eq(S.state.stage, KSM_STAGE_TRAINING);
}

/* ---- stage entry side effects (docs/lifecycle.md#stage-entry-side-effects) ---- */

Test(slot, entry_side_effects_by_topology)
{
    for (int t = 1; t <= 2; t++) {
        setup_env(true, 0, (enum ksm_topology)t);
        germinate_full("sigmoid", KSM_ALGO_ADD, false, 0, 8);
        cr_expect_not(S.isolate_gradients);
        advance(KSM_STAGE_TRAINING);
        cr_expect(S.isolate_gradients);
        for (int i = 0; i < 10; i++) record_acc(30 + i);
        record_grads(1, false, 1);
        advance(KSM_STAGE_BLENDING);
        cr_expect_eq(S.isolate_gradients, t == KSM_TOPOLOGY_CNN);
        cr_expect_eq(S.state.metrics.accuracy_at_blending_start, 39);
        cr_expect(S.state.metrics.blending_started);
        cr_expect_eq(S.state.controller.curve, KSM_CURVE_SIGMOID);
        cr_expect_eq(S.state.controller.steps_total, 8u);
        cr_expect_eq(S.state.controller.mode, KSM_ALPHA_UP);
        cr_expect_eq(S.state.controller.alpha_target, 1.0);
        cr_expect_null(S.gate);
    }
}

Test(slot, gated_blending_creates_the_gate_and_keeps_it_through_holding)
{
    setup(true);
    germinate_full("gated", KSM_ALGO_GATE, false, 0, 3);
    cr_expect_null(S.gate);
    to_training_ready();
    advance(KSM_STAGE_BLENDING);
    cr_expect_eq(F.create_gate, 1);
    cr_expect_eq(F.last_gate_steps, 3u);
    cr_expect_not_null(S.gate);
    cr_expect_eq(S.state.controller.curve, KSM_CURVE_LINEAR);
    for (int i = 0; i < 3; i++) step();
    advance(KSM_STAGE_HOLDING);
    cr_expect_not_null(S.gate);
    cr_expect_eq(F.drop_gate, 0);
    bool ok;
    ksm_slot_prune(&S, "", NULL, &ok, tick());
    cr_expect_eq(F.drop_gate, 1);
    cr_expect_null(S.gate);
    cr_expect_eq(F.free_seed, 1);
    cr_expect_null(S.seed);
}

Test(slot, gate_creation_failure_changes_nothing)
{
    setup(true);
    germinate_full("gated", KSM_ALGO_GATE, false, 0, 3);
    to_training_ready();
    F.create_gate_rc = KSM_EDEVMEM;
    char err[160] = "";
    struct ksm_gate_result g;
    struct ksm_slot_report before, after;
    report(&before);
    int n = F.n_ev;
    cr_expect_eq(ksm_slot_advance(&S, KSM_STAGE_BLENDING, &g, tick(), err, sizeof err),
                 KSM_EDEVMEM);
    report(&after);
    cr_expect_eq(memcmp(&before, &after, sizeof before), 0);
    cr_expect_eq(F.n_ev, n);
    cr_expect_gt(strlen(err), 0);
    F.create_gate_rc = 0;
    cr_expect(advance(KSM_STAGE_BLENDING).passed);
}

/* ---- prune and cooldown (docs/lifecycle.md, docs/lifecycle.md#cooldown-timing) ---- */

Test(slot, cooldown_takes_exactly_seven_ticks)
{
    setup(true);
    germinate();
    to_training_ready();
    bool ok;
    ksm_slot_prune(&S, "bad", NULL, &ok, tick()); /* tick 0 */
    cr_assert(ok);
    cr_expect_eq(S.state.stage, KSM_STAGE_PRUNED);
    const enum ksm_stage want[] = {KSM_STAGE_EMBARGOED, KSM_STAGE_EMBARGOED, KSM_STAGE_EMBARGOED,
                                   KSM_STAGE_EMBARGOED, KSM_STAGE_EMBARGOED, KSM_STAGE_RESETTING};
    const uint32_t counter[] = {0, 1, 2, 3, 4, 0};
    struct ksm_germinate_args a = {.blueprint_id = "conv_light"};
    for (int t = 1; t <= 6; t++) {
        char err[160] = "";
        cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), KSM_ESTAGE);
        if (t == 1)
            cr_expect_str_eq(err, "slot r0c1 is unavailable for germination (stage=PRUNED)");
        step();
        cr_assert(S.occupied, "tick %d", t);
        cr_expect_eq(S.state.stage, want[t - 1], "tick %d", t);
        cr_expect_eq(S.state.metrics.epochs_in_current_stage, counter[t - 1], "tick %d", t);
    }
    int n = F.n_ev;
    step(); /* tick 7 */
    cr_expect_not(S.occupied);
    cr_expect_eq(F.n_ev, n + 1);
    cr_expect_eq(F.ev[n].from_stage, KSM_STAGE_RESETTING);
    cr_expect_eq(F.ev[n].to_stage, KSM_STAGE_DORMANT);
    cr_expect_eq(ev_val(&F.ev[n], "accuracy_delta"), 0.0);
    cr_expect_eq(ksm_slot_germinate_check(&S, &a, NULL, 0), 0);
    struct ksm_slot_report r;
    report(&r);
    cr_expect_not(r.occupied);
    cr_expect_str_eq(r.slot_id, "r0c1");
    germinate();
    cr_expect_eq(S.state.stage, KSM_STAGE_GERMINATED);
    cr_expect_eq(S.state.metrics.epochs_total, 0u);
}

Test(slot, prune_events_and_cleanup)
{
    setup(true);
    germinate();
    to_blending();
    step();
    step();
    record_cf(1.5);
    int n = F.n_ev, ac = F.alpha_changed;
    bool ok;
    ksm_slot_prune(&S, "policy_choice", "tamiyo", &ok, tick());
    cr_assert(ok);
    cr_assert_eq(F.n_ev, n + 2);
    cr_expect_eq(F.ev[n].type, KSM_EV_SEED_STAGE_CHANGED);
    cr_expect_eq(F.ev[n].from_stage, KSM_STAGE_BLENDING);
    cr_expect_eq(F.ev[n].to_stage, KSM_STAGE_PRUNED);
    cr_expect(fabs(F.ev[n].alpha - 0.4) < 1e-12); /* pre-prune alpha */
    cr_expect_eq(F.ev[n + 1].type, KSM_EV_SEED_PRUNED);
    cr_expect_str_eq(F.ev[n + 1].reason, "policy_choice");
    cr_expect_str_eq(F.ev[n + 1].initiator, "tamiyo");
    cr_expect_eq(ev_val(&F.ev[n + 1], "auto_pruned"), 0.0);
    cr_expect_eq(ev_val(&F.ev[n + 1], "counterfactual"), 1.5);
    cr_expect_eq(F.alpha_changed, ac + 1);
    cr_expect_eq(S.state.alpha, 0.0);
    cr_expect_eq(S.state.controller.mode, KSM_ALPHA_HOLD);
    cr_expect_eq(S.state.controller.alpha_target, 0.0);
    cr_expect_eq(S.state.controller.steps_total, 0u);
    cr_expect_not(S.isolate_gradients);
    cr_expect_not(S.state.metrics.auto_pruned);
    cr_expect_null(S.seed);
    cr_expect_not(ksm_slot_runs_seed(&S));
    /* a second prune of a cooling slot is refused without side effects */
    EXPECT_NOTHING_CHANGED(ksm_slot_prune(&S, "governor_rollback", "governor", &ok, tick()));
    cr_expect_not(ok);
}

Test(slot, governor_reasons_set_auto_pruned)
{
    const char *reasons[] = {"governor_nan", "governor_lobotomy", "governor_divergence",
                             "governor_rollback"};
    for (int i = 0; i < 4; i++) {
        setup(true);
        germinate();
        bool ok;
        ksm_slot_prune(&S, reasons[i], "governor", &ok, tick());
        cr_assert(ok);
        cr_expect(S.state.metrics.auto_pruned);
        cr_expect_str_eq(S.state.metrics.auto_prune_reason, reasons[i]);
        cr_expect_eq(ev_val(&F.ev[F.n_ev - 1], "auto_pruned"), 1.0);
        cr_expect_str_eq(F.ev[F.n_ev - 1].initiator, "governor");
        struct ksm_slot_report r;
        report(&r);
        cr_expect(r.metrics.auto_pruned);
    }
    setup(true);
    bool ok = true;
    ksm_slot_prune(&S, "governor_nan", NULL, &ok, tick());
    cr_expect_not(ok);
}

Test(slot, scheduled_prune_timing_from_holding)
{
    setup(true);
    germinate();
    to_holding();
    cr_assert_eq(S.state.alpha, 1.0);
    bool ok;
    int n = F.n_ev;
    char err[160] = "";
    cr_assert_eq(ksm_slot_schedule_prune(&S, 2, KSM_CURVE_LINEAR, 12, "", NULL, &ok, tick(), err,
                                         sizeof err),
                 0, "%s", err);
    cr_assert(ok);
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    cr_expect_eq(F.n_ev, n + 1);
    cr_expect_eq(F.ev[n].from_stage, KSM_STAGE_HOLDING);
    cr_expect_eq(F.ev[n].to_stage, KSM_STAGE_BLENDING);
    cr_expect_eq(S.state.controller.mode, KSM_ALPHA_DOWN);
    cr_expect(S.blend_out_freeze);
    /* retarget mid-ramp is refused */
    ok = true;
    EXPECT_NOTHING_CHANGED(ksm_slot_schedule_prune(&S, 3, 0, 12, "", NULL, &ok, tick(), NULL, 0));
    cr_expect_not(ok);
    step(); /* tick 1 */
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    cr_expect_eq(S.state.alpha, 0.5);
    step(); /* tick 2 */
    cr_expect_eq(S.state.stage, KSM_STAGE_PRUNED);
    cr_expect_null(S.seed);
    cr_expect_not(S.blend_out_freeze);
    cr_expect_str_eq(F.ev[F.n_ev - 1].reason, "scheduled_prune");
    cr_expect_str_eq(F.ev[F.n_ev - 1].initiator, "policy");
    for (int t = 0; t < 6; t++) {
        step();
        cr_expect(S.occupied);
    }
    step();
    cr_expect_not(S.occupied);
}

Test(slot, schedule_prune_delegates_and_validates)
{
    setup(true);
    bool ok = true;
    cr_expect_eq(ksm_slot_schedule_prune(&S, 3, 0, 12, "", NULL, &ok, tick(), NULL, 0), 0);
    cr_expect_not(ok);
    germinate();
    EXPECT_NOTHING_CHANGED(cr_expect_eq(
        ksm_slot_schedule_prune(&S, 3, 0, NAN, "", NULL, &ok, tick(), NULL, 0), KSM_EINVAL));
    EXPECT_NOTHING_CHANGED(cr_expect_eq(
        ksm_slot_schedule_prune(&S, 3, 0, 0, "", NULL, &ok, tick(), NULL, 0), KSM_EINVAL));
    EXPECT_NOTHING_CHANGED(cr_expect_eq(
        ksm_slot_schedule_prune(&S, 3, 0, INFINITY, "", NULL, &ok, tick(), NULL, 0), KSM_EINVAL));
    EXPECT_NOTHING_CHANGED(cr_expect_eq(
        ksm_slot_schedule_prune(&S, 3, (enum ksm_alpha_curve)7, 12, "", NULL, &ok, tick(), NULL, 0),
        KSM_EINVAL));
    /* alpha 0 (GERMINATED): immediate prune with the given reason */
    cr_expect_eq(ksm_slot_schedule_prune(&S, 3, 0, 12, "why", "gov", &ok, tick(), NULL, 0), 0);
    cr_expect(ok);
    cr_expect_eq(S.state.stage, KSM_STAGE_PRUNED);
    cr_expect_str_eq(F.ev[F.n_ev - 1].reason, "why");
    cr_expect_str_eq(F.ev[F.n_ev - 1].initiator, "gov");
    /* steps 0 from BLENDING at alpha > 0: immediate */
    setup(true);
    germinate();
    to_blending();
    step();
    cr_expect_eq(ksm_slot_schedule_prune(&S, 0, 0, 12, "", NULL, &ok, tick(), NULL, 0), 0);
    cr_expect(ok);
    cr_expect_eq(S.state.stage, KSM_STAGE_PRUNED);
}

/* ---- alpha targets (docs/lifecycle.md, docs/README.md#invariants item 9) ---- */

Test(slot, partial_germination_target_never_reaches_holding)
{
    setup_env(true, (1u << KSM_GATE_G3), KSM_TOPOLOGY_CNN);
    germinate_full("linear", KSM_ALGO_ADD, true, 0.7, 5);
    to_blending();
    cr_expect_eq(S.state.controller.alpha_target, 0.7);
    for (int i = 0; i < 8; i++) step();
    cr_expect_eq(S.state.alpha, 0.7);
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    struct ksm_gate_result g = gate(KSM_STAGE_HOLDING);
    cr_expect_not(g.passed);
    cr_expect_eq(g.n_failed, 1);
    cr_expect_str_eq(g.checks_failed[0], "alpha_target_not_full_0.70");
    /* the auto-forward attempts emitted failing gate events */
    cr_expect_eq(F.ev[F.n_ev - 1].type, KSM_EV_SEED_GATE_EVALUATED);
    cr_expect_not(F.ev[F.n_ev - 1].gate.passed);
    g = advance(KSM_STAGE_HOLDING);
    cr_expect_not(g.passed);
    /* raising the target to 1.0 completes the blend */
    char err[160] = "";
    cr_expect_eq(ksm_slot_set_alpha_target(&S, 1.0, 3, 0, 12, 0, tick(), err, sizeof err), 0, "%s",
                 err);
    for (int i = 0; i < 3; i++) step();
    cr_expect_eq(S.state.stage, KSM_STAGE_HOLDING);
    cr_expect_eq(S.state.alpha, 1.0);
}

Test(slot, set_alpha_target_from_holding_reenters_blending)
{
    setup(true);
    germinate();
    to_holding();
    int n = F.n_ev;
    char err[160] = "";
    /* a full target stays in HOLDING */
    cr_expect_eq(ksm_slot_set_alpha_target(&S, 1.0, 3, 0, 12, 0, tick(), err, sizeof err), 0);
    cr_expect_eq(S.state.stage, KSM_STAGE_HOLDING);
    cr_expect_eq(F.n_ev, n);
    cr_expect_eq(
        ksm_slot_set_alpha_target(&S, 0.5, 4, KSM_CURVE_COSINE, 6, 0, tick(), err, sizeof err), 0,
        "%s", err);
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    cr_expect_eq(F.n_ev, n + 1);
    cr_expect_eq(F.ev[n].from_stage, KSM_STAGE_HOLDING);
    cr_expect_eq(F.ev[n].to_stage, KSM_STAGE_BLENDING);
    cr_expect_eq(S.state.controller.mode, KSM_ALPHA_DOWN);
    cr_expect_eq(S.state.controller.curve, KSM_CURVE_COSINE);
    cr_expect_eq(S.state.controller.steepness, 6.0);
    cr_expect(S.blend_out_freeze);
    struct ksm_slot_report r;
    report(&r);
    cr_expect_eq(r.time_to_target, 4u);
    cr_expect_eq(r.alpha_velocity, -0.125);
    /* mid-ramp: refused */
    EXPECT_NOTHING_CHANGED(cr_expect_eq(
        ksm_slot_set_alpha_target(&S, 0.7, 2, 0, 12, 0, tick(), err, sizeof err), KSM_ESTAGE));
    for (int i = 0; i < 4; i++) step();
    cr_expect_eq(S.state.alpha, 0.5);
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    cr_expect(S.blend_out_freeze); /* re-evaluated at the start of the next tick
                                      (docs/blending.md#blend-out-freeze) */
    step();
    cr_expect_not(S.blend_out_freeze);
    report(&r);
    cr_expect_eq(r.time_to_target, 0u);
    cr_expect_eq(r.alpha_velocity, 0.0);
}

Test(slot, set_alpha_target_validation)
{
    setup(true);
    char err[160];
    cr_expect_eq(ksm_slot_set_alpha_target(&S, 0.5, 3, 0, 12, 0, tick(), err, sizeof err),
                 KSM_ESTAGE);
    germinate();
    EXPECT_NOTHING_CHANGED(cr_expect_eq(
        ksm_slot_set_alpha_target(&S, 0.5, 3, 0, 12, 0, tick(), err, sizeof err), KSM_ESTAGE));
    to_blending();
    const double bad[] = {NAN, 0.0, -0.1, 1.0000001, INFINITY};
    for (int i = 0; i < 5; i++)
        EXPECT_NOTHING_CHANGED(cr_expect_eq(
            ksm_slot_set_alpha_target(&S, bad[i], 3, 0, 12, 0, tick(), err, sizeof err),
            KSM_EINVAL));
    EXPECT_NOTHING_CHANGED(cr_expect_eq(
        ksm_slot_set_alpha_target(&S, 0.5, 3, 0, -1, 0, tick(), err, sizeof err), KSM_EINVAL));
    EXPECT_NOTHING_CHANGED(
        cr_expect_eq(ksm_slot_set_alpha_target(&S, 0.5, 3, (enum ksm_alpha_curve)4, 12, 0, tick(),
                                               err, sizeof err),
                     KSM_EINVAL));
    EXPECT_NOTHING_CHANGED(
        cr_expect_eq(ksm_slot_set_alpha_target(&S, 0.5, 3, 0, 12, (enum ksm_alpha_algorithm)9,
                                               tick(), err, sizeof err),
                     KSM_EINVAL));
    /* BLENDING mid-ramp (UP) */
    EXPECT_NOTHING_CHANGED(cr_expect_eq(
        ksm_slot_set_alpha_target(&S, 0.5, 3, 0, 12, 0, tick(), err, sizeof err), KSM_ESTAGE));
}

Test(slot, algorithm_switch_creates_and_drops_the_gate)
{
    setup(true);
    germinate();
    to_holding();
    char err[160] = "";
    F.create_gate_rc = KSM_EDEVMEM;
    struct ksm_slot before = S;
    int n = F.n_ev;
    cr_expect_eq(
        ksm_slot_set_alpha_target(&S, 0.5, 0, 0, 12, KSM_ALGO_GATE, tick(), err, sizeof err),
        KSM_EDEVMEM);
    cr_expect_eq(memcmp(&before, &S, sizeof S), 0);
    cr_expect_eq(F.n_ev, n);
    cr_expect_eq(F.create_gate, 1);
    F.create_gate_rc = 0;
    cr_expect_eq(
        ksm_slot_set_alpha_target(&S, 0.5, 0, 0, 12, KSM_ALGO_GATE, tick(), err, sizeof err), 0,
        "%s", err);
    cr_expect_eq(F.last_gate_steps, 1u); /* max(1, steps) */
    cr_expect_not_null(S.gate);
    cr_expect_eq(S.state.alpha_algorithm, KSM_ALGO_GATE);
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    cr_expect_eq(S.state.alpha, 0.5); /* INSTANT: state.alpha follows the controller */
    cr_expect_eq(
        ksm_slot_set_alpha_target(&S, 1.0, 2, 0, 12, KSM_ALGO_MULTIPLY, tick(), err, sizeof err),
        0);
    cr_expect_null(S.gate);
    cr_expect_eq(F.drop_gate, 1);
    cr_expect_eq(S.state.alpha_algorithm, KSM_ALGO_MULTIPLY);
}

Test(slot, set_alpha_clamps_and_reports_changes)
{
    setup(true);
    cr_expect_eq(ksm_slot_set_alpha(&S, 0.5, NULL, 0), 0); /* empty: no-op */
    germinate();
    cr_expect_eq(ksm_slot_set_alpha(&S, 1.7, NULL, 0), 0);
    cr_expect_eq(S.state.alpha, 1.0);
    cr_expect_eq(S.state.controller.alpha, 1.0);
    cr_expect_eq(S.state.metrics.current_alpha, 1.0);
    cr_expect_eq(F.alpha_changed, 1);
    cr_expect_eq(ksm_slot_set_alpha(&S, 3.0, NULL, 0), 0);
    cr_expect_eq(F.alpha_changed, 1);
    cr_expect_eq(ksm_slot_set_alpha(&S, -INFINITY, NULL, 0), 0);
    cr_expect_eq(S.state.alpha, 0.0);
    cr_expect_eq(F.alpha_changed, 2);
    char err[64] = "";
    EXPECT_NOTHING_CHANGED(cr_expect_eq(ksm_slot_set_alpha(&S, NAN, err, sizeof err), KSM_EINVAL));
    cr_expect_gt(strlen(err), 0);
}

Test(slot, alpha_levels_per_stage)
{
    setup(true);
    germinate();
    cr_expect_eq(S.state.alpha, 0.0);
    to_training_ready();
    cr_expect_eq(S.state.alpha, 0.0);
    advance(KSM_STAGE_BLENDING);
    int ac = F.alpha_changed;
    for (int i = 1; i <= 5; i++) {
        step();
        cr_expect(fabs(S.state.alpha - i / 5.0) < 1e-12);
        cr_expect_eq(S.state.metrics.alpha_ramp_step, (uint32_t)i);
    }
    cr_expect_eq(F.alpha_changed, ac + 5);
    advance(KSM_STAGE_HOLDING);
    cr_expect_eq(S.state.alpha, 1.0);
    cr_expect_eq(S.state.controller.steps_done, S.state.controller.steps_total);
}

/* ---- auto-forward (docs/lifecycle.md step_epoch) ---- */

Test(slot, step_epoch_alone_never_changes_stage)
{
    setup(true);
    germinate();
    for (int i = 0; i < 30; i++) step();
    cr_expect_eq(S.state.stage, KSM_STAGE_GERMINATED);
    to_training_ready();
    for (int i = 0; i < 30; i++) step();
    cr_expect_eq(S.state.stage, KSM_STAGE_TRAINING);
    advance(KSM_STAGE_BLENDING);
    for (int i = 0; i < 30; i++) step();
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    cr_expect_eq(S.state.alpha, 1.0);
}

Test(slot, auto_forward_gates)
{
    setup_env(true, (1u << KSM_GATE_G1) | (1u << KSM_GATE_G2) | (1u << KSM_GATE_G3),
              KSM_TOPOLOGY_CNN);
    germinate();
    step();
    cr_expect_eq(S.state.stage, KSM_STAGE_TRAINING);
    record_grads(0.9, false, 0.5);
    for (int i = 0; i < 9; i++) {
        record_acc(50);
        int n = F.n_ev;
        step();
        cr_expect_eq(F.n_ev, n, "no G2 attempt before 10 epochs");
    }
    record_acc(50);
    step();
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    for (int i = 0; i < 4; i++) step();
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    step();
    cr_expect_eq(S.state.stage, KSM_STAGE_HOLDING);
    for (int i = 0; i < 10; i++) step();
    cr_expect_eq(S.state.stage, KSM_STAGE_HOLDING); /* no auto-fossilize */

    /* strict G3 auto-forward waits for min_blending_epochs */
    setup_env(false, (1u << KSM_GATE_G3), KSM_TOPOLOGY_CNN);
    germinate();
    to_blending();
    for (int i = 0; i < 6; i++) step();
    cr_expect_eq(S.state.stage, KSM_STAGE_BLENDING);
    for (int i = 0; i < 10; i++) record_acc(70);
    step();
    cr_expect_eq(S.state.stage, KSM_STAGE_HOLDING);
}

/* ---- germinate (docs/lifecycle.md) ---- */

Test(slot, germinate_records_settings_and_state)
{
    setup(true);
    germinate_full("sigmoid", KSM_ALGO_MULTIPLY, true, 0.5, 8);
    cr_expect(S.occupied);
    cr_expect_eq(S.state.stage, KSM_STAGE_GERMINATED);
    cr_expect_eq(S.state.previous_stage, KSM_STAGE_DORMANT);
    cr_expect_eq(S.state.history_len, 1);
    cr_expect_eq(S.state.history[0].stage, KSM_STAGE_GERMINATED);
    cr_expect_str_eq(S.state.seed_id, "r0c1-conv_light");
    cr_expect_eq(S.state.alpha_algorithm, KSM_ALGO_MULTIPLY);
    cr_expect_eq(S.state.blend_tempo_epochs, 8u);
    cr_expect_eq(S.state.metrics.seed_param_count, 1234u);
    cr_expect_eq(S.state.metrics.host_param_count, 99999u);
    cr_expect_eq(S.blend_alpha_target, 0.5);
    cr_expect_str_eq(S.blend_algorithm_id, "sigmoid");
    cr_expect(S.state.is_healthy);
    cr_expect_not(S.state.metrics.has_grad_ratio);
    cr_expect_not(S.state.telemetry.has_gradient_health);
    cr_expect_eq(S.state.telemetry.max_epochs, 25u);
    cr_expect(ksm_slot_runs_seed(&S) == false);
    struct ksm_slot_report r;
    report(&r);
    cr_expect(r.occupied);
    cr_expect_eq(r.stage, KSM_STAGE_GERMINATED);
    cr_expect_eq(r.seed_params, 1234u);
    cr_expect_eq(r.blueprint_index, -1);
}

Test(slot, germinate_validation)
{
    setup(true);
    char err[160];
    struct ksm_germinate_args a = {.blueprint_id = "conv_light"};
    cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), 0);
    a.has_alpha_target = true;
    const double bad[] = {0.0, -1, 1.5, NAN};
    for (int i = 0; i < 4; i++) {
        a.alpha_target = bad[i];
        cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), KSM_EINVAL);
    }
    a.alpha_target = 1.0;
    cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), 0);
    a.blend_algorithm_id = "cosine";
    cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), KSM_EINVAL);
    a.blend_algorithm_id = "gated";
    cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), KSM_EINVAL);
    a.alpha_algorithm = KSM_ALGO_GATE;
    cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), 0);
    a.blend_algorithm_id = "linear";
    cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), KSM_EINVAL);
    a.blend_algorithm_id = NULL;
    cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), KSM_EINVAL);
    a.alpha_algorithm = KSM_ALGO_ADD;
    a.blueprint_id = "";
    cr_expect_eq(ksm_slot_germinate_check(&S, &a, err, sizeof err), KSM_EINVAL);
    germinate();
    struct ksm_germinate_args b = {.blueprint_id = "norm"};
    EXPECT_NOTHING_CHANGED(
        cr_expect_eq(ksm_slot_germinate_check(&S, &b, err, sizeof err), KSM_ESTAGE));
    cr_expect_str_eq(err, "slot r0c1 is unavailable for germination (stage=GERMINATED)");
    EXPECT_NOTHING_CHANGED(
        cr_expect_eq(ksm_slot_germinate_commit(&S, &b, &F.seed_token, 1, 1, tick()), KSM_EINVAL));
}

/* ---- metrics (docs/gates.md#recordmetrics, docs/evaluate.md#from-results-to-recordmetrics,
 * docs/gates.md#recordmetrics) ---- */

Test(slot, record_metrics_bookkeeping)
{
    setup(true);
    struct ksm_metrics_update u = {.has_val_accuracy = true, .val_accuracy = 10};
    char err[160];
    cr_expect_eq(ksm_slot_record_metrics(&S, &u, err, sizeof err), KSM_ENOSEED);
    germinate();
    record_acc(40);
    record_acc(38);
    record_acc(45);
    const struct ksm_seed_metrics *m = &S.state.metrics;
    cr_expect_eq(m->initial_val_accuracy, 40);
    cr_expect_eq(m->best_val_accuracy, 45);
    cr_expect_eq(m->epochs_total, 3u);
    cr_expect_eq(m->epochs_in_current_stage, 3u);
    struct ksm_slot_report r;
    report(&r);
    cr_expect_eq(r.total_improvement, 5);
    cr_expect_eq(r.improvement_since_stage_start, 5);
    cr_expect(r.is_improving);
    advance(KSM_STAGE_TRAINING);
    report(&r);
    cr_expect_not(r.is_improving);
    cr_expect_eq(r.previous_epochs_in_stage, 3u);
    cr_expect_eq(m->accuracy_at_stage_start, 45);

    /* counterfactual velocity: 0.7 v + 0.3 (new - prev) once a previous value exists */
    record_cf(2.0);
    cr_expect_eq(m->contribution_velocity, 0.0);
    record_cf(3.0);
    cr_expect(fabs(m->contribution_velocity - 0.3) < 1e-12);
    record_cf(2.0);
    cr_expect(fabs(m->contribution_velocity - (0.7 * 0.3 - 0.3)) < 1e-12);
    cr_expect_eq(m->counterfactual_contribution, 2.0);

    /* gradient fields are never reset by updates without them */
    record_grads(0.8, false, 0.25);
    record_acc(50);
    cr_expect(S.state.telemetry.has_gradient_health);
    cr_expect_eq(S.state.telemetry.gradient_health, 0.8);
    cr_expect_eq(S.state.telemetry.epoch, 3u);
    cr_expect_eq(m->seed_gradient_norm_ratio, 0.25);
    cr_expect_eq(S.state.tel_sync.accuracy, 50);
    cr_expect_eq(S.state.tel_sync.accuracy_delta, 0.0); /* TRAINING */

    /* invalid updates change nothing */
    const struct ksm_metrics_update bad[] = {
        {.has_val_accuracy = true, .val_accuracy = NAN},
        {.has_val_accuracy = true, .val_accuracy = 100.5},
        {.has_val_accuracy = true, .val_accuracy = -1},
        {.has_counterfactual = true, .counterfactual = INFINITY},
        {.has_gradient_health = true, .gradient_health = 1.5},
        {.has_gradient_health = true, .gradient_health = NAN},
        {.has_gradient_norm = true, .gradient_norm = -1},
        {.has_grad_ratio = true, .seed_gradient_norm_ratio = NAN},
        {.has_val_accuracy = true,
         .val_accuracy = 50,
         .has_grad_ratio = true,
         .seed_gradient_norm_ratio = -0.5},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        EXPECT_NOTHING_CHANGED(
            cr_expect_eq(ksm_slot_record_metrics(&S, &bad[i], err, sizeof err), KSM_EINVAL));
}

Test(slot, grad_ratio_in_payloads_waits_for_a_telemetry_epoch)
{
    setup(true);
    germinate();
    advance(KSM_STAGE_TRAINING);
    record(&(struct ksm_metrics_update){.has_grad_ratio = true,
                                        .seed_gradient_norm_ratio = 0.7,
                                        .has_exploding = true,
                                        .exploding = true});
    bool ok;
    ksm_slot_prune(&S, "", NULL, &ok, tick());
    const struct ksm_lifecycle_event *e = &F.ev[F.n_ev - 2];
    cr_expect_eq(e->type, KSM_EV_SEED_STAGE_CHANGED);
    cr_expect_eq(ev_val(e, "grad_ratio"), 0.0);
    cr_expect_eq(ev_val(e, "has_exploding"), 0.0);
    /* with an epoch > 0 they show */
    setup(true);
    germinate();
    record(&(struct ksm_metrics_update){.has_grad_ratio = true,
                                        .seed_gradient_norm_ratio = 0.7,
                                        .has_exploding = true,
                                        .exploding = true,
                                        .has_epoch = true,
                                        .epoch = 1});
    ksm_slot_prune(&S, "", NULL, &ok, tick());
    e = &F.ev[F.n_ev - 2];
    cr_expect_eq(ev_val(e, "grad_ratio"), 0.7);
    cr_expect_eq(ev_val(e, "has_exploding"), 1.0);
}

/* ---- extra state JSON (docs/weights.md#extra-state) ---- */

static void roundtrip_check(void)
{
    char *a = ksm_slot_extra_state_json(&S);
    cr_assert_not_null(a);
    struct ksm_slot out;
    bool ns = false, ng = false;
    char err[256] = "";
    cr_assert_eq(ksm_slot_extra_state_parse(&S, a, &out, &ns, &ng, err, sizeof err), 0, "%s\n%s",
                 err, a);
    cr_expect_eq(ns, S.occupied && S.seed != NULL, "needs_seed stage %d", S.state.stage);
    cr_expect_eq(ng, S.gate != NULL);
    /* the model attaches the modules; then the slot must be identical */
    out.seed = S.seed;
    out.gate = S.gate;
    cr_expect_eq(memcmp(&out.state, &S.state, sizeof S.state), 0, "state differs for stage %s",
                 ksm_stage_name(S.state.stage));
    cr_expect_eq(memcmp(&out, &S, sizeof S), 0, "slot differs for stage %s",
                 ksm_stage_name(S.state.stage));
    char *b = ksm_slot_extra_state_json(&out);
    cr_expect_str_eq(a, b);
    free(a);
    free(b);
}

Test(slot, extra_state_round_trips_in_every_stage)
{
    setup(true);
    roundtrip_check(); /* never germinated */
    germinate_full("gated", KSM_ALGO_GATE, true, 1.0, 3);
    roundtrip_check();
    to_training_ready();
    record_cf(0.123456789);
    roundtrip_check();
    advance(KSM_STAGE_BLENDING);
    step();
    roundtrip_check();
    step();
    step();
    advance(KSM_STAGE_HOLDING);
    roundtrip_check();
    bool ok;
    ksm_slot_schedule_prune(&S, 4, KSM_CURVE_SIGMOID, 24, "fade", "tamiyo", &ok, tick(), NULL, 0);
    step(); /* BLENDING, DOWN, pending prune */
    roundtrip_check();
    step();
    step();
    step();
    cr_expect_eq(S.state.stage, KSM_STAGE_PRUNED);
    roundtrip_check();
    step();
    roundtrip_check(); /* EMBARGOED */
    for (int i = 0; i < 5; i++) step();
    cr_expect_eq(S.state.stage, KSM_STAGE_RESETTING);
    roundtrip_check();
    step();
    roundtrip_check(); /* empty again, settings kept */

    setup_env(false, 0, KSM_TOPOLOGY_TRANSFORMER);
    germinate();
    to_fossilized();
    roundtrip_check();
    /* a long history keeps the last 100 entries */
    for (int i = 0; i < 150; i++) {
        F.n_ev = 0;
        S.state.stage = KSM_STAGE_HOLDING;
        S.state.controller.mode = KSM_ALPHA_HOLD;
        ksm_slot_set_alpha_target(&S, 0.5, 0, 0, 12, 0, tick(), NULL, 0);
        ksm_slot_set_alpha_target(&S, 1.0, 0, 0, 12, 0, tick(), NULL, 0);
        ksm_slot_advance(&S, KSM_STAGE_HOLDING, NULL, tick(), NULL, 0);
    }
    cr_expect_eq(S.state.history_len, 100);
    roundtrip_check();
}

Test(slot, extra_state_reads_esper_output)
{
    /* Written the way esper's get_extra_state + json.dumps would (Python floats, isoformat). */
    const char *doc =
        "{\"_extra_state_version\": 1, \"isolate_gradients\": true, \"blend_algorithm_id\": "
        "\"sigmoid\", \"blend_tempo_epochs\": 5, \"blend_alpha_target\": 1.0, "
        "\"resolved_topology\": \"cnn\", \"seed_state\": {\"seed_id\": \"r0c1-norm\", "
        "\"blueprint_id\": \"norm\", \"slot_id\": \"r0c1\", \"stage\": 3, \"previous_stage\": 2, "
        "\"stage_entered_at\": \"2026-06-21T10:00:00.123456+00:00\", \"alpha\": 0.0, "
        "\"stage_history\": [[2, \"2026-06-21T09:59:00+00:00\"], [3, "
        "\"2026-06-21T10:00:00.123456+00:00\"]], \"metrics\": {\"_schema_version\": 2, "
        "\"epochs_total\": 4, \"epochs_in_current_stage\": 2, \"initial_val_accuracy\": 10.5, "
        "\"current_val_accuracy\": 12.25, \"best_val_accuracy\": 12.25, "
        "\"accuracy_at_stage_start\": 11.0, \"accuracy_at_blending_start\": 0.0, "
        "\"gradient_norm_avg\": 0.0, \"current_alpha\": 0.0, \"alpha_ramp_step\": 0, "
        "\"counterfactual_contribution\": null, \"_prev_contribution\": null, "
        "\"contribution_velocity\": 0.0, \"_blending_started\": false, "
        "\"seed_gradient_norm_ratio\": null, \"host_param_count\": 1000, \"seed_param_count\": 50, "
        "\"interaction_sum\": 0.0, \"boost_received\": 0.0, \"upstream_alpha_sum\": 0.0, "
        "\"downstream_alpha_sum\": 0.0}, \"telemetry\": {\"schema_version\": 1, \"seed_id\": "
        "\"r0c1-norm\", \"blueprint_id\": \"norm\", \"layer_id\": \"\", \"gradient_norm\": null, "
        "\"gradient_health\": null, \"has_vanishing\": null, \"has_exploding\": null, "
        "\"accuracy\": 12.25, \"accuracy_delta\": 0.0, \"epochs_in_stage\": 2, \"stage\": 3, "
        "\"alpha\": 0.0, \"alpha_target\": 0.0, \"alpha_mode\": 0, \"alpha_steps_total\": 0, "
        "\"alpha_steps_done\": 0, \"time_to_target\": 0, \"alpha_velocity\": 0.0, "
        "\"alpha_algorithm\": 1, \"epoch\": 0, \"max_epochs\": 25, \"captured_at\": "
        "\"2026-06-21T10:00:01.5+00:00\", \"blend_tempo_epochs\": 5, \"blending_velocity\": 0.0, "
        "\"alpha_curve\": \"LINEAR\"}, \"alpha_controller\": {\"alpha\": 0.0, \"alpha_start\": "
        "0.0, \"alpha_target\": 0.0, \"alpha_mode\": 0, \"alpha_curve\": 1, \"alpha_steepness\": "
        "12.0, \"alpha_steps_total\": 0, \"alpha_steps_done\": 0}, \"alpha_algorithm\": 1, "
        "\"blend_tempo_epochs\": 5, \"is_healthy\": true, \"is_paused\": false, "
        "\"previous_epochs_in_stage\": 2}, \"alpha_schedule_config\": null}";
    setup(true);
    struct ksm_slot out;
    bool ns, ng;
    char err[256] = "";
    cr_assert_eq(ksm_slot_extra_state_parse(&S, doc, &out, &ns, &ng, err, sizeof err), 0, "%s",
                 err);
    cr_expect(ns);
    cr_expect_not(ng);
    cr_expect(out.occupied);
    cr_expect_eq(out.state.stage, KSM_STAGE_TRAINING);
    cr_expect_eq(out.state.metrics.epochs_total, 4u);
    cr_expect_eq(out.state.metrics.current_val_accuracy, 12.25);
    cr_expect_not(out.state.metrics.has_counterfactual);
    cr_expect_not(out.state.telemetry.has_gradient_health);
    cr_expect_eq(out.state.history_len, 2);
    /* 2026-06-21T10:00:00.123456Z */
    cr_expect_eq(out.state.stage_entered_at_ns, 1782036000123456000);
    cr_expect_eq(out.state.tel_sync.captured_at_ns, 1782036001500000000);
    cr_expect_str_eq(out.blend_algorithm_id, "sigmoid");
    cr_expect(out.isolate_gradients);
    /* S itself untouched */
    cr_expect_not(S.occupied);
    /* the restored seed follows the lifecycle: unmeasured gradients keep it in TRAINING */
    out.seed = &F.seed_token;
    S = out;
    for (int i = 0; i < 10; i++) record_acc(20);
    cr_expect_not(advance(KSM_STAGE_BLENDING).passed);
    /* and its own output parses back to itself */
    roundtrip_check();
}

static char *replace_once(const char *s, const char *from, const char *to)
{
    const char *p = strstr(s, from);
    cr_assert_not_null(p, "'%s' not found", from);
    char *r = malloc(strlen(s) - strlen(from) + strlen(to) + 1);
    size_t off = (size_t)(p - s);
    memcpy(r, s, off);
    strcpy(r + off, to);
    strcat(r, p + strlen(from));
    return r;
}

Test(slot, extra_state_rejects_malformed_documents)
{
    setup(true);
    germinate_full("gated", KSM_ALGO_GATE, false, 0, 3);
    to_blending();
    step();
    char *good = ksm_slot_extra_state_json(&S);
    const char *cases[][2] = {
        {"\"_extra_state_version\":1", "\"_extra_state_version\":2"},
        {"\"_extra_state_version\":1,", ""},
        {"\"isolate_gradients\":true", "\"isolate_gradients\":1"},
        {"\"blend_algorithm_id\":\"gated\"", "\"blend_algorithm_id\":\"cosine\""},
        {"\"blend_tempo_epochs\":3,", "\"blend_tempo_epochs\":3.5,"},
        {"\"blend_alpha_target\":1.0", "\"blend_alpha_target\":0.0"},
        {"\"resolved_topology\":\"cnn\"", "\"resolved_topology\":\"transformer\""},
        {"\"stage\":4", "\"stage\":5"},
        {"\"stage\":4", "\"stage\":11"},
        {"\"stage\":4", "\"stage\":1"},
        {"\"stage\":4", "\"stage\":\"BLENDING\""},
        {"\"previous_stage\":3", "\"previous_stage\":5"},
        {"\"slot_id\":\"r0c1\"", "\"slot_id\":\"r9c9\""},
        {"\"seed_id\":\"r0c1-conv_light\",", ""},
        {"\"_schema_version\":2", "\"_schema_version\":1"},
        {"\"schema_version\":1", "\"schema_version\":2"},
        {"\"algorithm_id\":\"gated\"", "\"algorithm_id\":\"sigmoid\""},
        {"\"alpha_algorithm\":3,\"blend", "\"alpha_algorithm\":1,\"blend"},
        {"\"alpha_mode\":1,\"alpha_curve\"", "\"alpha_mode\":3,\"alpha_curve\""},
        {"\"alpha_curve\":1", "\"alpha_curve\":0"},
        {"\"alpha_steepness\":12.0", "\"alpha_steepness\":0.01"},
        {"\"alpha_steps_done\":1", "\"alpha_steps_done\":9"},
        {"\"is_healthy\":true", "\"is_healthy\":null"},
        {"\"stage_entered_at\":\"", "\"stage_entered_at\":\"x"},
        {"\"stage_history\":[[2,", "\"stage_history\":[[5,"},
        {"\"stage_history\":[", "\"stage_history\":[3,"},
        {"\"epochs_total\":", "\"epochs_total\":-"},
        {"\"gradient_health\":0.9", "\"gradient_health\":1.9"},
        {"\"captured_at\":\"", "\"captured_at\":null,\"x\":\""},
        {"\"metrics\":{", "\"metrics\":null,\"m\":{"},
        {"\"alpha_schedule_config\":{", "\"alpha_schedule_config\":[{"},
        {"\"seed_state\":{", "\"seed_state\":{\"seed_id\":\"dup\","},
    };
    struct ksm_slot before = S;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *bad = replace_once(good, cases[i][0], cases[i][1]);
        struct ksm_slot out;
        memset(&out, 0x5a, sizeof out);
        struct ksm_slot out_before = out;
        bool ns, ng;
        char err[256] = "";
        cr_expect_eq(ksm_slot_extra_state_parse(&S, bad, &out, &ns, &ng, err, sizeof err),
                     KSM_EFORMAT, "case %zu accepted: %s -> %s", i, cases[i][0], cases[i][1]);
        cr_expect_gt(strlen(err), 0, "case %zu", i);
        cr_expect_eq(memcmp(&out, &out_before, sizeof out), 0, "case %zu wrote out", i);
        free(bad);
    }
    const char *junk[] = {"", "[]", "null", "{\"_extra_state_version\":1}", "{", "42"};
    for (size_t i = 0; i < sizeof junk / sizeof junk[0]; i++) {
        struct ksm_slot out;
        cr_expect_eq(ksm_slot_extra_state_parse(&S, junk[i], &out, NULL, NULL, NULL, 0),
                     KSM_EFORMAT, "junk %zu", i);
    }
    /* a GATE seed in BLENDING without its gate config */
    char *nogate =
        replace_once(good, "\"alpha_schedule_config\":{", "\"alpha_schedule_config\":null,\"z\":{");
    struct ksm_slot out;
    cr_expect_eq(ksm_slot_extra_state_parse(&S, nogate, &out, NULL, NULL, NULL, 0), KSM_EFORMAT);
    free(nogate);
    cr_expect_eq(memcmp(&before, &S, sizeof S), 0);
    free(good);
}

/* ---- check details (docs/gates.md#check-details) ---- */

static const struct ksm_gate_check *check_of(const struct ksm_gate_result *g, const char *name)
{
    for (int i = 0; i < g->n_checks; i++)
        if (!strcmp(g->checks[i].name, name)) return &g->checks[i];
    return NULL;
}

/* checks[] holds exactly the strings of checks_passed and checks_failed, with their outcome. */
static void expect_checks_mirror_lists(const struct ksm_gate_result *g)
{
    cr_expect_eq(g->n_checks, g->n_passed + g->n_failed, "%d checks for %d + %d strings",
                 g->n_checks, g->n_passed, g->n_failed);
    int p = 0, f = 0;
    for (int i = 0; i < g->n_checks; i++) {
        const struct ksm_gate_check *c = &g->checks[i];
        if (c->passed)
            cr_expect_str_eq(c->name, g->checks_passed[p++]);
        else
            cr_expect_str_eq(c->name, g->checks_failed[f++]);
        cr_expect_neq(c->detail[0], '\0', "check %s has no detail", c->name);
        cr_expect_neq(c->quantity[0], '\0', "check %s names no quantity", c->name);
    }
}

#define EXPECT_DETAIL(g, name, want)                                                               \
    do {                                                                                           \
        const struct ksm_gate_check *c_ = check_of(&(g), name);                                    \
        cr_assert_not_null(c_, "no check %s", name);                                               \
        cr_expect_str_eq(c_->detail, want);                                                        \
    } while (0)

Test(slot, every_gate_lists_its_checks_with_details)
{
    for (int perm = 0; perm < 2; perm++) {
        setup(perm);
        germinate();
        expect_checks_mirror_lists(&(struct ksm_gate_result){0});
        struct ksm_gate_result g = gate(KSM_STAGE_GERMINATED);
        expect_checks_mirror_lists(&g);
        g = gate(KSM_STAGE_TRAINING);
        expect_checks_mirror_lists(&g);
        advance(KSM_STAGE_TRAINING);
        g = gate(KSM_STAGE_TRAINING);
        expect_checks_mirror_lists(&g);
        EXPECT_DETAIL(g, "not_germinated", "stage TRAINING, needs GERMINATED");
        for (int k = 0; k < 3; k++) {
            g = gate(KSM_STAGE_BLENDING);
            expect_checks_mirror_lists(&g);
            if (k == 0) record_acc(50);
            if (k == 1) record_grads(0.4, false, 0.01);
        }
        for (int i = 0; i < 10; i++) record_acc(50.0 + i * 0.25);
        record_grads(0.9, false, 0.5);
        g = gate(KSM_STAGE_BLENDING);
        expect_checks_mirror_lists(&g);
        cr_assert(advance(KSM_STAGE_BLENDING).passed);
        g = gate(KSM_STAGE_HOLDING);
        expect_checks_mirror_lists(&g);
        for (uint32_t i = 0; i < S.state.blend_tempo_epochs; i++) step();
        for (int i = 0; i < 10; i++) record_acc(60.0);
        advance(KSM_STAGE_HOLDING);
        g = gate(KSM_STAGE_FOSSILIZED);
        expect_checks_mirror_lists(&g);
        record_cf(0.25);
        g = gate(KSM_STAGE_FOSSILIZED);
        expect_checks_mirror_lists(&g);
    }
}

Test(slot, g2_strict_failed_checks_carry_value_and_threshold)
{
    setup(false);
    germinate();
    advance(KSM_STAGE_TRAINING);
    record_acc(50.0);
    record_acc(50.25);
    record_acc(50.25);
    struct ksm_gate_result g = gate(KSM_STAGE_BLENDING);
    /* The example: three epochs in the stage against the threshold of 10. */
    const struct ksm_gate_check *c = check_of(&g, "seed_not_ready");
    cr_assert_not_null(c);
    cr_expect_not(c->passed);
    cr_expect_str_eq(c->quantity, "epochs_in_current_stage");
    cr_expect_str_eq(c->op, ">=");
    cr_expect(c->has_value);
    cr_expect_eq(c->value, 3.0);
    cr_expect_eq(c->threshold, 10.0);
    cr_expect_str_eq(c->detail, "epochs_in_current_stage 3 < 10");
    EXPECT_DETAIL(g, "global_improvement_insufficient_0.25%",
                  "improvement_since_stage_start 0.25 < 0.5");
    c = check_of(&g, "gradient_stats_never_measured");
    cr_assert_not_null(c);
    cr_expect_not(c->has_value);
    cr_expect_eq(c->threshold, 0.1);
    cr_expect(strstr(c->detail, "seed_gradient_norm_ratio never measured (needs >= 0.1"), "%s",
              c->detail);
    record(&(struct ksm_metrics_update){.has_grad_ratio = true, .seed_gradient_norm_ratio = 0.05});
    g = gate(KSM_STAGE_BLENDING);
    EXPECT_DETAIL(g, "seed_gradient_low_0.05", "seed_gradient_norm_ratio 0.05 < 0.1");
    for (int i = 0; i < 8; i++) record_acc(52.0);
    record(&(struct ksm_metrics_update){.has_grad_ratio = true, .seed_gradient_norm_ratio = 0.5});
    g = gate(KSM_STAGE_BLENDING);
    cr_expect(g.passed);
    EXPECT_DETAIL(g, "seed_ready", "epochs_in_current_stage 11 >= 10");
    EXPECT_DETAIL(g, "global_improvement_2.00%", "improvement_since_stage_start 2 >= 0.5");
    EXPECT_DETAIL(g, "seed_gradient_active_0.50", "seed_gradient_norm_ratio 0.5 >= 0.1");
}

Test(slot, g2_permissive_failed_checks_carry_value_and_threshold)
{
    setup(true);
    germinate();
    advance(KSM_STAGE_TRAINING);
    for (int i = 0; i < 3; i++) record_acc(40.0);
    struct ksm_gate_result g = gate(KSM_STAGE_BLENDING);
    EXPECT_DETAIL(g, "insufficient_training_3_of_10", "epochs_in_current_stage 3 < 10");
    const struct ksm_gate_check *c = check_of(&g, "gradient_health_not_measured");
    cr_assert_not_null(c);
    cr_expect_not(c->has_value);
    cr_expect_str_eq(c->op, ">=");
    cr_expect_eq(c->threshold, 0.7);
    record_grads(0.5, false, 1);
    g = gate(KSM_STAGE_BLENDING);
    EXPECT_DETAIL(g, "gradient_health_low_0.50_need_0.70", "gradient_health 0.5 < 0.7");
    EXPECT_DETAIL(g, "no_exploding_gradients", "has_exploding is false");
    record_grads(0.95, true, 1);
    g = gate(KSM_STAGE_BLENDING);
    c = check_of(&g, "exploding_gradients");
    cr_assert_not_null(c);
    cr_expect_str_eq(c->op, "");
    cr_expect_str_eq(c->detail, "has_exploding is true (needs false)");
}

Test(slot, g3_and_g5_checks_carry_value_and_threshold)
{
    setup(false);
    germinate();
    to_blending();
    step();
    step();
    struct ksm_gate_result g = gate(KSM_STAGE_HOLDING);
    EXPECT_DETAIL(g, "alpha_target_full", "alpha_target 1 >= 0.999999");
    const struct ksm_gate_check *c = check_of(&g, "alpha_not_at_target_0.40_target_1.00_mode_UP");
    cr_assert_not_null(c);
    cr_expect(c->has_value);
    cr_expect(fabs(c->value - 0.4) < 1e-12);
    cr_expect(strstr(c->detail, "alpha 0.4, alpha_target 1, mode UP (needs mode HOLD"), "%s",
              c->detail);
    EXPECT_DETAIL(g, "blending_incomplete_0", "epochs_in_current_stage 0 < 10");

    setup(false);
    germinate();
    to_holding();
    g = gate(KSM_STAGE_FOSSILIZED);
    c = check_of(&g, "counterfactual_not_available");
    cr_assert_not_null(c);
    cr_expect_not(c->has_value);
    cr_expect_str_eq(c->quantity, "counterfactual_contribution");
    record_cf(0.5);
    g = gate(KSM_STAGE_FOSSILIZED);
    EXPECT_DETAIL(g, "insufficient_contribution_0.50%_below_1.0%",
                  "counterfactual_contribution 0.5 < 1");
    EXPECT_DETAIL(g, "healthy", "is_healthy is true");
}

Test(slot, refusals_explain_themselves)
{
    setup(true);
    struct ksm_gate_result g = advance(KSM_STAGE_UNKNOWN);
    cr_expect_eq(g.n_checks, 1);
    EXPECT_DETAIL(g, "no_active_seed", "the slot holds no active seed");
    germinate();
    to_fossilized();
    g = advance(KSM_STAGE_UNKNOWN);
    EXPECT_DETAIL(g, "no_valid_transition", "the seed's stage has no forward transition");
}

/* ConfigureSlot's per-slot auto-forward gates: kept as _kasmina_auto_forward_gates when they
 * differ from the model's (env) gates; absent means the model's; only levels 1..3. */
Test(slot, extra_state_keeps_per_slot_auto_forward_gates)
{
    setup_env(true, 1u << KSM_GATE_G1, KSM_TOPOLOGY_CNN);
    cr_expect_eq(S.auto_forward, 1u << KSM_GATE_G1, "a new slot takes the model's gates");
    char *plain = ksm_slot_extra_state_json(&S);
    cr_expect_null(strstr(plain, "_kasmina_auto_forward_gates"), "%s", plain);
    S.auto_forward = (1u << KSM_GATE_G2) | (1u << KSM_GATE_G3);
    roundtrip_check();
    char *js = ksm_slot_extra_state_json(&S);
    cr_expect_not_null(strstr(js, "\"_kasmina_auto_forward_gates\":[2,3]"), "%s", js);
    struct ksm_slot out;
    char err[256] = "";
    /* A document without the key (esper's, or one written at the default) resets to the model's. */
    cr_assert_eq(ksm_slot_extra_state_parse(&S, plain, &out, NULL, NULL, err, sizeof err), 0, "%s",
                 err);
    cr_expect_eq(out.auto_forward, 1u << KSM_GATE_G1);
    S.auto_forward = 0;
    free(js);
    js = ksm_slot_extra_state_json(&S);
    cr_expect_not_null(strstr(js, "\"_kasmina_auto_forward_gates\":[]"), "%s", js);
    roundtrip_check();
    const char *bad[] = {"[0]", "[4]", "[1.5]", "\"G1\"", "[\"G1\"]"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char to[64];
        snprintf(to, sizeof to, "\"_kasmina_auto_forward_gates\":%s", bad[i]);
        char *doc = replace_once(js, "\"_kasmina_auto_forward_gates\":[]", to);
        cr_expect_eq(ksm_slot_extra_state_parse(&S, doc, &out, NULL, NULL, err, sizeof err),
                     KSM_EFORMAT, "%s accepted", bad[i]);
        free(doc);
    }
    free(js);
    free(plain);
}
