/*
 * Seed slot lifecycle (docs/lifecycle.md#seed-lifecycle, esper K/slot.py SeedSlot / SeedState /
 * SeedMetrics / QualityGates): stages and transitions, slot operations, step_epoch, metrics,
 * events, reports. The quality gates are in quality_gates.c, the extra-state JSON in slot_json.c.
 *
 * Where esper mutates before it validates (germinate steps 1-3 and 7, prune of a cooling-down
 * slot raising auto_pruned) the daemon is atomic instead: a refused call changes nothing and
 * emits nothing.
 */
#include "kasmina/slot.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "kasmina/alpha.h"
#include "kasmina/errors.h"
#include "kasmina/text.h"

#define EMBARGO_EPOCHS            5u
#define DEFAULT_BLENDING_STEPS    5u
#define DEFAULT_TELEMETRY_MAX_EPO 25u

/* ---- small helpers ---- */

/* Truncating copy (cap > 0). Not snprintf: slot reports and events are built on every control
 * call, and formatting was a visible share of a SetAlpha's CPU. */
static void copy_str(char *dst, size_t cap, const char *src) { ksm_utf8_copy(dst, cap, src); }

static bool is_failure_stage(enum ksm_stage s)
{
    return s == KSM_STAGE_PRUNED || s == KSM_STAGE_EMBARGOED || s == KSM_STAGE_RESETTING;
}

static bool is_active_stage(enum ksm_stage s)
{
    return s == KSM_STAGE_TRAINING || s == KSM_STAGE_BLENDING || s == KSM_STAGE_HOLDING ||
           s == KSM_STAGE_FOSSILIZED;
}

/* VALID_TRANSITIONS (docs/lifecycle.md#transitions), in order. */
static int valid_transitions(enum ksm_stage from, enum ksm_stage out[3])
{
    switch (from) {
    case KSM_STAGE_UNKNOWN: out[0] = KSM_STAGE_DORMANT; return 1;
    case KSM_STAGE_DORMANT: out[0] = KSM_STAGE_GERMINATED; return 1;
    case KSM_STAGE_GERMINATED:
        out[0] = KSM_STAGE_TRAINING;
        out[1] = KSM_STAGE_PRUNED;
        return 2;
    case KSM_STAGE_TRAINING:
        out[0] = KSM_STAGE_BLENDING;
        out[1] = KSM_STAGE_PRUNED;
        return 2;
    case KSM_STAGE_BLENDING:
        out[0] = KSM_STAGE_HOLDING;
        out[1] = KSM_STAGE_PRUNED;
        return 2;
    case KSM_STAGE_HOLDING:
        out[0] = KSM_STAGE_FOSSILIZED;
        out[1] = KSM_STAGE_BLENDING;
        out[2] = KSM_STAGE_PRUNED;
        return 3;
    case KSM_STAGE_FOSSILIZED: return 0;
    case KSM_STAGE_PRUNED: out[0] = KSM_STAGE_EMBARGOED; return 1;
    case KSM_STAGE_EMBARGOED: out[0] = KSM_STAGE_RESETTING; return 1;
    case KSM_STAGE_RESETTING: out[0] = KSM_STAGE_DORMANT; return 1;
    }
    return 0;
}

static bool is_valid_transition(enum ksm_stage from, enum ksm_stage to)
{
    enum ksm_stage t[3];
    int n = valid_transitions(from, t);
    for (int i = 0; i < n; i++)
        if (t[i] == to) return true;
    return false;
}

static bool auto_forward(const struct ksm_slot *s, enum ksm_gate_level g)
{
    return (s->auto_forward & (1u << g)) != 0;
}

static enum ksm_topology slot_topology(const struct ksm_slot *s)
{
    return s->env ? s->env->topology : KSM_TOPOLOGY_CNN;
}

