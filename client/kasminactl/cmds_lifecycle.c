/*
 * kasminactl subcommands of the seed lifecycle: germinate, advance, prune, schedule-prune,
 * set-alpha, set-alpha-target, step, metrics, slots, configure-slot, events.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cmds.h"

// ---- germinate ----

struct germinate_args {
    struct ctl_pos pos;
    struct ksm_germinate_args g;
};

#define GERM(f) offsetof(struct germinate_args, g.f)
static const struct ctl_opt germinate_opts[] = {
    {"seed-id", "ID", CTL_ARG_STRING, GERM(seed_id), 0, NULL, "default SLOT-BLUEPRINT"},
    {"blend", "ALGO", CTL_ARG_STRING, GERM(blend_algorithm_id), 0, NULL,
     "linear|sigmoid|gated (default sigmoid)"},
    {"tempo", "N", CTL_ARG_U32, GERM(blend_tempo_epochs), 0, NULL,
     "blend tempo in epochs (default 5)"},
    {"alpha-algorithm", "A", CTL_ARG_ALGORITHM, GERM(alpha_algorithm), 0, NULL,
     "add|multiply|gate"},
    {"alpha-target", "X", CTL_ARG_DOUBLE, GERM(alpha_target), GERM(has_alpha_target), NULL,
     "(0, 1], default 1"},
    {"init-seed", "N", CTL_ARG_U64, GERM(init_seed), 0, NULL, "deterministic seed weights"},
    {0},
};
#undef GERM

static int run_germinate(struct ctl *x, void *args)
{
    struct germinate_args *a = args;
    a->g.blueprint_id = a->pos.v[2];
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_slot_report r;
    if (ksm_client_germinate(x->client, a->pos.v[0], a->pos.v[1], &a->g, &r, &x->err) != 0)
        return ctl_call_failed(x);
    ctl_show_slot_report(x->json, &r, stdout);
    return 0;
}

const struct ctl_cmd ctl_cmd_germinate = {
    .name = "germinate",
    .summary = "plant a seed in a slot (Germinate)",
    .positionals = "MODEL SLOT BLUEPRINT",
    .min_pos = 3,
    .max_pos = 3,
    .opts = germinate_opts,
    .args_size = sizeof(struct germinate_args),
    .run = run_germinate,
};

// ---- advance ----

struct advance_args {
    struct ctl_pos pos;
    enum ksm_stage to;
    bool allow_fail;
};

static const struct ctl_opt advance_opts[] = {
    {"to", "STAGE", CTL_ARG_STAGE, offsetof(struct advance_args, to), 0, NULL,
     "next (default), training, blending, holding, fossilized, ..."},
    {"allow-fail", NULL, CTL_ARG_FLAG, offsetof(struct advance_args, allow_fail), 0, NULL,
     "exit 0 when the gate fails (default: exit 9)"},
    {0},
};

static void init_advance(void *args) { ((struct advance_args *)args)->to = KSM_STAGE_UNKNOWN; }

static int run_advance(struct ctl *x, void *args)
{
    struct advance_args *a = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_gate_result g;
    struct ksm_slot_report r;
    if (ksm_client_advance(x->client, a->pos.v[0], a->pos.v[1], a->to, &g, &r, &x->err) != 0)
        return ctl_call_failed(x);
    ctl_show_advance(x->json, &g, &r, stdout);
    if (!g.passed && !a->allow_fail) {
        /* The call succeeded and the seed stayed where it was: a script must not read that as
         * an advance. The failed checks were printed with their numbers above. */
        fflush(stdout);
        fprintf(stderr, "%s %s: gate %s failed; the seed stays in %s\n", x->prog, x->cmd,
                ksm_gate_level_name(g.gate), ksm_stage_name(r.stage));
        return CTL_EXIT_GATE_FAILED;
    }
    return 0;
}

const struct ctl_cmd ctl_cmd_advance = {
    .name = "advance",
    .summary = "evaluate the gate and advance a seed (AdvanceStage)",
    .positionals = "MODEL SLOT",
    .min_pos = 2,
    .max_pos = 2,
    .opts = advance_opts,
    .notes = "Prints the gate's checks, each failed one with the value it read and the threshold\n"
             "(\"- seed_not_ready: epochs_in_current_stage 3 < 10\"; docs/gates.md), then the\n"
             "slot. Exits 9 when the gate fails (the seed does not move), unless --allow-fail.",
    .args_size = sizeof(struct advance_args),
    .init = init_advance,
    .run = run_advance,
};

