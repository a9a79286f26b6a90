/*
 * kasminad config: parsing kasminad's options more than once in one process (tests, a future
 * reload). Found by tests/fuzz/fuzz_config: a parse that returned early (--help given as "-hh")
 * left GNU getopt inside the "-hh" cluster, and the next ksm_config_load() read that stale
 * (by then possibly freed) argv word: here it saw "-h" again and printed the help instead of
 * parsing "--workers 3".
 */
#include <criterion/criterion.h>

#include "config.h"
#include "kasmina/errors.h"

Test(config, second_load_forgets_the_first_parse)
{
    struct ksm_config c;
    char *first[] = {"kasminad", "-hh", NULL};
    cr_assert_eq(ksm_config_load(&c, 2, first, "test"), 1); /* --help */
    ksm_config_fini(&c);
    char *second[] = {"kasminad", "--workers", "3", NULL};
    cr_assert_eq(ksm_config_load(&c, 3, second, "test"), 0);
    cr_assert_eq(c.workers, 3);
    ksm_config_fini(&c);
}

Test(config, second_load_after_a_bad_option)
{
    struct ksm_config c;
    char *first[] = {"kasminad", "-zq", NULL};
    cr_assert_eq(ksm_config_load(&c, 2, first, "test"), KSM_EINVAL);
    ksm_config_fini(&c);
    char *second[] = {"kasminad", "--cpu-devices", "2", NULL};
    cr_assert_eq(ksm_config_load(&c, 3, second, "test"), 0);
    cr_assert_eq(c.cpu_devices, 2);
    ksm_config_fini(&c);
}

/*
 * Precedence: defaults < config file < KASMINA_* environment < command line. For an option of
 * each type, every combination of the three layers gives the value of the highest one present
 * (the default when none is); a bad value in any layer fails the load with one line that names
 * the option and the layer (the file and line, the environment variable, or the flag).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kt.h"

enum { L_FILE = 1, L_ENV = 2, L_CLI = 4 };

struct layered {
    const char *name, *env;        /* cpu-devices, KASMINA_CPU_DEVICES */
    const char *file, *envv, *cli; /* the value each layer gives */
};

/* ksm_config_load() with the layers of mask set from o (a file in dir, the variable, a flag);
 * *err gets what it wrote to stderr. */
static int load_layers(struct ksm_config *c, const struct layered *o, int mask, const char *dir,
                       char *err, size_t errlen)
{
    char path[512], flag[64];
    snprintf(path, sizeof path, "%s/kasminad.conf", dir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, "# test\n%s %s\n", o->name, o->file);
    fclose(f);
    if (mask & L_ENV)
        setenv(o->env, o->envv, 1);
    else
        unsetenv(o->env);
    snprintf(flag, sizeof flag, "--%s", o->name);
    char *argv[8] = {"kasminad"};
    int argc = 1;
    if (mask & L_FILE) {
        argv[argc++] = "--config";
        argv[argc++] = path;
    }
    if (mask & L_CLI) {
        argv[argc++] = flag;
        if (o->cli != NULL) argv[argc++] = (char *)o->cli; /* NULL: a bool flag */
    }
    argv[argc] = NULL;

    /* stderr into a file for the length of the load */
    char errpath[512];
    snprintf(errpath, sizeof errpath, "%s/stderr", dir);
    fflush(stderr);
    int saved = dup(2);
    FILE *ef = fopen(errpath, "w+");
    cr_assert_not_null(ef);
    dup2(fileno(ef), 2);
    int rc = ksm_config_load(c, argc, argv, "test");
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(ef);
    size_t n = fread(err, 1, errlen - 1, ef);
    err[n] = '\0';
    fclose(ef);
    unsetenv(o->env);
    return rc;
}

/* Which layer's value wins for mask: the highest present, else the default. */
static const char *winner(int mask)
{
    return mask & L_CLI    ? "command line"
           : mask & L_ENV  ? "environment"
           : mask & L_FILE ? "file"
                           : "default";
}

#define FOR_EACH_MASK(m) for (int m = 0; m < 8; m++)

Test(config_precedence, integer_cpu_devices)
{
    char *dir = kt_tmpdir("config");
    const struct layered o = {"cpu-devices", "KASMINA_CPU_DEVICES", "2", "3", "4"};
    FOR_EACH_MASK(m)
    {
        struct ksm_config c;
        char err[1024];
        cr_assert_eq(load_layers(&c, &o, m, dir, err, sizeof err), 0, "mask %d: %s", m, err);
        int want = m & L_CLI ? 4 : m & L_ENV ? 3 : m & L_FILE ? 2 : 1;
        cr_expect_eq(c.cpu_devices, want, "layers %d (%s wins): cpu_devices %d, want %d", m,
                     winner(m), c.cpu_devices, want);
        ksm_config_fini(&c);
    }
    kt_rmtree(dir);
    free(dir);
}

Test(config_precedence, size_with_suffix_journal_bytes)
{
    char *dir = kt_tmpdir("config");
    const struct layered o = {"journal-bytes", "KASMINA_JOURNAL_BYTES", "128K", "2MiB", "1G"};
    FOR_EACH_MASK(m)
    {
        struct ksm_config c;
        char err[1024];
        cr_assert_eq(load_layers(&c, &o, m, dir, err, sizeof err), 0, "mask %d: %s", m, err);
        size_t want = m & L_CLI    ? (size_t)1 << 30
                      : m & L_ENV  ? (size_t)2 << 20
                      : m & L_FILE ? (size_t)128 << 10
                                   : (size_t)64 << 20; /* default 64M */
        cr_expect_eq(c.journal_bytes, want, "layers %d (%s wins): journal_bytes %zu, want %zu", m,
                     winner(m), c.journal_bytes, want);
        ksm_config_fini(&c);
    }
    kt_rmtree(dir);
    free(dir);
}