int64_t ksm_slot_wall_now_ns(void)
{
    /* Microseconds: the precision the extra state keeps, so a restored slot reports the same
     * instants as before the restart. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec / 1000 * 1000;
}

/* ---- metrics (SeedMetrics, docs/gates.md#recordmetrics) ---- */

static double blending_delta(const struct ksm_seed_metrics *m)
{
    return m->blending_started ? m->current_val_accuracy - m->accuracy_at_blending_start : 0.0;
}

/* ---- SeedState.transition (docs/lifecycle.md#transitions) ---- */

static void history_push(struct ksm_seed_state *st, enum ksm_stage stage, int64_t at)
{
    /* deque(maxlen=100): drop the oldest. Kept in order from index 0 so equal histories are
     * equal bytes. */
    if (st->history_len == KSM_STAGE_HISTORY_MAX) {
        memmove(&st->history[0], &st->history[1],
                (KSM_STAGE_HISTORY_MAX - 1) * sizeof st->history[0]);
        st->history_len--;
    }
    st->history[st->history_len].stage = stage;
    st->history[st->history_len].at_ns = at;
    st->history_len++;
}

static bool state_transition(struct ksm_seed_state *st, enum ksm_stage to, int64_t now)
{
    if (!is_valid_transition(st->stage, to)) return false;
    st->previous_stage = st->stage;
    st->previous_epochs_in_stage = st->metrics.epochs_in_current_stage;
    st->stage = to;
    st->stage_entered_at_ns = now;
    history_push(st, to, now);
    st->metrics.accuracy_at_stage_start = st->metrics.current_val_accuracy;
    st->metrics.epochs_in_current_stage = 0;
    return true;
}

/* ---- module callbacks ---- */

static void free_seed(struct ksm_slot *s)
{
    if (!s->seed) return;
    if (s->env && s->env->free_seed) s->env->free_seed(s->env->ud, s);
    s->seed = NULL;
}

static void drop_gate(struct ksm_slot *s)
{
    if (!s->gate) return;
    if (s->env && s->env->drop_gate) s->env->drop_gate(s->env->ud, s);
    s->gate = NULL;
    s->gate_total_steps = s->gate_current_step = 0;
}

static int create_gate(struct ksm_slot *s, uint32_t total_steps)
{
    if (s->env && s->env->create_gate) {
        int rc = s->env->create_gate(s->env->ud, s, total_steps);
        if (rc < 0) return rc;
    }
    s->gate_total_steps = total_steps;
    s->gate_current_step = 0;
    return 0;
}

/* set_alpha (docs/lifecycle.md) on an occupied slot; value already finite or +-Inf. */
static void apply_alpha(struct ksm_slot *s, double value)
{
    double a = fmax(0.0, fmin(1.0, value));
    bool changed = s->state.alpha != a;
    s->state.alpha = a;
    s->state.controller.alpha = a;
    s->state.metrics.current_alpha = a;
    if (changed && s->env && s->env->alpha_changed) s->env->alpha_changed(s->env->ud, s);
}

/* ---- events (docs/lifecycle.md#events) ---- */

static void ev_init(const struct ksm_slot *s, struct ksm_lifecycle_event *ev,
                    enum ksm_lifecycle_type type, int64_t now)
{
    memset(ev, 0, sizeof *ev);
    ev->type = type;
    copy_str(ev->slot_id, sizeof ev->slot_id, s->id);
    copy_str(ev->seed_id, sizeof ev->seed_id, s->state.seed_id);
    copy_str(ev->blueprint_id, sizeof ev->blueprint_id, s->state.blueprint_id);
    ev->timestamp_ns = now;
    ev->alpha = s->state.alpha;
    copy_str(ev->alpha_curve, sizeof ev->alpha_curve,
             ksm_alpha_curve_name(s->state.controller.curve));
}

static void ev_value(struct ksm_lifecycle_event *ev, const char *key, double v)
{
    int cap = (int)(sizeof ev->values / sizeof ev->values[0]);
    if (ev->n_values >= cap) return;
    ev->values[ev->n_values].key = key;
    ev->values[ev->n_values].value = v;
    ev->n_values++;
}

static void emit(struct ksm_slot *s, struct ksm_lifecycle_event *ev)
{
    if (s->env && s->env->emit) s->env->emit(s->env->ud, s, ev);
}

/* _telemetry_grad_ratio and the payload flags: 0 / False until telemetry has an epoch > 0. */
static double tel_grad_ratio(const struct ksm_seed_state *st)
{
    if (st->telemetry.epoch == 0 || !st->metrics.has_grad_ratio) return 0.0;
    return st->metrics.seed_gradient_norm_ratio;
}

static double tel_flag(const struct ksm_seed_state *st, bool has, bool v)
{
    return (st->telemetry.epoch > 0 && has && v) ? 1.0 : 0.0;
}

/* Captured health fields of a SEED_STAGE_CHANGED payload. */
struct grad_snap {
    double ratio, vanishing, exploding;
};

static struct grad_snap grad_snapshot(const struct ksm_seed_state *st)
{
    return (struct grad_snap){
        .ratio = tel_grad_ratio(st),
        .vanishing = tel_flag(st, st->telemetry.has_vanishing_flag, st->telemetry.has_vanishing),
        .exploding = tel_flag(st, st->telemetry.has_exploding_flag, st->telemetry.has_exploding),
    };
}

static void emit_stage_changed(struct ksm_slot *s, enum ksm_stage from, enum ksm_stage to,
                               double alpha, double accuracy_delta, uint32_t epochs_in_stage,
                               const struct grad_snap *g, int64_t now)
{
    struct ksm_lifecycle_event ev;
    ev_init(s, &ev, KSM_EV_SEED_STAGE_CHANGED, now);
    ev.from_stage = from;
    ev.to_stage = to;
    ev.alpha = alpha;
    ev_value(&ev, "accuracy_delta", accuracy_delta);
    ev_value(&ev, "epochs_in_stage", (double)epochs_in_stage);
    ev_value(&ev, "grad_ratio", g->ratio);
    ev_value(&ev, "has_vanishing", g->vanishing);
    ev_value(&ev, "has_exploding", g->exploding);
    emit(s, &ev);
}

/* ---- slot ---- */

void ksm_slot_init(struct ksm_slot *s, const char *id, int channels, const struct ksm_slot_env *env)
{
    memset(s, 0, sizeof *s);
    copy_str(s->id, sizeof s->id, id);
    s->channels = channels;
    s->env = env;
    s->auto_forward = env ? env->auto_forward : 0;
    s->has_grad_ratio_ema = true; /* 0.0 */
}

void ksm_slot_forget_dead_gradients(struct ksm_slot *s)
{
    if (s->occupied && !is_failure_stage(s->state.stage)) return;
    s->has_collected_grads = false;
    s->has_grad_ratio_ema = false;
    s->grad_ratio_ema = 0.0;
}

bool ksm_slot_runs_seed(const struct ksm_slot *s)
{
    return s->occupied && s->seed && is_active_stage(s->state.stage);
}

static bool slot_is_active(const struct ksm_slot *s) { return s->occupied && s->seed; }

static void set_blend_out_freeze(struct ksm_slot *s)
{
    s->blend_out_freeze = s->occupied && s->state.controller.mode == KSM_ALPHA_DOWN;
}

/* The blend curve of a blend algorithm id (start_blending). */
static bool blend_curve(const char *id, enum ksm_alpha_curve *curve)
{
    if (!strcmp(id, "linear"))
        *curve = KSM_CURVE_LINEAR;
    else if (!strcmp(id, "sigmoid"))
        *curve = KSM_CURVE_SIGMOID;
    else if (!strcmp(id, "gated"))
        *curve = KSM_CURVE_LINEAR; /* no "double dynamics" */
    else
        return false;
    return true;
}

static const char *blend_id(const struct ksm_slot *s)
{
    return s->blend_algorithm_id[0] ? s->blend_algorithm_id : "sigmoid";
}

static uint32_t blend_steps(const struct ksm_slot *s)
{
    return s->has_blend_tempo ? s->blend_tempo_epochs : DEFAULT_BLENDING_STEPS;
}

/* Does entering `target` from the current stage need a new gate module? */
static bool entry_needs_gate(const struct ksm_slot *s, enum ksm_stage target)
{
    return target == KSM_STAGE_BLENDING && s->state.stage == KSM_STAGE_TRAINING &&
           !strcmp(blend_id(s), "gated");
}

/* start_blending(total_steps) minus the gate creation (done beforehand by the caller). */
static void start_blending(struct ksm_slot *s, uint32_t total_steps)
{
    const char *id = blend_id(s);
    enum ksm_alpha_curve curve = KSM_CURVE_SIGMOID;
    blend_curve(id, &curve);
    if (!strcmp(id, "gated"))
        s->state.alpha_algorithm = KSM_ALGO_GATE;
    else
        drop_gate(s);
    double target = s->has_blend_alpha_target ? s->blend_alpha_target : 1.0;
    ksm_alpha_init(&s->state.controller, s->state.alpha);
    ksm_alpha_retarget(&s->state.controller, target, (long)total_steps, curve,
                       KSM_DEFAULT_STEEPNESS);
    /* A 0-step tempo jumps at once; keep state.alpha == controller.alpha (docs/blending.md). */
    if (s->state.controller.alpha != s->state.alpha) apply_alpha(s, s->state.controller.alpha);
}

static void on_blending_complete(struct ksm_slot *s)
{
    if (s->state.alpha_algorithm != KSM_ALGO_GATE) drop_gate(s);
    apply_alpha(s, 1.0);
    struct ksm_alpha_controller *c = &s->state.controller;
    c->alpha_start = 1.0;
    c->alpha_target = 1.0;
    c->mode = KSM_ALPHA_HOLD;
    c->steps_done = c->steps_total;
}

/* _on_enter_stage (docs/lifecycle.md#stage-entry-side-effects). */
static void on_enter_stage(struct ksm_slot *s, enum ksm_stage to, enum ksm_stage from)
{
    if (to == KSM_STAGE_TRAINING && from == KSM_STAGE_GERMINATED) {
        s->isolate_gradients = true;
    } else if (to == KSM_STAGE_BLENDING && from == KSM_STAGE_TRAINING) {
        s->isolate_gradients = slot_topology(s) == KSM_TOPOLOGY_CNN;
        s->state.metrics.accuracy_at_blending_start = s->state.metrics.current_val_accuracy;
        s->state.metrics.blending_started = true;
        start_blending(s, blend_steps(s));
    } else if (to == KSM_STAGE_HOLDING && from == KSM_STAGE_BLENDING) {
        on_blending_complete(s);
    }
}

/* ---- germinate (docs/lifecycle.md) ---- */

static bool valid_blend_id(const char *id)
{
    enum ksm_alpha_curve c;
    return blend_curve(id, &c);
}

int ksm_slot_germinate_check(const struct ksm_slot *s, const struct ksm_germinate_args *a,
                             char *err, size_t errlen)
{
    if (!a) {
        ksm_errf(err, errlen, 0, "germinate needs arguments");
        return KSM_EINVAL;
    }
    if (!a->blueprint_id || !a->blueprint_id[0]) {
        ksm_errf(err, errlen, 0, "blueprint_id is required");
        return KSM_EINVAL;
    }
    if (strlen(a->blueprint_id) >= KSM_NAME_MAX) {
        ksm_errf(err, errlen, 0, "blueprint_id is longer than %d characters", KSM_NAME_MAX - 1);
        return KSM_EINVAL;
    }
    if (a->seed_id && strlen(a->seed_id) >= KSM_SEED_ID_MAX) {
        ksm_errf(err, errlen, 0, "seed_id is longer than %d characters", KSM_SEED_ID_MAX - 1);
        return KSM_EINVAL;
    }
    size_t bad;
    if (a->seed_id && !ksm_utf8_valid(a->seed_id, strlen(a->seed_id), &bad)) {
        ksm_errf(err, errlen, 0, "seed_id is not valid UTF-8 (byte %zu)", bad);
        return KSM_EINVAL;
    }
    if (a->has_alpha_target && !(a->alpha_target > 0.0 && a->alpha_target <= 1.0)) {
        ksm_errf(err, errlen, 0, "alpha_target must be within (0, 1], got %g", a->alpha_target);
        return KSM_EINVAL;
    }
    const char *bid =
        (a->blend_algorithm_id && a->blend_algorithm_id[0]) ? a->blend_algorithm_id : "sigmoid";
    if (!valid_blend_id(bid)) {
        ksm_errf(err, errlen, 0,
                 "unknown blend_algorithm_id '%.32s'; valid options: linear, sigmoid, gated", bid);
        return KSM_EINVAL;
    }
    if ((unsigned)a->alpha_algorithm > KSM_ALGO_GATE) {
        ksm_errf(err, errlen, 0, "unknown alpha_algorithm %d", (int)a->alpha_algorithm);
        return KSM_EINVAL;
    }
    bool gated = !strcmp(bid, "gated");
    if (gated && a->alpha_algorithm != KSM_ALGO_GATE) {
        ksm_errf(err, errlen, 0, "blend_algorithm_id 'gated' requires alpha_algorithm GATE");
        return KSM_EINVAL;
    }
    if (!gated && a->alpha_algorithm == KSM_ALGO_GATE) {
        ksm_errf(err, errlen, 0, "alpha_algorithm GATE requires blend_algorithm_id 'gated'");
        return KSM_EINVAL;
    }
    if (s->occupied || s->seed) {
        ksm_errf(err, errlen, 0, "slot %s is unavailable for germination (stage=%s)", s->id,
                 s->occupied ? ksm_stage_name(s->state.stage) : "UNKNOWN");
        return KSM_ESTAGE;
    }
    return 0;
}

static void telemetry_defaults(struct ksm_seed_state *st, int64_t now)
{
    memset(&st->telemetry, 0, sizeof st->telemetry);
    st->telemetry.max_epochs = DEFAULT_TELEMETRY_MAX_EPO;
    struct ksm_telemetry_sync *t = &st->tel_sync;
    memset(t, 0, sizeof *t);
    copy_str(t->seed_id, sizeof t->seed_id, st->seed_id);
    copy_str(t->blueprint_id, sizeof t->blueprint_id, st->blueprint_id);
    t->stage = KSM_STAGE_DORMANT;
    t->alpha_algorithm = KSM_ALGO_ADD;
    t->captured_at_ns = now;
    t->blend_tempo_epochs = 5;
    copy_str(t->alpha_curve, sizeof t->alpha_curve, "LINEAR");
}

int ksm_slot_germinate_commit(struct ksm_slot *s, const struct ksm_germinate_args *a, void *seed,
                              uint64_t seed_params, uint64_t host_params, int64_t now_ns)
{
    if (!seed || ksm_slot_germinate_check(s, a, NULL, 0) < 0) return KSM_EINVAL;

    const char *bid =
        (a->blend_algorithm_id && a->blend_algorithm_id[0]) ? a->blend_algorithm_id : "sigmoid";
    uint32_t tempo = a->blend_tempo_epochs ? a->blend_tempo_epochs : 5;

    /* Slot settings (step 1). */
    copy_str(s->blend_algorithm_id, sizeof s->blend_algorithm_id, bid);
    s->has_blend_tempo = true;
    s->blend_tempo_epochs = tempo;
    s->has_blend_alpha_target = true;
    s->blend_alpha_target = a->has_alpha_target ? a->alpha_target : 1.0;
    s->has_resolved_topology = true;
    s->pending_prune_reason[0] = s->pending_prune_initiator[0] = '\0';
    s->blend_out_freeze = false;
    s->has_collected_grads = false; /* the EMA stays: removed when the last seed stopped */

    /* SeedState(stage=DORMANT) (step 8-9). */
    struct ksm_seed_state *st = &s->state;
    memset(st, 0, sizeof *st);
    if (a->seed_id && a->seed_id[0])
        copy_str(st->seed_id, sizeof st->seed_id, a->seed_id);
    else
        snprintf(st->seed_id, sizeof st->seed_id, "%s-%s", s->id, a->blueprint_id);
    copy_str(st->blueprint_id, sizeof st->blueprint_id, a->blueprint_id);
    st->stage = KSM_STAGE_DORMANT;
    st->previous_stage = KSM_STAGE_UNKNOWN;
    st->stage_entered_at_ns = now_ns;
    st->alpha = 0.0;
    ksm_alpha_init(&st->controller, 0.0);
    st->alpha_algorithm = a->alpha_algorithm ? a->alpha_algorithm : KSM_ALGO_ADD;
    st->blend_tempo_epochs = tempo;
    st->is_healthy = true;
    st->metrics.seed_param_count = seed_params;
    st->metrics.host_param_count = host_params;
    telemetry_defaults(st, now_ns);

    /* G0 and DORMANT -> GERMINATED (step 10); check() guaranteed both ids. */
    state_transition(st, KSM_STAGE_GERMINATED, now_ns);
    s->occupied = true;
    s->seed = seed;

    /* Step 12: SEED_GERMINATED, no STAGE_CHANGED. */
    struct ksm_lifecycle_event ev;
    ev_init(s, &ev, KSM_EV_SEED_GERMINATED, now_ns);
    ev.to_stage = KSM_STAGE_GERMINATED;
    ev_value(&ev, "params", (double)seed_params);
    ev_value(&ev, "blend_tempo_epochs", (double)tempo);
    ev_value(&ev, "grad_ratio", 0.0);
    ev_value(&ev, "has_vanishing", 0.0);
    ev_value(&ev, "has_exploding", 0.0);
    ev_value(&ev, "epochs_in_stage", 0.0);
    emit(s, &ev);
    return 0;
}

/* ---- advance_stage (docs/lifecycle.md) ---- */

/* Evaluate, emit GATE_EVALUATED, and on a pass transition + entry hook + STAGE_CHANGED (+
 * FOSSILIZED). target is a legal transition from the current stage of an active slot. */
static int advance_to(struct ksm_slot *s, enum ksm_stage target, struct ksm_gate_result *out,
                      int64_t now)
{
    struct ksm_gate_result r;
    ksm_slot_check_gate(s, target, &r);

    /* The only fallible step (device memory) comes before anything is emitted. */
    bool new_gate = r.passed && entry_needs_gate(s, target);
    if (new_gate) {
        int rc = create_gate(s, blend_steps(s));
        if (rc < 0) return rc;
    }

    struct ksm_lifecycle_event ev;
    ev_init(s, &ev, KSM_EV_SEED_GATE_EVALUATED, now);
    ev.target_stage = target;
    ev.gate = r;
    emit(s, &ev);

    if (r.passed) {
        struct ksm_seed_state *st = &s->state;
        enum ksm_stage old = st->stage;
        double improvement = ksm_metrics_total_improvement(&st->metrics);
        bool has_cf = st->metrics.has_counterfactual;
        double cf = st->metrics.counterfactual_contribution;
        double bdelta = blending_delta(&st->metrics);
        uint32_t epochs_total = st->metrics.epochs_total;
        uint32_t epochs_in_stage = st->metrics.epochs_in_current_stage;

        state_transition(st, target, now); /* legal: checked by the caller */
        on_enter_stage(s, target, old);
        struct grad_snap g = grad_snapshot(st);
        emit_stage_changed(s, old, target, st->alpha, improvement, epochs_in_stage, &g, now);

        if (target == KSM_STAGE_FOSSILIZED) {
            ev_init(s, &ev, KSM_EV_SEED_FOSSILIZED, now);
            ev.from_stage = old;
            ev.to_stage = target;
            ev_value(&ev, "improvement", improvement);
            ev_value(&ev, "params_added", s->seed ? (double)st->metrics.seed_param_count : 0.0);
            ev_value(&ev, "epochs_total", (double)epochs_total);
            if (has_cf) ev_value(&ev, "counterfactual", cf);
            ev_value(&ev, "blending_delta", bdelta);
            emit(s, &ev);
        }
    }
    if (out) *out = r;
    return 0;
}

int ksm_slot_advance(struct ksm_slot *s, enum ksm_stage target, struct ksm_gate_result *gate,
                     int64_t now_ns, char *err, size_t errlen)
{
    if (target != KSM_STAGE_UNKNOWN && !ksm_stage_valid((int)target)) {
        ksm_errf(err, errlen, 0, "advance_stage() target %d is not a stage", (int)target);
        return KSM_EINVAL;
    }
    if (is_failure_stage(target)) {
        ksm_errf(err, errlen, 0,
                 "advance_stage() cannot target failure stage %s; use prune() and the cooldown "
                 "pipeline instead",
                 ksm_stage_name(target));
        return KSM_EINVAL;
    }
    struct ksm_gate_result r;
    if (!slot_is_active(s)) {
        ksm_gate_result_failed(&r, KSM_GATE_G0, "no_active_seed");
        if (gate) *gate = r;
        return 0;
    }
    if (target == KSM_STAGE_UNKNOWN) {
        enum ksm_stage t[3];
        int n = valid_transitions(s->state.stage, t);
        for (int i = 0; i < n && target == KSM_STAGE_UNKNOWN; i++)
            if (!is_failure_stage(t[i])) target = t[i];
        if (target == KSM_STAGE_UNKNOWN) {
            ksm_gate_result_failed(&r, KSM_GATE_G0, "no_valid_transition");
            if (gate) *gate = r;
            return 0;
        }
    } else if (!is_valid_transition(s->state.stage, target)) {
        ksm_errf(err, errlen, 0, "slot %s cannot go from %s to %s", s->id,
                 ksm_stage_name(s->state.stage), ksm_stage_name(target));
        return KSM_ESTAGE;
    }
    int rc = advance_to(s, target, &r, now_ns);
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "slot %s: cannot create the gate module for BLENDING (%s)", s->id,
                 ksm_strerror(rc));
        return rc;
    }
    if (gate) *gate = r;
    return 0;
}

