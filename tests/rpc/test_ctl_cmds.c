/*
 * kasminactl without a server: the option-table walker (cmds.c) on a table of its own and on the
 * real subcommands. Each case checks the exit code and the exact sentences on stderr.
 */
#include <criterion/criterion.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cmds.h"

TestSuite(ctl_cmds, .timeout = 10);

// ---- A command of the test's own ----

#define MAX_TAGS 2

struct fake_args {
    struct ctl_pos pos;
    uint32_t count;
    const char *name;
    bool verbose;
    double ratio;
    bool has_ratio;
    const char *tags[MAX_TAGS];
    int n_tags;
};

static int add_tag(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    struct fake_args *a = args;
    if (a->n_tags == MAX_TAGS) {
        snprintf(err, errlen, "too many %s", opt);
        return KSM_EINVAL;
    }
    a->tags[a->n_tags++] = arg;
    return 0;
}

static int run_fake(struct ctl *x, void *args)
{
    (void)x;
    (void)args;
    return 0;
}

static const struct ctl_opt fake_opts[] = {
    {"count", "N", CTL_ARG_U32, offsetof(struct fake_args, count), 0, NULL, "how many"},
    {"name", "TEXT", CTL_ARG_STRING, offsetof(struct fake_args, name), 0, NULL, "what to call it"},
    {"verbose", NULL, CTL_ARG_FLAG, offsetof(struct fake_args, verbose), 0, NULL, "say more"},
    {"ratio", "X", CTL_ARG_DOUBLE, offsetof(struct fake_args, ratio),
     offsetof(struct fake_args, has_ratio), NULL, "a finite number"},
    {"tag", "T", CTL_ARG_SETTER, 0, 0, add_tag, "a tag (repeat)"},
    {"secret", NULL, CTL_ARG_FLAG, offsetof(struct fake_args, verbose), 0, NULL, NULL},
    {0},
};

static const struct ctl_cmd fake_cmd = {
    .name = "fake",
    .summary = "a command for the tests",
    .positionals = "MODEL SLOT [EXTRA]",
    .min_pos = 2,
    .max_pos = 3,
    .opts = fake_opts,
    .notes = "  A note.",
    .args_size = sizeof(struct fake_args),
    .run = run_fake,
};

// ---- Running a command line with stdout and stderr captured ----

struct outcome {
    bool parsed;   /* ctl_cmd_parse: run the command */
    int exit_code; /* else this */
    char out[8192], err[8192];
    char *argv[32];    /* the command line, writable as getopt wants it ... */
    char argbuf[1024]; /* ... and its strings, which the parsed values point into */
};

/* Copies words into o->argv; returns argc. */
static int set_argv(struct outcome *o, const char *const *words)
{
    int argc = 0;
    size_t used = 0;
    for (; words[argc]; argc++) {
        size_t n = strlen(words[argc]) + 1;
        cr_assert(argc < 31 && used + n <= sizeof o->argbuf);
        o->argv[argc] = memcpy(o->argbuf + used, words[argc], n);
        used += n;
    }
    o->argv[argc] = NULL;
    return argc;
}

/* fd's output from here on goes to a temporary file; returns the saved fd. */
static int capture_begin(int fd, FILE **tmp)
{
    fflush(NULL);
    *tmp = tmpfile();
    cr_assert_not_null(*tmp);
    int saved = dup(fd);
    dup2(fileno(*tmp), fd);
    return saved;
}

static void capture_end(int fd, int saved, FILE *tmp, char *buf, size_t len)
{
    fflush(NULL);
    dup2(saved, fd);
    close(saved);
    rewind(tmp);
    size_t n = fread(buf, 1, len - 1, tmp);
    buf[n] = '\0';
    fclose(tmp);
}

/* Parses words (argv from the command's name on) against c into args. */
static void parse(const struct ctl_cmd *c, void *args, const char *const *words, struct outcome *o)
{
    int argc = set_argv(o, words);
    struct ctl x = {.prog = "kasminactl"};
    FILE *tout, *terr;
    int sout = capture_begin(STDOUT_FILENO, &tout), serr = capture_begin(STDERR_FILENO, &terr);
    o->exit_code = -1;
    o->parsed = ctl_cmd_parse(&x, c, argc, o->argv, args, &o->exit_code);
    capture_end(STDERR_FILENO, serr, terr, o->err, sizeof o->err);
    capture_end(STDOUT_FILENO, sout, tout, o->out, sizeof o->out);
}