Test(config_precedence, string_metrics_listen)
{
    char *dir = kt_tmpdir("config");
    const struct layered o = {"metrics-listen", "KASMINA_METRICS_LISTEN", "127.0.0.1:9001",
                              "127.0.0.1:9002", "127.0.0.1:9003"};
    FOR_EACH_MASK(m)
    {
        struct ksm_config c;
        char err[1024];
        cr_assert_eq(load_layers(&c, &o, m, dir, err, sizeof err), 0, "mask %d: %s", m, err);
        const char *want = m & L_CLI ? o.cli : m & L_ENV ? o.envv : m & L_FILE ? o.file : NULL;
        if (want == NULL)
            cr_expect_null(c.metrics_listen, "no layer: metrics_listen %s", c.metrics_listen);
        else
            cr_expect_str_eq(c.metrics_listen ? c.metrics_listen : "(null)", want,
                             "layers %d (%s wins)", m, winner(m));
        ksm_config_fini(&c);
    }
    kt_rmtree(dir);
    free(dir);
}

Test(config_precedence, choice_log_level)
{
    char *dir = kt_tmpdir("config");
    const struct layered o = {"log-level", "KASMINA_LOG_LEVEL", "warn", "error", "debug"};
    FOR_EACH_MASK(m)
    {
        struct ksm_config c;
        char err[1024];
        cr_assert_eq(load_layers(&c, &o, m, dir, err, sizeof err), 0, "mask %d: %s", m, err);
        const char *want = m & L_CLI ? "debug" : m & L_ENV ? "error" : m & L_FILE ? "warn" : "info";
        cr_expect_str_eq(c.log_level, want, "layers %d (%s wins)", m, winner(m));
        ksm_config_fini(&c);
    }
    kt_rmtree(dir);
    free(dir);
}

/* A bool: the file sets it, the environment can clear it again, the flag sets it. */
Test(config_precedence, bool_strict_restore)
{
    char *dir = kt_tmpdir("config");
    const struct layered o = {"strict-restore", "KASMINA_STRICT_RESTORE", "true", "false", NULL};
    FOR_EACH_MASK(m)
    {
        struct ksm_config c;
        char err[1024];
        cr_assert_eq(load_layers(&c, &o, m, dir, err, sizeof err), 0, "mask %d: %s", m, err);
        bool want = m & L_CLI ? true : m & L_ENV ? false : m & L_FILE ? true : false;
        cr_expect_eq(c.strict_restore, want, "layers %d (%s wins): strict_restore %d", m, winner(m),
                     c.strict_restore);
        ksm_config_fini(&c);
    }
    kt_rmtree(dir);
    free(dir);
}

/* Each bad value, given in one layer only: KSM_EINVAL and the one line naming option and layer. */
Test(config_precedence, bad_value_names_the_option_and_the_layer)
{
    static const struct {
        const char *name, *env, *bad;
    } opts[] = {
        {"cpu-devices", "KASMINA_CPU_DEVICES", "17"},
        {"journal-bytes", "KASMINA_JOURNAL_BYTES", "5X"},
        {"log-level", "KASMINA_LOG_LEVEL", "loud"},
        {"metrics-listen", "KASMINA_METRICS_LISTEN", ""},
        {"strict-restore", "KASMINA_STRICT_RESTORE", "maybe"},
    };
    char *dir = kt_tmpdir("config");
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++) {
        for (int layer = L_FILE; layer <= L_CLI; layer <<= 1) {
            bool is_bool = strcmp(opts[i].name, "strict-restore") == 0;
            if (layer == L_CLI && is_bool) continue; /* a bool flag takes no value */
            if (layer == L_FILE && opts[i].bad[0] == '\0') continue; /* "name" alone: no value */
            struct layered o = {opts[i].name, opts[i].env, opts[i].bad, opts[i].bad, opts[i].bad};
            struct ksm_config c;
            char err[1024], want[512];
            int rc = load_layers(&c, &o, layer, dir, err, sizeof err);
            cr_expect_eq(rc, KSM_EINVAL, "%s = '%s' in the %s: rc %d", o.name, o.file,
                         winner(layer), rc);
            if (rc == 0) ksm_config_fini(&c);
            if (layer == L_FILE)
                snprintf(want, sizeof want, "kasminad: option %s (%s/kasminad.conf:2) must be ",
                         o.name, dir);
            else if (layer == L_ENV)
                snprintf(want, sizeof want, "kasminad: option --%s (%s) must be ", o.name, o.env);
            else
                snprintf(want, sizeof want, "kasminad: option --%s must be ", o.name);
            cr_expect(strncmp(err, want, strlen(want)) == 0,
                      "%s in the %s: stderr '%s', want '%s...'", o.name, winner(layer), err, want);
            char got[256];
            snprintf(got, sizeof got, ", got '%s'\n", o.file);
            cr_expect(strstr(err, got) != NULL, "%s in the %s: stderr '%s' lacks \"%s\"", o.name,
                      winner(layer), err, got);
        }
    }
    kt_rmtree(dir);
    free(dir);
}
