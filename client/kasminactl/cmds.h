/*
 * kasminactl: the shared state of one invocation and the subcommand table (cmds.c).
 */
#pragma once

#include <getopt.h>
#include <stdbool.h>

#include "ctl.h"
#include "kasmina/client.h"

struct ctl {
    const char *prog;  /* "kasminactl" */
    const char *cmd;   /* the subcommand's name */
    const char *usage; /* the subcommand's --help text */
    bool json;
    const char *socket, *addr;
    char target[512];
    struct ksm_client_options opts;
    ksm_client *client; /* connected by ctl_connect() */
    struct ksm_client_error err;
    const char *token_file; /* --token-file: read at connect time */
    char token[4096];
};

struct ctl_cmd {
    const char *name;
    int (*run)(struct ctl *x, int argc, char **argv);
    const char *summary;
    const char *usage; /* synopsis and options, printed by --help */
};

extern const struct ctl_cmd ctl_cmds[];

/* kasminactl top (top.c): the live terminal view. */
int ctl_cmd_top(struct ctl *x, int argc, char **argv);
extern const size_t ctl_n_cmds;

/* Common options every subcommand accepts (--json, --help, --socket, --addr, --deadline, --token,
 * --wait). Returns the next subcommand-specific option (getopt_long values of cmd_opts), -1 when
 * done, or CTL_OPT_EXIT with *exit_code set (--help: 0, a bad option: 2). */
#define CTL_OPT_EXIT (-2)
int ctl_next_opt(struct ctl *x, int argc, char **argv, const struct option *cmd_opts,
                 int *exit_code);
/* Parses a common option (for the global position before the subcommand). Returns 1 when opt
 * was one, 0 when not, CTL_OPT_EXIT on a bad value. */
int ctl_common_opt(struct ctl *x, int opt, const char *arg, int *exit_code);
extern const struct option ctl_common_options[];

/* Prints "kasminactl CMD: msg" and the --help hint to stderr; returns CTL_EXIT_USAGE. */
int ctl_usage_error(struct ctl *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Connects (once). Returns 0 or an exit code. */
int ctl_connect(struct ctl *x);
/* Reports x->err of a failed call (stderr; and a JSON error object on stdout with --json);
 * returns the exit code of its status class. */
int ctl_call_failed(struct ctl *x);