/* ctl_cmd_main on a real subcommand (parse errors come before any connection). */
static int run_main(const char *const *words, struct outcome *o)
{
    int argc = set_argv(o, words);
    const struct ctl_cmd *c = ctl_cmd_find(words[0]);
    cr_assert_not_null(c, "no command %s", words[0]);
    struct ctl x = {.prog = "kasminactl"};
    FILE *tout, *terr;
    int sout = capture_begin(STDOUT_FILENO, &tout), serr = capture_begin(STDERR_FILENO, &terr);
    o->exit_code = ctl_cmd_main(&x, c, argc, o->argv);
    capture_end(STDERR_FILENO, serr, terr, o->err, sizeof o->err);
    capture_end(STDOUT_FILENO, sout, tout, o->out, sizeof o->out);
    return o->exit_code;
}

#define FAKE_HINT "Try 'kasminactl fake --help'.\n"

// ---- The walker ----

Test(ctl_cmds, options_and_positionals_go_where_the_table_says)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a,
          (const char *const[]){"fake", "m1", "--count", "7", "--name=n", "s1", "--verbose",
                                "--ratio", "0.5", "--tag", "a", "--json", NULL},
          &o);
    cr_assert(o.parsed, "%s", o.err);
    cr_expect_str_eq(o.err, "");
    cr_expect_str_eq(o.out, "");
    cr_expect_eq(a.pos.n, 2);
    cr_expect_str_eq(a.pos.v[0], "m1");
    cr_expect_str_eq(a.pos.v[1], "s1");
    cr_expect_eq(a.count, 7);
    cr_expect_str_eq(a.name, "n");
    cr_expect(a.verbose);
    cr_expect(a.has_ratio);
    cr_expect_float_eq(a.ratio, 0.5, 1e-12);
    cr_expect_eq(a.n_tags, 1);
}

Test(ctl_cmds, an_option_not_given_leaves_its_field_and_given_flag_alone)
{
    struct fake_args a = {.count = 3};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "m1", "s1", NULL}, &o);
    cr_assert(o.parsed, "%s", o.err);
    cr_expect_eq(a.count, 3);
    cr_expect(!a.has_ratio);
    cr_expect(!a.verbose);
}

Test(ctl_cmds, unknown_option)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "m1", "s1", "--bogus", NULL}, &o);
    cr_expect(!o.parsed);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "fake: unrecognized option '--bogus'\n"
                            "kasminactl fake: bad option\n" FAKE_HINT);
    cr_expect_str_eq(o.out, "");
}

Test(ctl_cmds, short_options_are_unknown)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "-v", NULL}, &o);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "fake: invalid option -- 'v'\n"
                            "kasminactl fake: bad option\n" FAKE_HINT);
}

Test(ctl_cmds, missing_argument)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "m1", "s1", "--count", NULL}, &o);
    cr_expect(!o.parsed);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "fake: option '--count' requires an argument\n"
                            "kasminactl fake: bad option\n" FAKE_HINT);
}

Test(ctl_cmds, a_flag_takes_no_argument)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "m1", "s1", "--verbose=yes", NULL}, &o);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "fake: option '--verbose' doesn't allow an argument\n"
                            "kasminactl fake: bad option\n" FAKE_HINT);
}

Test(ctl_cmds, a_bad_value_names_the_option)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "m1", "s1", "--count", "3x", NULL}, &o);
    cr_expect(!o.parsed);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "kasminactl fake: --count must be an integer in [0, 4294967295], got "
                            "'3x'\n" FAKE_HINT);
    parse(&fake_cmd, &a, (const char *const[]){"fake", "--ratio", "nan", "m1", "s1", NULL}, &o);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err,
                     "kasminactl fake: --ratio must be a finite number, got 'nan'\n" FAKE_HINT);
    cr_expect(!a.has_ratio, "a rejected value does not count as given");
}