/* ---- prune (docs/lifecycle.md) ---- */

static bool is_auto_prune_reason(const char *reason)
{
    static const char *const reasons[] = {"governor_nan", "governor_lobotomy",
                                          "governor_divergence", "governor_rollback"};
    for (size_t i = 0; i < sizeof reasons / sizeof reasons[0]; i++)
        if (!strcmp(reason, reasons[i])) return true;
    return false;
}

/* PRUNE_INSTANT on a slot whose stage can go to PRUNED. */
static void prune_now(struct ksm_slot *s, const char *reason, const char *initiator, int64_t now)
{
    struct ksm_seed_state *st = &s->state;
    reason = reason ? reason : "";
    initiator = (initiator && initiator[0]) ? initiator : "policy";

    double improvement = ksm_metrics_total_improvement(&st->metrics);
    bool has_cf = st->metrics.has_counterfactual;
    double cf = st->metrics.counterfactual_contribution;
    double bdelta = blending_delta(&st->metrics);
    uint32_t epochs_total = st->metrics.epochs_total;
    uint32_t epochs_in_stage = st->metrics.epochs_in_current_stage;

    bool auto_pruned = is_auto_prune_reason(reason);
    st->metrics.auto_pruned = auto_pruned;
    copy_str(st->metrics.auto_prune_reason, sizeof st->metrics.auto_prune_reason,
             auto_pruned ? reason : "");

    enum ksm_stage old = st->stage;
    state_transition(st, KSM_STAGE_PRUNED, now);
    double alpha = st->alpha;
    struct grad_snap g = grad_snapshot(st);

    free_seed(s); /* memory first */
    ksm_slot_forget_dead_gradients(s);

    emit_stage_changed(s, old, KSM_STAGE_PRUNED, alpha, improvement, epochs_in_stage, &g, now);
    struct ksm_lifecycle_event ev;
    ev_init(s, &ev, KSM_EV_SEED_PRUNED, now);
    ev.from_stage = old;
    ev.to_stage = KSM_STAGE_PRUNED;
    ev.alpha = alpha;
    copy_str(ev.reason, sizeof ev.reason, reason);
    copy_str(ev.initiator, sizeof ev.initiator, initiator);
    ev_value(&ev, "improvement", improvement);
    ev_value(&ev, "auto_pruned", auto_pruned ? 1.0 : 0.0);
    ev_value(&ev, "epochs_total", (double)epochs_total);
    if (has_cf) ev_value(&ev, "counterfactual", cf);
    ev_value(&ev, "blending_delta", bdelta);
    emit(s, &ev);

    apply_alpha(s, 0.0);
    struct ksm_alpha_controller *c = &st->controller;
    c->alpha_start = c->alpha_target = 0.0;
    c->steps_total = c->steps_done = 0;
    c->mode = KSM_ALPHA_HOLD;
    drop_gate(s);
    s->isolate_gradients = false;
    s->blend_out_freeze = false;
    s->pending_prune_reason[0] = s->pending_prune_initiator[0] = '\0';
}

