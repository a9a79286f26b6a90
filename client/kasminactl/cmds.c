/*
 * kasminactl: the subcommand list, the common options, and the walker of the option tables:
 * argv to an argument struct (getopt_long), usage errors, --help text. Also the connection
 * every subcommand shares.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmds.h"

#ifndef KSM_VERSION
#define KSM_VERSION "0.0.0"
#endif

// ---- The subcommands ----

const struct ctl_cmd *const ctl_cmds[] = {
    &ctl_cmd_info,
    &ctl_cmd_health,
    &ctl_cmd_models,
    &ctl_cmd_create,
    &ctl_cmd_delete,
    &ctl_cmd_germinate,
    &ctl_cmd_advance,
    &ctl_cmd_prune,
    &ctl_cmd_schedule_prune,
    &ctl_cmd_set_alpha,
    &ctl_cmd_set_alpha_target,
    &ctl_cmd_step,
    &ctl_cmd_metrics,
    &ctl_cmd_slots,
    &ctl_cmd_configure_slot,
    &ctl_cmd_forward,
    &ctl_cmd_fused_forward,
    &ctl_cmd_evaluate,
    &ctl_cmd_train,
    &ctl_cmd_training,
    &ctl_cmd_checkpoint,
    &ctl_cmd_load_weights,
    &ctl_cmd_export_weights,
    &ctl_cmd_move,
    &ctl_cmd_stats,
    &ctl_cmd_empty_cache,
    &ctl_cmd_events,
    &ctl_cmd_top,
};
const size_t ctl_n_cmds = sizeof ctl_cmds / sizeof ctl_cmds[0];

const struct ctl_cmd *ctl_cmd_find(const char *name)
{
    for (size_t i = 0; i < ctl_n_cmds; i++)
        if (!strcmp(ctl_cmds[i]->name, name)) return ctl_cmds[i];
    return NULL;
}

// ---- Common options ----

const struct option ctl_common_options[] = {
    {"json", no_argument, NULL, CTL_O_JSON},
    {"help", no_argument, NULL, CTL_O_HELP},
    {"socket", required_argument, NULL, CTL_O_SOCKET},
    {"addr", required_argument, NULL, CTL_O_ADDR},
    {"deadline", required_argument, NULL, CTL_O_DEADLINE},
    {"token", required_argument, NULL, CTL_O_TOKEN},
    {"token-file", required_argument, NULL, CTL_O_TOKEN_FILE},
    {"tls", no_argument, NULL, CTL_O_TLS},
    {"tls-ca", required_argument, NULL, CTL_O_TLS_CA},
    {"tls-cert", required_argument, NULL, CTL_O_TLS_CERT},
    {"tls-key", required_argument, NULL, CTL_O_TLS_KEY},
    {"wait", no_argument, NULL, CTL_O_WAIT},
    {"max-message-bytes", required_argument, NULL, CTL_O_MAX_MESSAGE},
    {"version", no_argument, NULL, CTL_O_VERSION},
    {NULL, 0, NULL, 0},
};
#define N_COMMON (sizeof ctl_common_options / sizeof ctl_common_options[0] - 1)

int ctl_usage_error(struct ctl *x, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s%s%s: ", x->prog, x->cmd ? " " : "", x->cmd ? x->cmd : "");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry '%s %s%s--help'.\n", x->prog, x->cmd ? x->cmd : "", x->cmd ? " " : "");
    return CTL_EXIT_USAGE;
}

int ctl_common_opt(struct ctl *x, int opt, const char *arg, int *exit_code)
{
    char e[256];
    switch (opt) {
    case CTL_O_JSON: x->json = true; return 1;
    case CTL_O_SOCKET: x->socket = arg; return 1;
    case CTL_O_ADDR: x->addr = arg; return 1;
    case CTL_O_TOKEN: x->opts.bearer_token = arg; return 1;
    case CTL_O_TOKEN_FILE: x->token_file = arg; return 1;
    case CTL_O_TLS: x->opts.tls = true; return 1;
    case CTL_O_TLS_CA:
        x->opts.tls = true;
        x->opts.tls_ca_file = arg;
        return 1;
    case CTL_O_TLS_CERT:
        x->opts.tls = true;
        x->opts.tls_cert_file = arg;
        return 1;
    case CTL_O_TLS_KEY:
        x->opts.tls = true;
        x->opts.tls_key_file = arg;
        return 1;
    case CTL_O_WAIT: x->opts.wait_for_ready = true; return 1;
    case CTL_O_DEADLINE:
        if (ctl_parse_u32("--deadline", arg, &x->opts.deadline_ms, e, sizeof e) ||
            x->opts.deadline_ms == 0) {
            *exit_code =
                ctl_usage_error(x, "--deadline must be a positive number of ms, got '%s'", arg);
            return CTL_OPT_EXIT;
        }
        return 1;
    case CTL_O_MAX_MESSAGE: {
        uint64_t v = 0;
        char *end = NULL;
        unsigned long long n = arg && *arg != '-' ? strtoull(arg, &end, 10) : 0;
        uint64_t mul = end && (*end == 'K' || *end == 'k')   ? 1u << 10
                       : end && (*end == 'M' || *end == 'm') ? 1u << 20
                       : end && (*end == 'G' || *end == 'g') ? 1u << 30
                                                             : 1;
        if (end && mul > 1) end++;
        v = (uint64_t)n * mul;
        if (!end || end == arg || *end != '\0' || n == 0 || v > 2147483647u) {
            *exit_code = ctl_usage_error(
                x,
                "--max-message-bytes must be a byte count in [1, 2147483647] (K, M, G "
                "suffixes), got '%s'",
                arg ? arg : "");
            return CTL_OPT_EXIT;
        }
        x->opts.max_message_bytes = (size_t)v;
        return 1;
    }
    case CTL_O_VERSION:
        printf("kasminactl %s\n", KSM_VERSION);
        *exit_code = 0;
        return CTL_OPT_EXIT;
    default: return 0;
    }
}

// ---- The table walker ----

/* getopt_long values of a command's rows: OPT_ROW + index (above the common options'). */
enum { OPT_ROW = 2000 };

