/*
 * AlphaController (docs/blending.md): the scalar amplitude schedule of a slot. Pure math, no state
 * beyond struct ksm_alpha_controller (kasmina.h).
 */
#pragma once

#include <stdbool.h>

#include "kasmina/kasmina.h"

#define KSM_ALPHA_EPS         1e-6
#define KSM_DEFAULT_STEEPNESS 12.0
#define KSM_MIN_STEEPNESS     0.1

/* A controller at rest: alpha = start = target = clamp01(alpha), HOLD, LINEAR, steepness 12. */
void ksm_alpha_init(struct ksm_alpha_controller *c, double alpha);
/* curve_progress(t, curve, k) with t clamped to [0,1]. */
double ksm_alpha_curve_progress(double t, enum ksm_alpha_curve curve, double steepness);
/* retarget(); only from HOLD (returns KSM_ESTAGE otherwise, nothing changed). curve 0 and
 * steepness NaN keep the current ones. */
int ksm_alpha_retarget(struct ksm_alpha_controller *c, double target, long steps,
                       enum ksm_alpha_curve curve, double steepness);
/* step(); true only on the tick that snaps to the target. */
bool ksm_alpha_step(struct ksm_alpha_controller *c);
