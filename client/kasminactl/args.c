/*
 * kasminactl value parsers: every one names the option in its error sentence.
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ctl.h"
#include "kasmina/client.h"
#include "kasmina/errors.h"

int ctl_exit_code(int grpc_status)
{
    switch (grpc_status) {
    case 0: return CTL_EXIT_OK;
    case 3: /* INVALID_ARGUMENT */
    case 11: /* OUT_OF_RANGE */ return CTL_EXIT_INVALID;
    case 5: /* NOT_FOUND */ return CTL_EXIT_NOT_FOUND;
    case 9: /* FAILED_PRECONDITION */
    case 6: /* ALREADY_EXISTS */
    case 10: /* ABORTED */ return CTL_EXIT_PRECONDITION;
    case 14: /* UNAVAILABLE */
    case 4: /* DEADLINE_EXCEEDED */ return CTL_EXIT_UNAVAILABLE;
    case 8: /* RESOURCE_EXHAUSTED */ return CTL_EXIT_EXHAUSTED;
    case 16: /* UNAUTHENTICATED */
    case 7: /* PERMISSION_DENIED */ return CTL_EXIT_AUTH;
    default: return CTL_EXIT_OTHER;
    }
}

static int bad(char *err, size_t errlen, const char *opt, const char *what, const char *s)
{
    if (err && errlen) snprintf(err, errlen, "%s must be %s, got '%s'", opt, what, s ? s : "");
    return KSM_EINVAL;
}

int ctl_parse_u64(const char *opt, const char *s, uint64_t *out, char *err, size_t errlen)
{
    if (!s || !*s || *s == '-' || isspace((unsigned char)*s))
        return bad(err, errlen, opt, "a non-negative integer", s);
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end) return bad(err, errlen, opt, "a non-negative integer", s);
    *out = v;
    return 0;
}

int ctl_parse_u32(const char *opt, const char *s, uint32_t *out, char *err, size_t errlen)
{
    uint64_t v;
    if (ctl_parse_u64(opt, s, &v, NULL, 0) || v > UINT32_MAX)
        return bad(err, errlen, opt, "an integer in [0, 4294967295]", s);
    *out = (uint32_t)v;
    return 0;
}

int ctl_parse_double(const char *opt, const char *s, double *out, char *err, size_t errlen)
{
    if (!s || !*s || isspace((unsigned char)*s)) return bad(err, errlen, opt, "a number", s);
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno == ERANGE || *end || !isfinite(v)) return bad(err, errlen, opt, "a finite number", s);
    *out = v;
    return 0;
}

int ctl_parse_bool(const char *opt, const char *s, bool *out, char *err, size_t errlen)
{
    static const char *const yes[] = {"true", "yes", "on", "1"}, *const no[] = {"false", "no",
                                                                                "off", "0"};
    for (int i = 0; s && i < 4; i++) {
        if (!strcasecmp(s, yes[i])) return *out = true, 0;
        if (!strcasecmp(s, no[i])) return *out = false, 0;
    }
    return bad(err, errlen, opt, "true or false", s);
}

int ctl_parse_stage(const char *opt, const char *s, enum ksm_stage *out, char *err, size_t errlen)
{
    if (!s || !*s) return bad(err, errlen, opt, "a stage name", s);
    if (!strcasecmp(s, "next")) return *out = KSM_STAGE_UNKNOWN, 0;
    const char *name = !strncasecmp(s, "STAGE_", 6) ? s + 6 : s;
    for (int v = 0; v <= KSM_STAGE_RESETTING; v++)
        if (ksm_stage_valid(v) && !strcasecmp(name, ksm_stage_name((enum ksm_stage)v)))
            return *out = (enum ksm_stage)v, 0;
    uint32_t n;
    if (ctl_parse_u32(opt, s, &n, NULL, 0) == 0 && ksm_stage_valid((int)n))
        return *out = (enum ksm_stage)n, 0;
    return bad(err, errlen, opt,
               "a stage (next, germinated, training, blending, holding, fossilized, pruned, "
               "embargoed, resetting, dormant)",
               s);
}