// ---- prune, schedule-prune, set-alpha-target: alpha ramps ----

/* The options of the three: each table uses those it takes. */
struct ramp_args {
    struct ctl_pos pos;
    const char *reason, *initiator;
    uint32_t steps;
    enum ksm_alpha_curve curve;
    double steepness;
    bool has_steepness;
    enum ksm_alpha_algorithm algorithm;
};

#define RAMP(f) offsetof(struct ramp_args, f)
static const struct ctl_opt prune_opts[] = {
    {"reason", "TEXT", CTL_ARG_STRING, RAMP(reason), 0, NULL, "why (recorded in the event)"},
    {"initiator", "WHO", CTL_ARG_STRING, RAMP(initiator), 0, NULL,
     "who asked (recorded in the event; default policy)"},
    {0},
};

static const struct ctl_opt schedule_prune_opts[] = {
    {"steps", "N", CTL_ARG_U32, RAMP(steps), 0, NULL, "length of the ramp in steps"},
    {"curve", "linear|cosine|sigmoid", CTL_ARG_CURVE, RAMP(curve), 0, NULL, "shape of the ramp"},
    {"steepness", "K", CTL_ARG_DOUBLE, RAMP(steepness), RAMP(has_steepness), NULL,
     "steepness of the curve"},
    {"reason", "TEXT", CTL_ARG_STRING, RAMP(reason), 0, NULL, "why (recorded in the event)"},
    {"initiator", "WHO", CTL_ARG_STRING, RAMP(initiator), 0, NULL,
     "who asked (recorded in the event; default policy)"},
    {0},
};

static const struct ctl_opt set_alpha_target_opts[] = {
    {"steps", "N", CTL_ARG_U32, RAMP(steps), 0, NULL, "length of the ramp in steps"},
    {"curve", "linear|cosine|sigmoid", CTL_ARG_CURVE, RAMP(curve), 0, NULL, "shape of the ramp"},
    {"steepness", "K", CTL_ARG_DOUBLE, RAMP(steepness), RAMP(has_steepness), NULL,
     "steepness of the curve"},
    {"alpha-algorithm", "add|multiply|gate", CTL_ARG_ALGORITHM, RAMP(algorithm), 0, NULL,
     "how the seed's output is blended in (default: keep)"},
    {0},
};
#undef RAMP

static void init_ramp(void *args)
{
    struct ramp_args *a = args;
    a->curve = KSM_CURVE_UNSPECIFIED;
    a->algorithm = KSM_ALGO_UNSPECIFIED;
}

static int run_prune(struct ctl *x, void *args)
{
    struct ramp_args *a = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    bool acc;
    struct ksm_slot_report r;
    if (ksm_client_prune(x->client, a->pos.v[0], a->pos.v[1], a->reason, a->initiator, &acc, &r,
                         &x->err) != 0)
        return ctl_call_failed(x);
    ctl_show_accepted(x->json, acc, &r, stdout);
    return 0;
}

const struct ctl_cmd ctl_cmd_prune = {
    .name = "prune",
    .summary = "prune a seed now (Prune)",
    .positionals = "MODEL SLOT",
    .min_pos = 2,
    .max_pos = 2,
    .opts = prune_opts,
    .args_size = sizeof(struct ramp_args),
    .init = init_ramp,
    .run = run_prune,
};

static int run_schedule_prune(struct ctl *x, void *args)
{
    struct ramp_args *a = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    bool acc;
    struct ksm_slot_report r;
    if (ksm_client_schedule_prune(x->client, a->pos.v[0], a->pos.v[1], a->steps, a->curve,
                                  a->has_steepness, a->steepness, a->reason, a->initiator, &acc, &r,
                                  &x->err) != 0)
        return ctl_call_failed(x);
    ctl_show_accepted(x->json, acc, &r, stdout);
    return 0;
}