int ksm_slot_prune(struct ksm_slot *s, const char *reason, const char *initiator, bool *accepted,
                   int64_t now_ns)
{
    bool ok = s->occupied && is_valid_transition(s->state.stage, KSM_STAGE_PRUNED);
    if (ok)
        prune_now(s, reason, initiator, now_ns);
    else if (!s->occupied || s->state.stage == KSM_STAGE_FOSSILIZED)
        s->pending_prune_reason[0] = s->pending_prune_initiator[0] = '\0';
    if (accepted) *accepted = ok;
    return 0;
}

/* ---- schedule_prune / set_alpha_target ---- */

static int check_ramp_args(enum ksm_alpha_curve curve, double steepness, char *err, size_t errlen)
{
    if ((unsigned)curve > KSM_CURVE_SIGMOID) {
        ksm_errf(err, errlen, 0, "unknown alpha curve %d", (int)curve);
        return KSM_EINVAL;
    }
    if (!isfinite(steepness) || steepness <= 0.0) {
        ksm_errf(err, errlen, 0, "steepness must be a finite number > 0, got %g", steepness);
        return KSM_EINVAL;
    }
    return 0;
}

/* HOLDING -> BLENDING for a scheduled prune or partial re-target (no entry side effects). */
static void reenter_blending(struct ksm_slot *s, int64_t now)
{
    struct ksm_seed_state *st = &s->state;
    uint32_t epochs_in_stage = st->metrics.epochs_in_current_stage;
    double improvement = ksm_metrics_total_improvement(&st->metrics);
    state_transition(st, KSM_STAGE_BLENDING, now);
    on_enter_stage(s, KSM_STAGE_BLENDING, KSM_STAGE_HOLDING);
    struct grad_snap g = grad_snapshot(st);
    emit_stage_changed(s, KSM_STAGE_HOLDING, KSM_STAGE_BLENDING, st->alpha, improvement,
                       epochs_in_stage, &g, now);
}