/* Converts arg for row o and stores it in args. Returns 0 or KSM_EINVAL with err set. */
static int opt_apply(const struct ctl_opt *o, void *args, const char *arg, char *err, size_t errlen)
{
    char name[64];
    snprintf(name, sizeof name, "--%s", o->name);
    void *field = (char *)args + o->offset;
    int rc = 0;
    switch (o->kind) {
    case CTL_ARG_FLAG: *(bool *)field = true; break;
    case CTL_ARG_STRING: *(const char **)field = arg; break;
    case CTL_ARG_U32: rc = ctl_parse_u32(name, arg, field, err, errlen); break;
    case CTL_ARG_U64: rc = ctl_parse_u64(name, arg, field, err, errlen); break;
    case CTL_ARG_DOUBLE: rc = ctl_parse_double(name, arg, field, err, errlen); break;
    case CTL_ARG_BOOL: rc = ctl_parse_bool(name, arg, field, err, errlen); break;
    case CTL_ARG_STAGE: rc = ctl_parse_stage(name, arg, field, err, errlen); break;
    case CTL_ARG_CURVE: rc = ctl_parse_curve(name, arg, field, err, errlen); break;
    case CTL_ARG_ALGORITHM: rc = ctl_parse_algorithm(name, arg, field, err, errlen); break;
    case CTL_ARG_DTYPE: rc = ctl_parse_dtype(name, arg, field, err, errlen); break;
    case CTL_ARG_GATES: rc = ctl_parse_gates(name, arg, field, err, errlen); break;
    case CTL_ARG_SETTER: rc = o->set(args, name, arg, err, errlen); break;
    }
    if (rc == 0 && o->given) *(bool *)((char *)args + o->given) = true;
    return rc;
}

bool ctl_cmd_parse(struct ctl *x, const struct ctl_cmd *c, int argc, char **argv, void *args,
                   int *exit_code)
{
    /* The command's rows first, then the common options (the order getopt_long lists
     * candidates of an ambiguous abbreviation in). */
    struct option all[CTL_MAX_OPTS + N_COMMON + 1];
    size_t n = 0;
    for (const struct ctl_opt *o = c->opts; o && o->name && n < CTL_MAX_OPTS; o++, n++)
        all[n] = (struct option){o->name, o->metavar ? required_argument : no_argument, NULL,
                                 OPT_ROW + (int)n};
    for (const struct option *o = ctl_common_options; o->name; o++) all[n++] = *o;
    memset(&all[n], 0, sizeof all[n]);

    struct ctl_pos *pos = args;
    x->cmd = c->name;
    *exit_code = 0;
    optind = 0; /* 0, not 1: GNU getopt then also forgets what a previous parse left */
    for (;;) {
        /* "-" first: non-options come back as 1 with optarg, so they may sit anywhere. */
        int opt = getopt_long(argc, argv, "-", all, NULL);
        if (opt == -1) break;
        if (opt == '?') {
            *exit_code = ctl_usage_error(x, "bad option");
            return false;
        }
        if (opt == CTL_O_HELP) {
            ctl_cmd_usage(x, c, stdout);
            return false;
        }
        if (opt == 1) {
            if (pos->n == CTL_MAX_POS) {
                *exit_code = ctl_usage_error(x, "too many arguments");
                return false;
            }
            pos->v[pos->n++] = optarg;
            continue;
        }
        if (opt >= OPT_ROW) {
            char e[256];
            if (opt_apply(&c->opts[opt - OPT_ROW], args, optarg, e, sizeof e) != 0) {
                *exit_code = ctl_usage_error(x, "%s", e);
                return false;
            }
            continue;
        }
        if (ctl_common_opt(x, opt, optarg, exit_code) == CTL_OPT_EXIT) return false;
    }
    if (pos->n < c->min_pos) {
        *exit_code = ctl_usage_error(x, "missing argument(s): %s", c->positionals);
        return false;
    }
    if (pos->n > c->max_pos) {
        *exit_code = ctl_usage_error(x, "unexpected argument '%s'", pos->v[c->max_pos]);
        return false;
    }
    return true;
}