const struct ctl_cmd ctl_cmd_schedule_prune = {
    .name = "schedule-prune",
    .summary = "ramp a seed's alpha down, then prune (SchedulePrune)",
    .positionals = "MODEL SLOT",
    .min_pos = 2,
    .max_pos = 2,
    .opts = schedule_prune_opts,
    .args_size = sizeof(struct ramp_args),
    .init = init_ramp,
    .run = run_schedule_prune,
};

static int run_set_alpha_target(struct ctl *x, void *args)
{
    struct ramp_args *a = args;
    char e[256];
    double target;
    if (ctl_parse_double("TARGET", a->pos.v[2], &target, e, sizeof e) != 0)
        return ctl_usage_error(x, "%s", e);
    int rc = ctl_connect(x);
    if (rc) return rc;
    bool acc;
    struct ksm_slot_report r;
    if (ksm_client_set_alpha_target(x->client, a->pos.v[0], a->pos.v[1], target, a->steps, a->curve,
                                    a->has_steepness, a->steepness, a->algorithm, &acc, &r,
                                    &x->err) != 0)
        return ctl_call_failed(x);
    ctl_show_accepted(x->json, acc, &r, stdout);
    return 0;
}

const struct ctl_cmd ctl_cmd_set_alpha_target = {
    .name = "set-alpha-target",
    .summary = "schedule an alpha ramp (SetAlphaTarget)",
    .positionals = "MODEL SLOT TARGET",
    .min_pos = 3,
    .max_pos = 3,
    .opts = set_alpha_target_opts,
    .args_size = sizeof(struct ramp_args),
    .init = init_ramp,
    .run = run_set_alpha_target,
};

// ---- set-alpha ----

static int run_set_alpha(struct ctl *x, void *args)
{
    const struct ctl_pos *p = args;
    char e[256];
    double alpha;
    if (ctl_parse_double("ALPHA", p->v[2], &alpha, e, sizeof e) != 0)
        return ctl_usage_error(x, "%s", e);
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_slot_report r;
    if (ksm_client_set_alpha(x->client, p->v[0], p->v[1], alpha, &r, &x->err) != 0)
        return ctl_call_failed(x);
    ctl_show_slot_report(x->json, &r, stdout);
    return 0;
}

const struct ctl_cmd ctl_cmd_set_alpha = {
    .name = "set-alpha",
    .summary = "set a slot's alpha at once (SetAlpha)",
    .positionals = "MODEL SLOT ALPHA",
    .min_pos = 3,
    .max_pos = 3,
    .args_size = sizeof(struct ctl_pos),
    .run = run_set_alpha,
};

// ---- step, slots ----

typedef int (*slot_reports_call)(ksm_client *c, const char *model_id, const char *slot_id,
                                 struct ksm_slot_report *out, size_t cap, size_t *n,
                                 struct ksm_client_error *err);

/* StepEpoch or GetSlotReports for MODEL [SLOT], then the reports. */
static int slot_reports(struct ctl *x, const struct ctl_pos *p, slot_reports_call call)
{
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_slot_report *r = calloc(KSM_MAX_SLOTS, sizeof *r);
    size_t n = 0;
    if (!r) return CTL_EXIT_OTHER;
    if (call(x->client, p->v[0], p->n > 1 ? p->v[1] : NULL, r, KSM_MAX_SLOTS, &n, &x->err) != 0) {
        free(r);
        return ctl_call_failed(x);
    }
    ctl_show_slot_reports(x->json, r, n < KSM_MAX_SLOTS ? n : KSM_MAX_SLOTS, stdout);
    free(r);
    return 0;
}

static int run_step(struct ctl *x, void *args)
{
    return slot_reports(x, args, ksm_client_step_epoch);
}

static int run_slots(struct ctl *x, void *args)
{
    return slot_reports(x, args, ksm_client_slot_reports);
}

const struct ctl_cmd ctl_cmd_step = {
    .name = "step",
    .summary = "one lifecycle tick for a slot or all slots (StepEpoch)",
    .positionals = "MODEL [SLOT]",
    .min_pos = 1,
    .max_pos = 2,
    .args_size = sizeof(struct ctl_pos),
    .run = run_step,
};

const struct ctl_cmd ctl_cmd_slots = {
    .name = "slots",
    .summary = "slot reports (GetSlotReports)",
    .positionals = "MODEL [SLOT]",
    .min_pos = 1,
    .max_pos = 2,
    .args_size = sizeof(struct ctl_pos),
    .run = run_slots,
};