int ctl_parse_curve(const char *opt, const char *s, enum ksm_alpha_curve *out, char *err,
                    size_t errlen)
{
    static const struct {
        const char *n;
        enum ksm_alpha_curve v;
    } t[] = {
        {"linear", KSM_CURVE_LINEAR}, {"cosine", KSM_CURVE_COSINE}, {"sigmoid", KSM_CURVE_SIGMOID}};
    for (size_t i = 0; s && i < 3; i++)
        if (!strcasecmp(s, t[i].n)) return *out = t[i].v, 0;
    return bad(err, errlen, opt, "linear, cosine or sigmoid", s);
}

int ctl_parse_algorithm(const char *opt, const char *s, enum ksm_alpha_algorithm *out, char *err,
                        size_t errlen)
{
    static const struct {
        const char *n;
        enum ksm_alpha_algorithm v;
    } t[] = {{"add", KSM_ALGO_ADD}, {"multiply", KSM_ALGO_MULTIPLY}, {"gate", KSM_ALGO_GATE}};
    for (size_t i = 0; s && i < 3; i++)
        if (!strcasecmp(s, t[i].n)) return *out = t[i].v, 0;
    return bad(err, errlen, opt, "add, multiply or gate", s);
}

int ctl_parse_dtype(const char *opt, const char *s, enum ksm_dtype *out, char *err, size_t errlen)
{
    for (int d = 0; s && d < KSM_DTYPE_COUNT; d++)
        if (!strcasecmp(s, ksm_dtype_name((enum ksm_dtype)d))) return *out = (enum ksm_dtype)d, 0;
    return bad(err, errlen, opt, "f32, f16, bf16, i64 or i32", s);
}

int ctl_parse_gates(const char *opt, const char *s, unsigned *out, char *err, size_t errlen)
{
    if (!s) return bad(err, errlen, opt, "a list of gates like G1,G2,G3", s);
    unsigned bits = 0;
    const char *p = s;
    while (*p) {
        size_t n = strcspn(p, ",");
        char tok[8];
        if (n == 0 || n >= sizeof tok)
            return bad(err, errlen, opt, "a list of gates like G1,G2,G3", s);
        memcpy(tok, p, n);
        tok[n] = '\0';
        const char *d = (tok[0] == 'G' || tok[0] == 'g') ? tok + 1 : tok;
        if (strlen(d) != 1 || !strchr("0123", d[0]))
            return bad(err, errlen, opt, "a list of gates G0..G3", s);
        bits |= 1u << (d[0] - '0');
        p += n;
        if (*p == ',') p++;
    }
    *out = bits;
    return 0;
}

int ctl_parse_floats(const char *opt, const char *s, float **out, size_t *n, char *err,
                     size_t errlen)
{
    *out = NULL;
    *n = 0;
    if (!s || !*s) return bad(err, errlen, opt, "a comma list of numbers", s);
    size_t cap = 1;
    for (const char *p = s; *p; p++) cap += *p == ',';
    float *v = malloc(cap * sizeof *v);
    if (!v) return KSM_ENOMEM;
    const char *p = s;
    size_t k = 0;
    for (;;) {
        size_t l = strcspn(p, ",");
        char tok[64];
        double d;
        if (l == 0 || l >= sizeof tok) goto out_bad;
        memcpy(tok, p, l);
        tok[l] = '\0';
        if (ctl_parse_double(opt, tok, &d, NULL, 0)) goto out_bad;
        v[k++] = (float)d;
        p += l;
        if (!*p) break;
        p++;
    }
    *out = v;
    *n = k;
    return 0;
out_bad:
    free(v);
    return bad(err, errlen, opt, "a comma list of finite numbers", s);
}

