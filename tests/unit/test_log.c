/* Logging: the level is checked before formatting; sinks, files and reopen work. */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"

TestSuite(log, .timeout = 10);

struct capture {
    int n;
    enum ksm_log_level level;
    char module[32];
    char msg[256];
};

static void capture_sink(enum ksm_log_level level, const char *module, const char *msg, void *ud)
{
    struct capture *c = ud;
    c->n++;
    c->level = level;
    snprintf(c->module, sizeof c->module, "%s", module);
    snprintf(c->msg, sizeof c->msg, "%s", msg);
}

static int formatted;
static const char *count_format(void)
{
    formatted++;
    return "x";
}

Test(log, sink_receives_formatted_lines_at_or_below_the_level)
{
    struct capture c = {0};
    ksm_log_set_sink(capture_sink, &c);
    ksm_log_set_level(KSM_LOG_INFO);
    KSM_LOGI("alloc", "reserved %d bytes", 512);
    cr_expect_eq(c.n, 1);
    cr_expect_eq(c.level, KSM_LOG_INFO);
    cr_expect_str_eq(c.module, "alloc");
    cr_expect_str_eq(c.msg, "reserved 512 bytes");
    KSM_LOG(KSM_LOG_DEBUG, "alloc", "dropped");
    cr_expect_eq(c.n, 1);
    KSM_LOGE("core", "e");
    cr_expect_eq(c.n, 2);
    ksm_log_set_sink(NULL, NULL);
}

Test(log, arguments_are_not_evaluated_when_the_level_is_off)
{
    struct capture c = {0};
    ksm_log_set_sink(capture_sink, &c);
    ksm_log_set_level(KSM_LOG_WARN);
    formatted = 0;
    KSM_LOG(KSM_LOG_INFO, "m", "%s", count_format());
    cr_expect_eq(formatted, 0, "the message was formatted although INFO is off");
    KSM_LOG(KSM_LOG_WARN, "m", "%s", count_format());
    cr_expect_eq(formatted, 1);
    cr_expect_eq(c.n, 1);
    ksm_log_set_sink(NULL, NULL);
}

Test(log, level_names_parse)
{
    enum ksm_log_level l;
    cr_expect_eq(ksm_log_level_parse("debug", &l), 0);
    cr_expect_eq(l, KSM_LOG_DEBUG);
    cr_expect_eq(ksm_log_level_parse("WARN", &l), 0);
    cr_expect_eq(l, KSM_LOG_WARN);
    cr_expect_eq(ksm_log_level_parse("verbose", &l), KSM_EINVAL);
}

Test(log, file_sink_appends_and_reopens_after_rotation)
{
    char dir[] = "/tmp/ksm_log_XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char path[128], rotated[128];
    snprintf(path, sizeof path, "%s/k.log", dir);
    snprintf(rotated, sizeof rotated, "%s/k.log.1", dir);
    ksm_log_set_level(KSM_LOG_INFO);
    cr_assert_eq(ksm_log_open_file(path), 0);
    KSM_LOGI("main", "first line");
    cr_assert_eq(rename(path, rotated), 0);
    cr_assert_eq(ksm_log_reopen(), 0);
    KSM_LOGW("main", "second line");
    ksm_log_open_file(NULL);

    char buf[512] = {0};
    FILE *f = fopen(rotated, "r");
    cr_assert_not_null(f);
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    cr_expect(n > 0 && strstr(buf, " I main: first line\n") != NULL, "rotated: %s", buf);
    memset(buf, 0, sizeof buf);
    f = fopen(path, "r");
    cr_assert_not_null(f);
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    cr_expect(n > 0 && strstr(buf, " W main: second line\n") != NULL, "new: %s", buf);
    cr_expect(strstr(buf, "first") == NULL);
    cr_expect_lt(ksm_log_open_file("/nonexistent-dir/x.log"), 0);
    unlink(path);
    unlink(rotated);
    rmdir(dir);
}

Test(log, assert_aborts_on_a_broken_invariant, .signal = SIGABRT)
{
    int x = 1;
    KSM_ASSERT(x == 2);
}
