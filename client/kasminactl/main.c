/*
 * kasminactl: the command line of kasminad. Every RPC of kasmina.v1 is a subcommand; output is
 * an aligned table by default and JSON with --json; the exit code tells the status class.
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

enum {
    O_JSON = 1000,
    O_HELP,
    O_SOCKET,
    O_ADDR,
    O_DEADLINE,
    O_TOKEN,
    O_WAIT,
    O_VERSION,
    O_TOKEN_FILE,
    O_TLS,
    O_TLS_CA,
    O_TLS_CERT,
    O_TLS_KEY
};

const struct option ctl_common_options[] = {
    {"json", no_argument, NULL, O_JSON},
    {"help", no_argument, NULL, O_HELP},
    {"socket", required_argument, NULL, O_SOCKET},
    {"addr", required_argument, NULL, O_ADDR},
    {"deadline", required_argument, NULL, O_DEADLINE},
    {"token", required_argument, NULL, O_TOKEN},
    {"token-file", required_argument, NULL, O_TOKEN_FILE},
    {"tls", no_argument, NULL, O_TLS},
    {"tls-ca", required_argument, NULL, O_TLS_CA},
    {"tls-cert", required_argument, NULL, O_TLS_CERT},
    {"tls-key", required_argument, NULL, O_TLS_KEY},
    {"wait", no_argument, NULL, O_WAIT},
    {"version", no_argument, NULL, O_VERSION},
    {NULL, 0, NULL, 0},
};

static void print_help(FILE *f)
{
    fprintf(f, "usage: kasminactl [options] COMMAND [args] [options]\n"
               "\n"
               "Drives kasminad over gRPC (kasmina.v1). 'kasminactl COMMAND --help' describes a "
               "command.\n"
               "\n"
               "Commands:\n");
    for (size_t i = 0; i < ctl_n_cmds; i++)
        fprintf(f, "  %-18s %s\n", ctl_cmds[i].name, ctl_cmds[i].summary);
    fprintf(f, "\n"
               "Options (before or after the command):\n"
               "  --socket PATH      the daemon's Unix socket\n"
               "  --addr ADDR        a gRPC target: unix:/path, host:port (env KASMINA_ADDR);\n"
               "                     default: unix:$XDG_RUNTIME_DIR/kasmina/kasminad.sock, or\n"
               "                     unix:/run/kasmina/kasminad.sock for root\n"
               "  --deadline MS      per-call deadline in milliseconds (default 30000)\n"
               "  --token TOKEN      bearer token (env KASMINA_TOKEN)\n"
               "  --token-file PATH  read the bearer token from PATH (env KASMINA_TOKEN_FILE)\n"
               "  --tls              use TLS on a TCP target (gRPC's default roots)\n"
               "  --tls-ca PATH      use TLS; trust the server certificate's CA in PATH (PEM)\n"
               "  --tls-cert PATH    use TLS with this client certificate (PEM; with --tls-key)\n"
               "  --tls-key PATH     the client certificate's private key (PEM)\n"
               "  --wait             wait for the daemon to come up (up to the deadline)\n"
               "  --json             JSON output for scripts (events: one object per line)\n"
               "  --help             this text; COMMAND --help: the command's\n"
               "  --version          print the version\n"
               "\n"
               "Exit codes:\n"
               "  0  ok\n"
               "  1  other error (I/O, internal, unknown)\n"
               "  2  usage: bad command line\n"
               "  3  invalid argument (INVALID_ARGUMENT, OUT_OF_RANGE)\n"
               "  4  not found (NOT_FOUND)\n"
               "  5  failed precondition (FAILED_PRECONDITION, ALREADY_EXISTS, ABORTED)\n"
               "  6  unavailable (UNAVAILABLE, DEADLINE_EXCEEDED; health: not serving)\n"
               "  7  resource exhausted (RESOURCE_EXHAUSTED)\n"
               "  8  authentication (UNAUTHENTICATED, PERMISSION_DENIED)\n");
}

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
    case O_JSON: x->json = true; return 1;
    case O_SOCKET: x->socket = arg; return 1;
    case O_ADDR: x->addr = arg; return 1;
    case O_TOKEN: x->opts.bearer_token = arg; return 1;
    case O_TOKEN_FILE: x->token_file = arg; return 1;
    case O_TLS: x->opts.tls = true; return 1;
    case O_TLS_CA:
        x->opts.tls = true;
        x->opts.tls_ca_file = arg;
        return 1;
    case O_TLS_CERT:
        x->opts.tls = true;
        x->opts.tls_cert_file = arg;
        return 1;
    case O_TLS_KEY:
        x->opts.tls = true;
        x->opts.tls_key_file = arg;
        return 1;
    case O_WAIT: x->opts.wait_for_ready = true; return 1;
    case O_DEADLINE:
        if (ctl_parse_u32("--deadline", arg, &x->opts.deadline_ms, e, sizeof e) ||
            x->opts.deadline_ms == 0) {
            *exit_code =
                ctl_usage_error(x, "--deadline must be a positive number of ms, got '%s'", arg);
            return CTL_OPT_EXIT;
        }
        return 1;
    case O_VERSION:
        printf("kasminactl %s\n", KSM_VERSION);
        *exit_code = 0;
        return CTL_OPT_EXIT;
    default: return 0;
    }
}

int ctl_next_opt(struct ctl *x, int argc, char **argv, const struct option *cmd_opts,
                 int *exit_code)
{
    struct option all[64];
    size_t n = 0;
    for (const struct option *o = cmd_opts; o && o->name && n < 40; o++) all[n++] = *o;
    for (const struct option *o = ctl_common_options; o->name; o++) all[n++] = *o;
    memset(&all[n], 0, sizeof all[n]);
    for (;;) {
        /* "-" first: non-options are returned as 1 with optarg, so they may sit anywhere. */
        int opt = getopt_long(argc, argv, "-", all, NULL);
        if (opt == -1) return -1;
        if (opt == '?') {
            *exit_code = ctl_usage_error(x, "bad option");
            return CTL_OPT_EXIT;
        }
        if (opt == O_HELP) {
            printf("usage: %s %s\n", x->prog, x->usage);
            *exit_code = 0;
            return CTL_OPT_EXIT;
        }
        int r = ctl_common_opt(x, opt, optarg, exit_code);
        if (r == CTL_OPT_EXIT) return CTL_OPT_EXIT;
        if (r == 1) continue;
        return opt;
    }
}

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