void ctl_cmd_usage(const struct ctl *x, const struct ctl_cmd *c, FILE *f)
{
    bool any = false;
    int width = 0;
    for (const struct ctl_opt *o = c->opts; o && o->name; o++) {
        if (!o->help) continue;
        int w = 2 + (int)strlen(o->name) + (o->metavar ? 1 + (int)strlen(o->metavar) : 0);
        if (w > width) width = w;
        any = true;
    }
    fprintf(f, "usage: %s %s%s%s%s\n", x->prog, c->name, c->positionals[0] ? " " : "",
            c->positionals, any ? " [options]" : "");
    for (const struct ctl_opt *o = c->opts; o && o->name; o++) {
        if (!o->help) continue;
        char left[128];
        snprintf(left, sizeof left, "--%s%s%s", o->name, o->metavar ? " " : "",
                 o->metavar ? o->metavar : "");
        fprintf(f, "  %-*s  %s\n", width, left, o->help);
    }
    if (c->notes) fprintf(f, "%s\n", c->notes);
}

int ctl_cmd_main(struct ctl *x, const struct ctl_cmd *c, int argc, char **argv)
{
    void *args = calloc(1, c->args_size);
    if (!args) return CTL_EXIT_OTHER;
    if (c->init) c->init(args);
    int rc;
    if (ctl_cmd_parse(x, c, argc, argv, args, &rc)) {
        rc = c->run(x, args);
        ctl_print_warnings(x);
    }
    if (c->fini) c->fini(args);
    free(args);
    return rc;
}

// ---- The connection ----

/* The first line of a token file, without surrounding blanks. */
static int read_token_file(struct ctl *x)
{
    FILE *f = fopen(x->token_file, "r");
    if (!f) {
        fprintf(stderr, "%s: --token-file: cannot open '%s': %s\n", x->prog, x->token_file,
                strerror(errno));
        return CTL_EXIT_USAGE;
    }
    size_t n = fread(x->token, 1, sizeof x->token - 1, f);
    fclose(f);
    x->token[n] = '\0';
    x->token[strcspn(x->token, "\r\n")] = '\0';
    n = strlen(x->token);
    while (n > 0 && isspace((unsigned char)x->token[n - 1])) x->token[--n] = '\0';
    if (n == 0) {
        fprintf(stderr, "%s: --token-file: '%s' holds no token\n", x->prog, x->token_file);
        return CTL_EXIT_USAGE;
    }
    x->opts.bearer_token = x->token;
    return 0;
}

int ctl_connect(struct ctl *x)
{
    if (x->client) return 0;
    if (!x->opts.bearer_token && !x->token_file) {
        const char *tf = getenv("KASMINA_TOKEN_FILE");
        if (tf && *tf) x->token_file = tf;
    }
    if (!x->opts.bearer_token && x->token_file) {
        int rc = read_token_file(x);
        if (rc != 0) return rc;
    }
    if (!x->opts.bearer_token) {
        const char *t = getenv("KASMINA_TOKEN");
        if (t && *t) x->opts.bearer_token = t;
    }
    ctl_resolve_target(x->socket, x->addr, x->target, sizeof x->target);
    if (ksm_client_connect(x->target, &x->opts, &x->client, &x->err) != 0) {
        fprintf(stderr, "%s: cannot use %s: %s\n", x->prog, x->target, x->err.message);
        return x->err.code == KSM_EINVAL ? CTL_EXIT_USAGE : CTL_EXIT_OTHER;
    }
    return 0;
}

void ctl_print_warnings(struct ctl *x)
{
    /* The last call's warnings (a failed call has none); each on its own line on stderr. */
    const char *w = x->err.warnings;
    if (*w) fflush(stdout); /* after the reply it is about */
    while (*w) {
        size_t n = strcspn(w, "\n");
        fprintf(stderr, "%s %s: warning: %.*s\n", x->prog, x->cmd ? x->cmd : "", (int)n, w);
        w += n;
        if (*w == '\n') w++;
    }
    x->err.warnings[0] = '\0';
}

int ctl_call_failed(struct ctl *x)
{
    const char *status = ksm_client_grpc_status_name(x->err.grpc_status);
    fprintf(stderr, "%s %s: %s (%s, %s)\n", x->prog, x->cmd, x->err.message,
            ksm_err_name(x->err.code), status);
    if (x->err.grpc_status == 14 /* UNAVAILABLE */ && x->target[0])
        fprintf(stderr, "%s: is kasminad listening on %s?\n", x->prog, x->target);
    if (x->json)
        ctl_json_print(json_pack("{s:{s:s, s:s, s:s}}", "error", "code", ksm_err_name(x->err.code),
                                 "status", status, "message", x->err.message),
                       stdout);
    int rc = ctl_exit_code(x->err.grpc_status);
    return rc == CTL_EXIT_OK ? CTL_EXIT_OTHER : rc;
}
