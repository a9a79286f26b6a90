/*
 * kasminactl: the command line of kasminad. Every RPC of kasmina.v1 is a subcommand; output is
 * an aligned table by default and JSON with --json; the exit code tells the status class.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmds.h"

static void print_help(FILE *f)
{
    fprintf(f, "usage: kasminactl [options] COMMAND [args] [options]\n"
               "\n"
               "Drives kasminad over gRPC (kasmina.v1). 'kasminactl COMMAND --help' describes a "
               "command.\n"
               "\n"
               "Commands:\n");
    for (size_t i = 0; i < ctl_n_cmds; i++)
        fprintf(f, "  %-18s %s\n", ctl_cmds[i]->name, ctl_cmds[i]->summary);
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
               "  --max-message-bytes N  largest message sent or received (K, M, G; default 64M;\n"
               "                     weights beyond it stream: load-weights/export-weights)\n"
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
               "  8  authentication (UNAUTHENTICATED, PERMISSION_DENIED)\n"
               "  9  advance: the gate failed and the seed did not move (--allow-fail: 0)\n"
               "\n"
               "Warnings the daemon attaches to a successful reply (a value it accepted but that\n"
               "looks wrong, a default it took) are printed to stderr as 'warning: ...'.\n");
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
        if (opt == CTL_O_HELP) {
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
    const struct ctl_cmd *cmd = ctl_cmd_find(name);
    if (!cmd) return ctl_usage_error(&x, "unknown command '%s'", name);
    /* The command parses argv from its own name on. */
    int rc = ctl_cmd_main(&x, cmd, argc - optind, argv + optind);
    ksm_client_close(x.client);
    return rc;
}