Test(ctl_cmds, the_first_error_wins)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "--count", "x", "--bogus", NULL}, &o);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "kasminactl fake: --count must be an integer in [0, 4294967295], got "
                            "'x'\n" FAKE_HINT);
}

Test(ctl_cmds, a_repeated_option_keeps_its_last_value)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a,
          (const char *const[]){"fake", "m1", "s1", "--count", "1", "--count", "9", "--name", "a",
                                "--name", "b", NULL},
          &o);
    cr_assert(o.parsed, "%s", o.err);
    cr_expect_eq(a.count, 9);
    cr_expect_str_eq(a.name, "b");
}

Test(ctl_cmds, a_repeated_collecting_option_collects_up_to_its_limit)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a,
          (const char *const[]){"fake", "m1", "s1", "--tag", "a", "--tag", "b", NULL}, &o);
    cr_assert(o.parsed, "%s", o.err);
    cr_expect_eq(a.n_tags, 2);
    cr_expect_str_eq(a.tags[1], "b");
    struct fake_args b = {0};
    parse(&fake_cmd, &b,
          (const char *const[]){"fake", "m1", "s1", "--tag", "a", "--tag", "b", "--tag", "c", NULL},
          &o);
    cr_expect(!o.parsed);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "kasminactl fake: too many --tag\n" FAKE_HINT);
}

Test(ctl_cmds, too_few_positionals)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "m1", "--count", "2", NULL}, &o);
    cr_expect(!o.parsed);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "kasminactl fake: missing argument(s): MODEL SLOT [EXTRA]\n" FAKE_HINT);
}

Test(ctl_cmds, too_many_positionals)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "a", "b", "c", "d", "e", NULL}, &o);
    cr_expect(!o.parsed);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "kasminactl fake: unexpected argument 'd'\n" FAKE_HINT);
    /* More than any command takes: stopped while parsing. */
    parse(&fake_cmd, &a,
          (const char *const[]){"fake", "1", "2", "3", "4", "5", "6", "7", "8", "9", NULL}, &o);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "kasminactl fake: too many arguments\n" FAKE_HINT);
}

Test(ctl_cmds, help_lists_every_option_of_the_table)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "--help", NULL}, &o);
    cr_expect(!o.parsed);
    cr_expect_eq(o.exit_code, 0);
    cr_expect_str_eq(o.err, "");
    cr_expect_str_eq(o.out, "usage: kasminactl fake MODEL SLOT [EXTRA] [options]\n"
                            "  --count N    how many\n"
                            "  --name TEXT  what to call it\n"
                            "  --verbose    say more\n"
                            "  --ratio X    a finite number\n"
                            "  --tag T      a tag (repeat)\n"
                            "  A note.\n");
}

Test(ctl_cmds, help_comes_before_the_positional_check_but_after_earlier_errors)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "--help", "--bogus", NULL}, &o);
    cr_expect_eq(o.exit_code, 0);
    cr_expect(strncmp(o.out, "usage: kasminactl fake ", 23) == 0, "%s", o.out);
    parse(&fake_cmd, &a, (const char *const[]){"fake", "--count", "x", "--help", NULL}, &o);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.out, "");
}

Test(ctl_cmds, common_options_are_accepted_after_the_command)
{
    struct fake_args a = {0};
    struct outcome o;
    parse(&fake_cmd, &a, (const char *const[]){"fake", "m", "s", "--deadline", "0", NULL}, &o);
    cr_expect_eq(o.exit_code, CTL_EXIT_USAGE);
    cr_expect_str_eq(o.err, "kasminactl fake: --deadline must be a positive number of ms, got "
                            "'0'\n" FAKE_HINT);
    parse(&fake_cmd, &a, (const char *const[]){"fake", "m", "s", "--version", NULL}, &o);
    cr_expect(!o.parsed);
    cr_expect_eq(o.exit_code, 0);
    cr_expect(strncmp(o.out, "kasminactl ", 11) == 0, "%s", o.out);
}

// ---- The real subcommands ----