int ksm_slot_schedule_prune(struct ksm_slot *s, uint32_t steps, enum ksm_alpha_curve curve,
                            double steepness, const char *reason, const char *initiator,
                            bool *accepted, int64_t now_ns, char *err, size_t errlen)
{
    int rc = check_ramp_args(curve, steepness, err, errlen);
    if (rc < 0) return rc;
    if (accepted) *accepted = false;
    if (!s->occupied || s->state.stage == KSM_STAGE_FOSSILIZED) return 0;
    if (steps == 0 || s->state.alpha <= 0.0)
        return ksm_slot_prune(s, reason, initiator, accepted, now_ns);
    if (s->state.controller.mode != KSM_ALPHA_HOLD) return 0;
    if (s->state.stage == KSM_STAGE_HOLDING)
        reenter_blending(s, now_ns);
    else if (s->state.stage != KSM_STAGE_BLENDING)
        return ksm_slot_prune(s, reason, initiator, accepted, now_ns);

    copy_str(s->pending_prune_reason, sizeof s->pending_prune_reason, reason);
    copy_str(s->pending_prune_initiator, sizeof s->pending_prune_initiator,
             (initiator && initiator[0]) ? initiator : "policy");
    ksm_alpha_retarget(&s->state.controller, 0.0, (long)steps, curve, steepness);
    set_blend_out_freeze(s);
    if (accepted) *accepted = true;
    return 0;
}

