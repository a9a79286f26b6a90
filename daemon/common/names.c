/*
 * Names of the engine's enums (kasmina.h), as esper-lite spells them: SeedStage, AlphaMode,
 * AlphaCurve, AlphaAlgorithm and GateLevel member names, TelemetryEventType names, topology
 * strings.
 */
#include "kasmina/kasmina.h"

const char *ksm_stage_name(enum ksm_stage s)
{
    switch (s) {
    case KSM_STAGE_UNKNOWN: return "UNKNOWN";
    case KSM_STAGE_DORMANT: return "DORMANT";
    case KSM_STAGE_GERMINATED: return "GERMINATED";
    case KSM_STAGE_TRAINING: return "TRAINING";
    case KSM_STAGE_BLENDING: return "BLENDING";
    case KSM_STAGE_HOLDING: return "HOLDING";
    case KSM_STAGE_FOSSILIZED: return "FOSSILIZED";
    case KSM_STAGE_PRUNED: return "PRUNED";
    case KSM_STAGE_EMBARGOED: return "EMBARGOED";
    case KSM_STAGE_RESETTING: return "RESETTING";
    }
    return "UNKNOWN";
}

bool ksm_stage_valid(int value)
{
    return (value >= KSM_STAGE_UNKNOWN && value <= KSM_STAGE_BLENDING) ||
           (value >= KSM_STAGE_HOLDING && value <= KSM_STAGE_RESETTING);
}

const char *ksm_alpha_mode_name(enum ksm_alpha_mode m)
{
    switch (m) {
    case KSM_ALPHA_HOLD: return "HOLD";
    case KSM_ALPHA_UP: return "UP";
    case KSM_ALPHA_DOWN: return "DOWN";
    }
    return "UNKNOWN";
}

const char *ksm_alpha_curve_name(enum ksm_alpha_curve c)
{
    switch (c) {
    case KSM_CURVE_UNSPECIFIED: return "UNSPECIFIED";
    case KSM_CURVE_LINEAR: return "LINEAR";
    case KSM_CURVE_COSINE: return "COSINE";
    case KSM_CURVE_SIGMOID: return "SIGMOID";
    }
    return "UNKNOWN";
}

const char *ksm_alpha_algorithm_name(enum ksm_alpha_algorithm a)
{
    switch (a) {
    case KSM_ALGO_UNSPECIFIED: return "UNSPECIFIED";
    case KSM_ALGO_ADD: return "ADD";
    case KSM_ALGO_MULTIPLY: return "MULTIPLY";
    case KSM_ALGO_GATE: return "GATE";
    }
    return "UNKNOWN";
}

const char *ksm_gate_level_name(enum ksm_gate_level g)
{
    switch (g) {
    case KSM_GATE_G0: return "G0";
    case KSM_GATE_G1: return "G1";
    case KSM_GATE_G2: return "G2";
    case KSM_GATE_G3: return "G3";
    case KSM_GATE_G5: return "G5";
    }
    return "UNKNOWN";
}

const char *ksm_lifecycle_type_name(enum ksm_lifecycle_type t)
{
    switch (t) {
    case KSM_EV_SEED_GERMINATED: return "SEED_GERMINATED";
    case KSM_EV_SEED_GATE_EVALUATED: return "SEED_GATE_EVALUATED";
    case KSM_EV_SEED_STAGE_CHANGED: return "SEED_STAGE_CHANGED";
    case KSM_EV_SEED_FOSSILIZED: return "SEED_FOSSILIZED";
    case KSM_EV_SEED_PRUNED: return "SEED_PRUNED";
    case KSM_EV_COUNT: break;
    }
    return "UNKNOWN";
}

const char *ksm_topology_name(enum ksm_topology t)
{
    switch (t) {
    case KSM_TOPOLOGY_CNN: return "cnn";
    case KSM_TOPOLOGY_TRANSFORMER: return "transformer";
    case KSM_TOPOLOGY_UNSPECIFIED: break;
    }
    return "unspecified";
}