int main(int argc, char **argv)
{
    struct ctl x = {.prog = "kasminactl"};
    int exit_code = 0;
    /* Global options before the command ("+": stop at the first non-option). */
    for (;;) {
        int opt = getopt_long(argc, argv, "+", ctl_common_options, NULL);
        if (opt == -1) break;
        if (opt == '?') return ctl_usage_error(&x, "bad option");
        if (opt == O_HELP) {
            print_help(stdout);
            return 0;
        }
        int r = ctl_common_opt(&x, opt, optarg, &exit_code);
        if (r == CTL_OPT_EXIT) return exit_code;
    }
    if (optind >= argc) {
        print_help(stderr);
        return CTL_EXIT_USAGE;
    }
    const char *name = argv[optind];
    if (!strcmp(name, "help")) {
        print_help(stdout);
        return 0;
    }
    const struct ctl_cmd *cmd = NULL;
    for (size_t i = 0; i < ctl_n_cmds; i++)
        if (!strcmp(ctl_cmds[i].name, name)) cmd = &ctl_cmds[i];
    if (!cmd) return ctl_usage_error(&x, "unknown command '%s'", name);
    x.cmd = cmd->name;
    x.usage = cmd->usage;
    /* The command parses argv from its own name on. */
    int cargc = argc - optind;
    char **cargv = argv + optind;
    optind = 0; /* re-initialise getopt */
    int rc = cmd->run(&x, cargc, cargv);
    ksm_client_close(x.client);
    return rc;
}