int ksm_slot_set_alpha_target(struct ksm_slot *s, double target, uint32_t steps,
                              enum ksm_alpha_curve curve, double steepness,
                              enum ksm_alpha_algorithm algorithm, int64_t now_ns, char *err,
                              size_t errlen)
{
    if (!(target > 0.0 && target <= 1.0)) {
        ksm_errf(err, errlen, 0,
                 "alpha_target must be within (0, 1] (use prune for a zero target), got %g",
                 target);
        return KSM_EINVAL;
    }
    int rc = check_ramp_args(curve, steepness, err, errlen);
    if (rc < 0) return rc;
    if ((unsigned)algorithm > KSM_ALGO_GATE) {
        ksm_errf(err, errlen, 0, "unknown alpha_algorithm %d", (int)algorithm);
        return KSM_EINVAL;
    }
    if (!s->occupied) {
        ksm_errf(err, errlen, 0, "slot %s has no seed", s->id);
        return KSM_ESTAGE;
    }
    struct ksm_seed_state *st = &s->state;
    if (st->stage != KSM_STAGE_BLENDING && st->stage != KSM_STAGE_HOLDING) {
        ksm_errf(err, errlen, 0,
                 "slot %s is in %s; alpha targets apply in BLENDING or HOLDING only", s->id,
                 ksm_stage_name(st->stage));
        return KSM_ESTAGE;
    }
    if (st->controller.mode != KSM_ALPHA_HOLD) {
        ksm_errf(err, errlen, 0, "slot %s is ramping alpha (mode %s); retarget only from HOLD",
                 s->id, ksm_alpha_mode_name(st->controller.mode));
        return KSM_ESTAGE;
    }

    bool switch_algo = algorithm != KSM_ALGO_UNSPECIFIED && algorithm != st->alpha_algorithm;
    if (switch_algo && algorithm == KSM_ALGO_GATE && !s->gate) {
        rc = create_gate(s, steps > 0 ? steps : 1);
        if (rc < 0) {
            ksm_errf(err, errlen, 0, "slot %s: cannot create the gate module (%s)", s->id,
                     ksm_strerror(rc));
            return rc;
        }
    }

    if (st->stage == KSM_STAGE_HOLDING && target < 1.0 - KSM_ALPHA_EPS) reenter_blending(s, now_ns);
    if (switch_algo) {
        if (algorithm != KSM_ALGO_GATE) drop_gate(s);
        st->alpha_algorithm = algorithm;
    }
    ksm_alpha_retarget(&st->controller, target, (long)steps, curve, steepness);
    /* An INSTANT retarget moves the controller at once; keep state.alpha in step
     * (docs/blending.md). */
    if (st->controller.alpha != st->alpha) apply_alpha(s, st->controller.alpha);
    set_blend_out_freeze(s);
    return 0;
}

