/* service/advice: sentences about accepted requests (advice.h). */
#include "service/advice.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void ksm_advice_add(struct ksm_advice *a, enum ksm_log_level level, const char *fmt, ...)
{
    if (a == NULL || a->n < 0 || a->n >= KSM_ADVICE_MAX) return;
    char *t = a->item[a->n].text;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t, KSM_ADVICE_LEN, fmt, ap);
    va_end(ap);
    /* gRPC metadata values are printable ASCII; so are log lines that collectors split. */
    for (char *p = t; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e) *p = '?';
    a->item[a->n].level = level;
    a->n++;
}

void ksm_advise_metrics(const struct ksm_metrics_update *u, struct ksm_advice *a)
{
    if (u->has_val_accuracy && u->val_accuracy > 0.0 && u->val_accuracy <= 1.0)
        ksm_advice_add(a, KSM_LOG_WARN,
                       "val_accuracy %g looks like a fraction: RecordMetrics takes a percentage "
                       "(0-100), so it was recorded as %g %%; send %g for a fraction of %g.",
                       u->val_accuracy, u->val_accuracy, u->val_accuracy * 100.0, u->val_accuracy);
}

/* Appends "name=value" for a field given as 0 to the list in buf. */
static void took(char *buf, size_t cap, uint32_t given, const char *name, uint32_t value)
{
    if (given != 0) return;
    size_t n = strlen(buf);
    if (n < cap) snprintf(buf + n, cap - n, "%s%s=%u", n ? ", " : "", name, value);
}

void ksm_advise_model_created(const struct ksm_model_spec *spec, const struct ksm_model_info *info,
                              struct ksm_advice *a)
{
    char list[180] = "";
    bool any_set;
    const char *host;
    if (info->topology == KSM_TOPOLOGY_TRANSFORMER) {
        const struct ksm_transformer_spec *g = &spec->transformer, *t = &info->transformer;
        host = "transformer";
        any_set = g->vocab_size || g->n_embd || g->n_head || g->n_layer || g->block_size ||
                  g->num_segments;
        took(list, sizeof list, g->vocab_size, "vocab_size", t->vocab_size);
        took(list, sizeof list, g->n_embd, "n_embd", t->n_embd);
        took(list, sizeof list, g->n_head, "n_head", t->n_head);
        took(list, sizeof list, g->n_layer, "n_layer", t->n_layer);
        took(list, sizeof list, g->block_size, "block_size", t->block_size);
        took(list, sizeof list, g->num_segments, "num_segments", t->num_segments);
    } else {
        const struct ksm_cnn_spec *g = &spec->cnn, *c = &info->cnn;
        host = "cnn";
        any_set = g->num_classes || g->n_blocks || g->base_channels || g->kernel_size ||
                  g->in_channels || spec->pool_layers_set;
        took(list, sizeof list, g->num_classes, "num_classes", c->num_classes);
        took(list, sizeof list, g->n_blocks, "n_blocks", c->n_blocks);
        took(list, sizeof list, g->base_channels, "base_channels", c->base_channels);
        took(list, sizeof list, g->kernel_size, "kernel_size", c->kernel_size);
        took(list, sizeof list, g->in_channels, "in_channels", c->in_channels);
    }
    if (any_set && list[0] != '\0')
        ksm_advice_add(a, KSM_LOG_INFO,
                       "host.%s fields sent as 0 mean \"default\"; model '%s' took %s.", host,
                       info->model_id, list);
}