int ctl_parse_alpha_config(const char *opt, const char *s, struct ksm_alpha_config *out, char *err,
                           size_t errlen)
{
    memset(out, 0, sizeof *out);
    const char *what = "NAME or NAME:SLOT=ALPHA[,SLOT=ALPHA...]";
    if (!s || !*s || *s == ':') return bad(err, errlen, opt, what, s);
    const char *colon = strchr(s, ':');
    size_t nl = colon ? (size_t)(colon - s) : strlen(s);
    char *name = strndup(s, nl);
    if (!name) return KSM_ENOMEM;
    out->name = name;
    if (!colon) return 0;
    const char *p = colon + 1;
    size_t cap = 1;
    for (const char *q = p; *q; q++) cap += *q == ',';
    char **ids = calloc(cap, sizeof *ids);
    float *alpha = calloc(cap, sizeof *alpha);
    out->slot_ids = (const char *const *)ids;
    out->alpha = alpha;
    if (!ids || !alpha) {
        ctl_alpha_config_free(out);
        return KSM_ENOMEM;
    }
    for (;;) {
        size_t l = strcspn(p, ",");
        const char *eq = memchr(p, '=', l);
        if (!eq || eq == p) goto out_bad;
        char num[64];
        size_t vl = l - (size_t)(eq + 1 - p);
        double a;
        if (vl == 0 || vl >= sizeof num) goto out_bad;
        memcpy(num, eq + 1, vl);
        num[vl] = '\0';
        if (ctl_parse_double(opt, num, &a, NULL, 0)) goto out_bad;
        ids[out->n] = strndup(p, (size_t)(eq - p));
        alpha[out->n] = (float)a;
        out->n++;
        p += l;
        if (!*p) break;
        p++;
    }
    return 0;
out_bad:
    ctl_alpha_config_free(out);
    return bad(err, errlen, opt, what, s);
}

void ctl_alpha_config_free(struct ksm_alpha_config *c)
{
    if (!c) return;
    if (c->slot_ids)
        for (size_t i = 0; i < c->n; i++) free((void *)c->slot_ids[i]);
    free((void *)c->slot_ids);
    free((void *)c->alpha);
    free((void *)c->name);
    memset(c, 0, sizeof *c);
}

int ctl_parse_override(const char *opt, const char *s, struct ksm_alpha_override *out, char *err,
                       size_t errlen)
{
    memset(out, 0, sizeof *out);
    const char *eq = s ? strchr(s, '=') : NULL;
    if (!eq || eq == s) return bad(err, errlen, opt, "SLOT=ALPHA[,ALPHA...]", s);
    float *v;
    size_t n;
    if (ctl_parse_floats(opt, eq + 1, &v, &n, NULL, 0))
        return bad(err, errlen, opt, "SLOT=ALPHA[,ALPHA...] with finite alphas", s);
    out->slot_id = strndup(s, (size_t)(eq - s));
    out->alpha = v;
    out->n = n;
    return 0;
}

void ctl_alpha_override_free(struct ksm_alpha_override *o)
{
    if (!o) return;
    free((void *)o->slot_id);
    free((void *)o->alpha);
    memset(o, 0, sizeof *o);
}

int ctl_parse_tensor_ref(const char *opt, const char *s, char **file, const char **tensor,
                         char *err, size_t errlen)
{
    *file = NULL;
    *tensor = NULL;
    if (!s || !*s) return bad(err, errlen, opt, "FILE[:TENSOR]", s);
    char *f = strdup(s);
    if (!f) return KSM_ENOMEM;
    char *colon = strrchr(f, ':');
    /* "x.safetensors:input" names a tensor; a colon inside a directory name does not. */
    if (colon && !strchr(colon, '/')) {
        *colon = '\0';
        if (colon[1]) *tensor = colon + 1;
        if (!*f) {
            free(f);
            return bad(err, errlen, opt, "FILE[:TENSOR]", s);
        }
    }
    *file = f;
    return 0;
}

const char *ctl_resolve_target(const char *socket, const char *addr, char *buf, size_t len)
{
    if (socket && *socket) {
        snprintf(buf, len, "unix:%s", socket);
        return buf;
    }
    if (!addr || !*addr) addr = getenv("KASMINA_ADDR");
    if (!addr || !*addr) return ksm_client_default_target(buf, len);
    if (addr[0] == '/' || (addr[0] == '.' && strchr(addr, '/')))
        snprintf(buf, len, "unix:%s", addr);
    else
        snprintf(buf, len, "%s", addr);
    return buf;
}
