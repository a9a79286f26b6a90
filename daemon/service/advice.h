/*
 * service/advice: what the daemon says about a request it accepted (docs/logging.md#warnings).
 *
 * Some values pass validation and are still almost certainly not what the caller meant (a
 * RecordMetrics val_accuracy of 0.87 is 0.87 %, not 87 %), and some zero fields quietly take a
 * default (a CnnHostSpec num_classes of 0 builds a 10-class head). The service words these as
 * sentences; a front end returns them with the successful reply (gRPC: one trailing metadata
 * entry "kasmina-warning" per sentence) and logs them. Nothing here changes what a call does.
 *
 * Thread-safety: pure functions of their arguments.
 */
#pragma once

#include <stdbool.h>

#include "kasmina/kasmina.h"
#include "kasmina/log.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KSM_ADVICE_MAX 4   /* sentences kept per call; more are dropped */
#define KSM_ADVICE_LEN 240 /* bytes of one sentence, NUL included */

struct ksm_advice {
    int n;
    struct {
        /* KSM_LOG_WARN: an accepted value that looks wrong; KSM_LOG_INFO: a default taken. */
        enum ksm_log_level level;
        char text[KSM_ADVICE_LEN]; /* one sentence, printable ASCII (bytes outside become '?') */
    } item[KSM_ADVICE_MAX];
};

/* Appends one sentence (printf format); a full list drops it. */
void ksm_advice_add(struct ksm_advice *a, enum ksm_log_level level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* RecordMetrics: a val_accuracy in (0, 1] reads like a fraction where a percentage is taken
 * (0 is the same in both units and says nothing). */
void ksm_advise_metrics(const struct ksm_metrics_update *u, struct ksm_advice *a);

/* CreateModel: the host fields the request left 0 while it set others, and the values the model
 * took for them, read from the created model's info (one sentence). Nothing when every field
 * was set, or none was (an empty or absent host spec asks for every default). */
void ksm_advise_model_created(const struct ksm_model_spec *spec, const struct ksm_model_info *info,
                              struct ksm_advice *a);

#ifdef __cplusplus
}
#endif