Test(ctl_cmds, every_table_fits_the_walker)
{
    for (size_t i = 0; i < ctl_n_cmds; i++) {
        const struct ctl_cmd *c = ctl_cmds[i];
        size_t n = 0;
        for (const struct ctl_opt *o = c->opts; o && o->name; o++, n++) {
            cr_expect((o->kind == CTL_ARG_SETTER) == (o->set != NULL), "%s --%s", c->name, o->name);
            if (o->kind == CTL_ARG_FLAG) cr_expect_null(o->metavar, "%s --%s", c->name, o->name);
        }
        cr_expect_leq(n, CTL_MAX_OPTS, "%s", c->name);
        cr_expect_leq(c->min_pos, c->max_pos, "%s", c->name);
        cr_expect_leq(c->max_pos, CTL_MAX_POS, "%s", c->name);
        cr_expect_geq(c->args_size, sizeof(struct ctl_pos), "%s", c->name);
    }
}

Test(ctl_cmds, every_subcommand_helps_with_every_option_of_its_table)
{
    for (size_t i = 0; i < ctl_n_cmds; i++) {
        const struct ctl_cmd *c = ctl_cmds[i];
        struct outcome o;
        cr_expect_eq(run_main((const char *const[]){c->name, "--help", NULL}, &o), 0, "%s",
                     c->name);
        char head[64];
        snprintf(head, sizeof head, "usage: kasminactl %s", c->name);
        cr_expect(strncmp(o.out, head, strlen(head)) == 0, "%s", o.out);
        for (const struct ctl_opt *opt = c->opts; opt && opt->name; opt++) {
            char line[256];
            snprintf(line, sizeof line, "\n  --%s%s%s ", opt->name, opt->metavar ? " " : "",
                     opt->metavar ? opt->metavar : "");
            if (opt->help)
                cr_expect(strstr(o.out, line) && strstr(o.out, opt->help), "%s: --%s in\n%s",
                          c->name, opt->name, o.out);
            else
                cr_expect(!strstr(o.out, line), "%s: --%s is listed", c->name, opt->name);
        }
    }
}

Test(ctl_cmds, real_tables_report_the_sentences_they_always_did)
{
    static const struct {
        const char *words[8];
        const char *err;
    } cases[] = {
        {{"create", "--classes", "x"},
         "kasminactl create: --classes must be an integer in [0, 4294967295], got 'x'\n"},
        {{"create", "--dtype", "f64"},
         "kasminactl create: --dtype must be f32, f16, bf16, i64 or i32, got 'f64'\n"},
        {{"germinate", "m1"}, "kasminactl germinate: missing argument(s): MODEL SLOT BLUEPRINT\n"},
        {{"set-alpha", "m1", "r0c1", "not-a-number"},
         "kasminactl set-alpha: ALPHA must be a finite number, got 'not-a-number'\n"},
        {{"forward", "m1", "--override", "s=1"},
         "kasminactl forward: --override is for fused-forward\n"},
        {{"forward", "m1"}, "kasminactl forward: --input FILE is required\n"},
        {{"evaluate", "m1", "--input", "a"},
         "kasminactl evaluate: --input FILE and --targets FILE are required\n"},
        {{"stats", "nothing"}, "kasminactl stats: expected memory or cache, got 'nothing'\n"},
        {{"stats", "memory", "m1"},
         "kasminactl stats: stats memory takes no MODEL (use --device)\n"},
        {{"top", "--interval", "0"},
         "kasminactl top: --interval must be in [0.1, 3600] seconds, got '0'\n"},
        {{"events", "a", "b"}, "kasminactl events: unexpected argument 'b'\n"},
        {{"metrics", "m", "s", "--vanishing", "maybe"},
         "kasminactl metrics: --vanishing must be true or false, got 'maybe'\n"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct outcome o;
        cr_expect_eq(run_main(cases[i].words, &o), CTL_EXIT_USAGE, "%s", cases[i].words[0]);
        char want[512];
        snprintf(want, sizeof want, "%sTry 'kasminactl %s --help'.\n", cases[i].err,
                 cases[i].words[0]);
        cr_expect_str_eq(o.err, want);
        cr_expect_str_eq(o.out, "");
    }
}