// ---- configure-slot ----

struct configure_args {
    struct ctl_pos pos;
    struct ksm_slot_settings s;
};

static int set_isolate(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    struct configure_args *a = args;
    if (ctl_parse_bool(opt, arg, &a->s.isolate_gradients, err, errlen) != 0) return KSM_EINVAL;
    a->s.set_isolate_gradients = true;
    return 0;
}

static int set_auto_forward(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    struct configure_args *a = args;
    unsigned bits = 0;
    if (arg == NULL || strcmp(arg, "none") != 0) {
        if (ctl_parse_gates(opt, arg, &bits, err, errlen) != 0) return KSM_EINVAL;
        if (bits & 1u) {
            snprintf(err, errlen, "%s: only G1, G2 and G3 auto-advance (or 'none'), got '%s'", opt,
                     arg);
            return KSM_EINVAL;
        }
    }
    a->s.auto_forward_gates = bits;
    a->s.set_auto_forward_gates = true;
    return 0;
}

static const struct ctl_opt configure_opts[] = {
    {"isolate-gradients", "BOOL", CTL_ARG_SETTER, 0, 0, set_isolate,
     "the seed sees detached host features (esper SeedSlot.isolate_gradients)"},
    {"auto-forward", "G1,G2,G3|none", CTL_ARG_SETTER, 0, 0, set_auto_forward,
     "gates StepEpoch may auto-advance the slot through (esper SeedSlot.auto_forward_gates)"},
    {0},
};

static int run_configure_slot(struct ctl *x, void *args)
{
    struct configure_args *a = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_slot_report *r = calloc(KSM_MAX_SLOTS, sizeof *r);
    size_t n = 0;
    if (!r) return CTL_EXIT_OTHER;
    if (ksm_client_configure_slot(x->client, a->pos.v[0], a->pos.n > 1 ? a->pos.v[1] : NULL, &a->s,
                                  r, KSM_MAX_SLOTS, &n, &x->err) != 0) {
        free(r);
        return ctl_call_failed(x);
    }
    if (n > KSM_MAX_SLOTS) n = KSM_MAX_SLOTS;
    json_t *arr = x->json ? json_array() : NULL;
    if (!x->json) printf("%-8s %-17s %s\n", "SLOT", "ISOLATE_GRADIENTS", "AUTO_FORWARD");
    for (size_t i = 0; i < n; i++) {
        char g[16] = "";
        json_t *gj = x->json ? json_array() : NULL;
        for (int lvl = KSM_GATE_G1; lvl <= KSM_GATE_G3; lvl++)
            if (r[i].auto_forward_gates & (1u << lvl)) {
                size_t l = strlen(g);
                snprintf(g + l, sizeof g - l, "%sG%d", l ? "," : "", lvl);
                if (gj) json_array_append_new(gj, json_sprintf("G%d", lvl));
            }
        if (arr)
            json_array_append_new(arr, json_pack("{s:s, s:b, s:o}", "slot_id", r[i].slot_id,
                                                 "isolate_gradients", r[i].isolate_gradients,
                                                 "auto_forward_gates", gj));
        else
            printf("%-8s %-17s %s\n", r[i].slot_id, r[i].isolate_gradients ? "true" : "false",
                   g[0] ? g : "none");
    }
    if (arr) ctl_json_print(arr, stdout);
    free(r);
    return 0;
}

const struct ctl_cmd ctl_cmd_configure_slot = {
    .name = "configure-slot",
    .summary = "per-slot settings: gradient isolation, auto-forward gates (ConfigureSlot)",
    .positionals = "MODEL [SLOT]",
    .min_pos = 1,
    .max_pos = 2,
    .opts = configure_opts,
    .notes = "  No SLOT: every slot of MODEL. Options not given keep their value.",
    .args_size = sizeof(struct configure_args),
    .run = run_configure_slot,
};

// ---- metrics ----

struct metrics_args {
    struct ctl_pos pos;
    struct ksm_metrics_update u;
};

