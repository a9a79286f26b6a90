/*
 * kasminactl: the shared state of one invocation, the subcommands and the code that walks their
 * option tables (cmds.c).
 *
 * A subcommand is data plus one function: a table of options (name, argument, kind, where the
 * value goes, help sentence), its positional arguments, and run(), which makes the call and
 * prints. cmds.c parses argv against the table, reports usage errors and writes --help from it.
 * The subcommands live in cmds_stats.c (server and statistics), cmds_model.c (models and
 * weights), cmds_lifecycle.c (seeds, metrics, events), cmds_compute.c (forward, evaluate) and
 * top.c.
 */
#pragma once

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "ctl.h"
#include "kasmina/client.h"

struct ctl_cmd;

struct ctl {
    const char *prog; /* "kasminactl" */
    const char *cmd;  /* the subcommand's name (NULL before it) */
    bool json;
    const char *socket, *addr;
    char target[512];
    struct ksm_client_options opts;
    ksm_client *client; /* connected by ctl_connect() */
    struct ksm_client_error err;
    const char *token_file; /* --token-file: read at connect time */
    char token[4096];
};

// ---- Option tables ----

/* How an option's argument is converted (with args.c's parsers) and stored at its offset. */
enum ctl_arg_kind {
    CTL_ARG_FLAG,      /* no argument: bool, set true */
    CTL_ARG_STRING,    /* const char *: the argument as given */
    CTL_ARG_U32,       /* uint32_t (ctl_parse_u32) */
    CTL_ARG_U64,       /* uint64_t (ctl_parse_u64) */
    CTL_ARG_DOUBLE,    /* double, finite (ctl_parse_double) */
    CTL_ARG_BOOL,      /* bool (ctl_parse_bool) */
    CTL_ARG_STAGE,     /* enum ksm_stage (ctl_parse_stage) */
    CTL_ARG_CURVE,     /* enum ksm_alpha_curve (ctl_parse_curve) */
    CTL_ARG_ALGORITHM, /* enum ksm_alpha_algorithm (ctl_parse_algorithm) */
    CTL_ARG_DTYPE,     /* enum ksm_dtype (ctl_parse_dtype) */
    CTL_ARG_GATES,     /* unsigned gate bit set (ctl_parse_gates) */
    CTL_ARG_SETTER,    /* the row's set() converts and stores */
};

/* Converts arg (NULL when the option takes none) into args, the command's argument struct. opt
 * is "--name". Returns 0, or KSM_EINVAL with one sentence in err (errlen bytes). */
typedef int (*ctl_opt_setter)(void *args, const char *opt, const char *arg, char *err,
                              size_t errlen);

/* One option of a subcommand. A table has at most CTL_MAX_OPTS rows and ends with a row whose
 * name is NULL. Given twice, an option's last value wins (setters may collect instead). */
#define CTL_MAX_OPTS 40
struct ctl_opt {
    const char *name;    /* without "--" */
    const char *metavar; /* the argument's name in --help ("N"); NULL: the option takes none */
    enum ctl_arg_kind kind;
    size_t offset;      /* where the value goes in the argument struct (not for SETTER) */
    size_t given;       /* a bool there, set true when the option is given; 0: none */
    ctl_opt_setter set; /* CTL_ARG_SETTER only */
    const char *help;   /* its line in --help; NULL: accepted but not listed */
};

/* The positional arguments of a command line. Every argument struct begins with one, so no
 * option's field sits at offset 0 and .given = 0 can mean "none". */
#define CTL_MAX_POS 8
struct ctl_pos {
    const char *v[CTL_MAX_POS];
    int n;
};

struct ctl_cmd {
    const char *name;
    const char *summary;        /* its line in kasminactl --help */
    const char *positionals;    /* "MODEL SLOT": the synopsis and the missing-argument error */
    int min_pos, max_pos;       /* how many positionals it takes */
    const struct ctl_opt *opts; /* its options in --help order (NULL: none) */
    const char *notes;          /* lines --help prints after the options (NULL: none) */
    size_t args_size;           /* its argument struct, which begins with struct ctl_pos */
    void (*init)(void *args);   /* sets defaults (NULL: all zero) */
    int (*run)(struct ctl *x, void *args); /* the call and the output; returns the exit code */
    void (*fini)(void *args); /* frees what setters allocated (NULL: nothing to free) */
};

