/*
 * AlphaController (docs/blending.md, esper K/alpha_controller.py): retarget from HOLD, one step per
 * tick, LINEAR / COSINE / SIGMOID progress curves, monotone clamping and an exact snap to the
 * target on the last tick.
 */
#include "kasmina/alpha.h"

#include <math.h>
#include <stdint.h>

#include "kasmina/errors.h"

static double clamp01(double v)
{
    /* fmin/fmax as Python's max(0, min(1, v)): NaN ends at 1 there too. */
    return fmax(0.0, fmin(1.0, v));
}

/* Overflow-safe logistic: exp only ever sees a non-positive argument. */
static double sigmoid(double x)
{
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    double z = exp(x);
    return z / (1.0 + z);
}

void ksm_alpha_init(struct ksm_alpha_controller *c, double alpha)
{
    double a = clamp01(alpha);
    *c = (struct ksm_alpha_controller){
        .alpha = a,
        .alpha_start = a,
        .alpha_target = a,
        .mode = KSM_ALPHA_HOLD,
        .curve = KSM_CURVE_LINEAR,
        .steepness = KSM_DEFAULT_STEEPNESS,
    };
}

double ksm_alpha_curve_progress(double t, enum ksm_alpha_curve curve, double steepness)
{
    t = clamp01(t);
    switch (curve) {
    case KSM_CURVE_LINEAR: return t;
    case KSM_CURVE_COSINE: return 0.5 * (1.0 - cos(M_PI * t));
    case KSM_CURVE_SIGMOID: {
        double raw = sigmoid(steepness * (t - 0.5));
        double raw0 = sigmoid(-0.5 * steepness);
        double raw1 = sigmoid(0.5 * steepness);
        if (raw1 == raw0) return t; /* steepness -> 0 */
        return (raw - raw0) / (raw1 - raw0);
    }
    case KSM_CURVE_UNSPECIFIED: break;
    }
    /* esper raises on an unknown curve; callers validate curves, so read it as LINEAR. */
    return t;
}

int ksm_alpha_retarget(struct ksm_alpha_controller *c, double target, long steps,
                       enum ksm_alpha_curve curve, double steepness)
{
    if (c->mode != KSM_ALPHA_HOLD) return KSM_ESTAGE;

    double t = clamp01(target);
    if (steps < 0) steps = 0;
    if ((unsigned long)steps > UINT32_MAX) steps = (long)UINT32_MAX;

    c->alpha_start = c->alpha;
    c->alpha_target = t;
    if (curve != KSM_CURVE_UNSPECIFIED) c->curve = curve;
    if (!isnan(steepness)) c->steepness = fmax(KSM_MIN_STEEPNESS, steepness);
    c->steps_total = (uint32_t)steps;
    c->steps_done = 0;

    if (t > c->alpha) {
        c->mode = KSM_ALPHA_UP;
    } else if (t < c->alpha) {
        c->mode = KSM_ALPHA_DOWN;
    } else {
        c->mode = KSM_ALPHA_HOLD;
        c->alpha = t;
    }
    if (steps == 0) { /* INSTANT */
        c->alpha = t;
        c->mode = KSM_ALPHA_HOLD;
    }
    return 0;
}

bool ksm_alpha_step(struct ksm_alpha_controller *c)
{
    if (c->mode == KSM_ALPHA_HOLD || c->steps_total == 0) return false;

    c->steps_done++;
    if (c->steps_done >= c->steps_total) {
        c->steps_done = c->steps_total;
        c->alpha = c->alpha_target; /* exact snap */
        c->mode = KSM_ALPHA_HOLD;
        return true;
    }

    double t = (double)c->steps_done / (double)c->steps_total;
    double p = ksm_alpha_curve_progress(t, c->curve, c->steepness);
    double a = clamp01(c->alpha_start + (c->alpha_target - c->alpha_start) * p);
    /* Monotone, no overshoot: stay between start and target. */
    if (c->mode == KSM_ALPHA_UP) {
        a = fmin(fmax(a, c->alpha_start), c->alpha_target);
    } else if (c->mode == KSM_ALPHA_DOWN) {
        a = fmax(fmin(a, c->alpha_start), c->alpha_target);
    }
    c->alpha = a;
    return false;
}