int ksm_slot_set_alpha(struct ksm_slot *s, double alpha, char *err, size_t errlen)
{
    if (isnan(alpha)) {
        ksm_errf(err, errlen, 0, "alpha must be a number");
        return KSM_EINVAL;
    }
    if (s->occupied) apply_alpha(s, alpha);
    return 0;
}

/* ---- step_epoch (docs/lifecycle.md, docs/lifecycle.md#cooldown-timing) ---- */

static void cooldown_changed(struct ksm_slot *s, enum ksm_stage from, enum ksm_stage to,
                             uint32_t epochs_in_stage, int64_t now)
{
    struct grad_snap g = grad_snapshot(&s->state);
    emit_stage_changed(s, from, to, s->state.alpha, 0.0, epochs_in_stage, &g, now);
}

int ksm_slot_step_epoch(struct ksm_slot *s, int64_t now_ns)
{
    if (!s->occupied) return 0;
    struct ksm_seed_state *st = &s->state;
    set_blend_out_freeze(s);

    switch (st->stage) {
    case KSM_STAGE_GERMINATED:
        if (auto_forward(s, KSM_GATE_G1) && slot_is_active(s))
            return advance_to(s, KSM_STAGE_TRAINING, NULL, now_ns);
        return 0;
    case KSM_STAGE_TRAINING:
        if (auto_forward(s, KSM_GATE_G2) && slot_is_active(s) &&
            st->metrics.epochs_in_current_stage >= MIN_BLENDING_EPOCHS)
            return advance_to(s, KSM_STAGE_BLENDING, NULL, now_ns);
        return 0;
    case KSM_STAGE_BLENDING: {
        struct ksm_alpha_controller *c = &st->controller;
        bool reached = ksm_alpha_step(c);
        apply_alpha(s, c->alpha);
        st->metrics.alpha_ramp_step = c->steps_done;
        bool target_reached = reached || (c->mode == KSM_ALPHA_HOLD &&
                                          fabs(c->alpha - c->alpha_target) <= KSM_ALPHA_EPS);
        if (!target_reached) return 0;
        if (c->alpha_target <= KSM_ALPHA_EPS) {
            /* Scheduled-prune completion. */
            char reason[KSM_REASON_MAX], initiator[KSM_NAME_MAX];
            copy_str(reason, sizeof reason,
                     s->pending_prune_reason[0] ? s->pending_prune_reason : "scheduled_prune");
            copy_str(initiator, sizeof initiator,
                     s->pending_prune_initiator[0] ? s->pending_prune_initiator : "policy");
            prune_now(s, reason, initiator, now_ns);
            return 0;
        }
        if (auto_forward(s, KSM_GATE_G3) && slot_is_active(s) &&
            ((s->env && s->env->permissive) ||
             st->metrics.epochs_in_current_stage >= MIN_BLENDING_EPOCHS))
            return advance_to(s, KSM_STAGE_HOLDING, NULL, now_ns);
        return 0;
    }
    case KSM_STAGE_PRUNED: {
        uint32_t e = st->metrics.epochs_in_current_stage;
        state_transition(st, KSM_STAGE_EMBARGOED, now_ns);
        cooldown_changed(s, KSM_STAGE_PRUNED, KSM_STAGE_EMBARGOED, e, now_ns);
        return 0;
    }
    case KSM_STAGE_EMBARGOED: {
        st->metrics.epochs_total++;
        st->metrics.epochs_in_current_stage++;
        if (st->metrics.epochs_in_current_stage < EMBARGO_EPOCHS) return 0;
        uint32_t e = st->metrics.epochs_in_current_stage;
        state_transition(st, KSM_STAGE_RESETTING, now_ns);
        cooldown_changed(s, KSM_STAGE_EMBARGOED, KSM_STAGE_RESETTING, e, now_ns);
        return 0;
    }
    case KSM_STAGE_RESETTING: {
        st->metrics.epochs_total++;
        st->metrics.epochs_in_current_stage++;
        cooldown_changed(s, KSM_STAGE_RESETTING, KSM_STAGE_DORMANT,
                         st->metrics.epochs_in_current_stage, now_ns);
        /* Back to DORMANT: physically empty (BUG-ROLLBACK-ORPHAN), state cleared. */
        free_seed(s);
        drop_gate(s);
        s->blend_out_freeze = false;
        s->occupied = false;
        memset(st, 0, sizeof *st);
        return 0;
    }
    default: return 0; /* HOLDING, FOSSILIZED: nothing */
    }
}