/* Every subcommand, in the order of kasminactl --help. */
extern const struct ctl_cmd *const ctl_cmds[];
extern const size_t ctl_n_cmds;
const struct ctl_cmd *ctl_cmd_find(const char *name);

extern const struct ctl_cmd ctl_cmd_info, ctl_cmd_health, ctl_cmd_stats, ctl_cmd_empty_cache;
extern const struct ctl_cmd ctl_cmd_models, ctl_cmd_create, ctl_cmd_delete, ctl_cmd_load_weights,
    ctl_cmd_export_weights, ctl_cmd_move;
extern const struct ctl_cmd ctl_cmd_germinate, ctl_cmd_advance, ctl_cmd_prune,
    ctl_cmd_schedule_prune, ctl_cmd_set_alpha, ctl_cmd_set_alpha_target, ctl_cmd_step,
    ctl_cmd_metrics, ctl_cmd_slots, ctl_cmd_events, ctl_cmd_configure_slot;
extern const struct ctl_cmd ctl_cmd_forward, ctl_cmd_fused_forward, ctl_cmd_evaluate;
extern const struct ctl_cmd ctl_cmd_train, ctl_cmd_training, ctl_cmd_checkpoint;
extern const struct ctl_cmd ctl_cmd_top;

/* Runs subcommand c: argv[0] is its name, the rest its arguments and options (common options
 * included). Parses into a fresh argument struct, then c->run. Returns the exit code. */
int ctl_cmd_main(struct ctl *x, const struct ctl_cmd *c, int argc, char **argv);

/* The parse of ctl_cmd_main into args (c->args_size bytes, defaults set); sets x->cmd. Returns
 * true when the
 * command should run; false with *exit_code set otherwise (0 after --help or --version, 2 after
 * a usage error, reported on stderr). */
bool ctl_cmd_parse(struct ctl *x, const struct ctl_cmd *c, int argc, char **argv, void *args,
                   int *exit_code);

/* The --help text of c: "usage: kasminactl NAME POSITIONALS [options]", then one line per
 * listed option and the notes. */
void ctl_cmd_usage(const struct ctl *x, const struct ctl_cmd *c, FILE *f);

// ---- Common options (before or after the subcommand) ----

enum ctl_common_id {
    CTL_O_JSON = 1000,
    CTL_O_HELP,
    CTL_O_SOCKET,
    CTL_O_ADDR,
    CTL_O_DEADLINE,
    CTL_O_TOKEN,
    CTL_O_WAIT,
    CTL_O_VERSION,
    CTL_O_TOKEN_FILE,
    CTL_O_TLS,
    CTL_O_TLS_CA,
    CTL_O_TLS_CERT,
    CTL_O_TLS_KEY,
    CTL_O_MAX_MESSAGE
};
extern const struct option ctl_common_options[];

/* Parses a common option (getopt_long value opt; --help is the caller's). Returns 1 when opt was
 * one, 0 when not, CTL_OPT_EXIT with *exit_code set after --version (0) or a bad value (2). */
#define CTL_OPT_EXIT (-2)
int ctl_common_opt(struct ctl *x, int opt, const char *arg, int *exit_code);

/* Prints "kasminactl CMD: msg" and the --help hint to stderr; returns CTL_EXIT_USAGE. */
int ctl_usage_error(struct ctl *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Connects (once). Returns 0 or an exit code. */
int ctl_connect(struct ctl *x);
/* Reports x->err of a failed call (stderr; and a JSON error object on stdout with --json);
 * returns the exit code of its status class. */
int ctl_call_failed(struct ctl *x);
/* Prints the warnings the server attached to the last successful call ("kasminactl CMD: warning:
 * ..." on stderr, one per line) and forgets them. ctl_cmd_main calls it after run(). */
void ctl_print_warnings(struct ctl *x);