#define MET(f) offsetof(struct metrics_args, u.f)
static const struct ctl_opt metrics_opts[] = {
    {"val-accuracy", "PCT", CTL_ARG_DOUBLE, MET(val_accuracy), MET(has_val_accuracy), NULL,
     "validation accuracy, 0..100"},
    {"counterfactual", "PP", CTL_ARG_DOUBLE, MET(counterfactual), MET(has_counterfactual), NULL,
     "counterfactual contribution (percentage points)"},
    {"gradient-norm", "X", CTL_ARG_DOUBLE, MET(gradient_norm), MET(has_gradient_norm), NULL,
     "gradient norm, >= 0"},
    {"gradient-health", "X", CTL_ARG_DOUBLE, MET(gradient_health), MET(has_gradient_health), NULL,
     "gradient health in [0, 1]"},
    {"vanishing", "BOOL", CTL_ARG_BOOL, MET(vanishing), MET(has_vanishing), NULL,
     "gradients are vanishing"},
    {"exploding", "BOOL", CTL_ARG_BOOL, MET(exploding), MET(has_exploding), NULL,
     "gradients are exploding"},
    {"grad-ratio", "X", CTL_ARG_DOUBLE, MET(seed_gradient_norm_ratio), MET(has_grad_ratio), NULL,
     "the seed's gradient norm over the host's, >= 0"},
    {"epoch", "N", CTL_ARG_U32, MET(epoch), MET(has_epoch), NULL, "the current epoch"},
    {"max-epochs", "N", CTL_ARG_U32, MET(max_epochs), MET(has_max_epochs), NULL,
     "the epochs the training will run"},
    {0},
};
#undef MET

static int run_metrics(struct ctl *x, void *args)
{
    struct metrics_args *a = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_slot_report r;
    if (ksm_client_record_metrics(x->client, a->pos.v[0], a->pos.v[1], &a->u, &r, &x->err) != 0)
        return ctl_call_failed(x);
    ctl_show_slot_report(x->json, &r, stdout);
    return 0;
}

const struct ctl_cmd ctl_cmd_metrics = {
    .name = "metrics",
    .summary = "record measurements the gates read (RecordMetrics)",
    .positionals = "MODEL SLOT",
    .min_pos = 2,
    .max_pos = 2,
    .opts = metrics_opts,
    .args_size = sizeof(struct metrics_args),
    .run = run_metrics,
};

// ---- events ----

struct events_args {
    struct ctl_pos pos;
    uint64_t after, count;
    bool follow;
    uint32_t idle;
};

static const struct ctl_opt events_opts[] = {
    {"after", "SEQ", CTL_ARG_U64, offsetof(struct events_args, after), 0, NULL,
     "resume after this sequence number (default 0: what the server keeps)"},
    {"follow", NULL, CTL_ARG_FLAG, offsetof(struct events_args, follow), 0, NULL,
     "keep waiting for new events (until interrupted)"},
    {"idle", "MS", CTL_ARG_U32, offsetof(struct events_args, idle), 0, NULL,
     "without --follow: stop after MS without an event (default 500)"},
    {"count", "N", CTL_ARG_U64, offsetof(struct events_args, count), 0, NULL,
     "stop after N events"},
    {0},
};

static void init_events(void *args) { ((struct events_args *)args)->idle = 500; }

struct events_ctx {
    bool json;
    uint64_t count, limit;
};

static int on_event(void *ud, uint64_t seq, const struct ksm_lifecycle_event *ev)
{
    struct events_ctx *e = ud;
    ctl_show_event(e->json, seq, ev, stdout);
    fflush(stdout);
    return e->limit && ++e->count >= e->limit ? 1 : 0;
}

static int run_events(struct ctl *x, void *args)
{
    struct events_args *a = args;
    struct events_ctx e = {.json = x->json, .limit = a->count};
    int rc = ctl_connect(x);
    if (rc) return rc;
    rc = ksm_client_watch_events(x->client, a->pos.n ? a->pos.v[0] : NULL, a->after,
                                 a->follow ? 0 : a->idle, on_event, &e, &x->err);
    return rc < 0 ? ctl_call_failed(x) : 0;
}

const struct ctl_cmd ctl_cmd_events = {
    .name = "events",
    .summary = "lifecycle events (WatchEvents)",
    .positionals = "[MODEL]",
    .max_pos = 1,
    .opts = events_opts,
    .args_size = sizeof(struct events_args),
    .init = init_events,
    .run = run_events,
};
