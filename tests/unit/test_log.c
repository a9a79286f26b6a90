/* Logging: the level is checked before formatting; sinks, files and reopen work. */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

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

/* The file's lines (at most 8, 2 KiB each) into lines[]; returns how many. */
static int read_lines(const char *path, char lines[][2048], int max)
{
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f);
    int n = 0;
    while (n < max && fgets(lines[n], 2048, f) != NULL) n++;
    fclose(f);
    return n;
}

Test(log, json_format_writes_one_parseable_object_per_line)
{
    char dir[] = "/tmp/ksm_logj_XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char path[128];
    snprintf(path, sizeof path, "%s/k.log", dir);
    ksm_log_set_level(KSM_LOG_DEBUG);
    cr_assert_eq(ksm_log_open_file(path), 0);
    ksm_log_set_format(KSM_LOG_FORMAT_JSON);
    /* Quotes, backslashes, control bytes, valid UTF-8 and a stray byte that is not UTF-8. */
    KSM_LOGW("rpc", "say \"hi\" \\ tab\there\nnew line \x01 caf\xc3\xa9 bad\xff end");
    struct ksm_log_field f[] = {{"method", "AdvanceStage", 0},
                                {"latency_ms", NULL, 0.25},
                                {"inf", NULL, 1.0 / 0.0},
                                {"odd \"key\"", "v\x02", 0}};
    KSM_LOG_FIELDS(KSM_LOG_DEBUG, "rpc", f, 4, "AdvanceStage OK %.3f ms", 0.25);
    char big[3000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    KSM_LOGI("main", "%s", big); /* cut to the message buffer, still one object */
    ksm_log_set_format(KSM_LOG_FORMAT_TEXT);
    KSM_LOGI("main", "text again");
    ksm_log_open_file(NULL);

    char lines[8][2048];
    int n = read_lines(path, lines, 8);
    cr_assert_eq(n, 4, "%d lines", n);
    json_error_t je;
    json_t *j = json_loads(lines[0], 0, &je);
    cr_assert_not_null(j, "line 1 is not JSON (%s): %s", je.text, lines[0]);
    cr_expect_str_eq(json_string_value(json_object_get(j, "level")), "warn");
    cr_expect_str_eq(json_string_value(json_object_get(j, "module")), "rpc");
    cr_expect_str_eq(json_string_value(json_object_get(j, "msg")),
                     "say \"hi\" \\ tab\there\nnew line \x01 caf\xc3\xa9 bad\xef\xbf\xbd end");
    const char *ts = json_string_value(json_object_get(j, "ts"));
    cr_expect(ts != NULL && strlen(ts) == 24 && ts[10] == 'T' && ts[23] == 'Z', "ts %s", ts);
    json_decref(j);

    j = json_loads(lines[1], 0, &je);
    cr_assert_not_null(j, "line 2 is not JSON (%s): %s", je.text, lines[1]);
    cr_expect_str_eq(json_string_value(json_object_get(j, "level")), "debug");
    cr_expect_str_eq(json_string_value(json_object_get(j, "method")), "AdvanceStage");
    cr_expect_eq(json_real_value(json_object_get(j, "latency_ms")), 0.25);
    cr_expect(json_is_null(json_object_get(j, "inf")));
    cr_expect_str_eq(json_string_value(json_object_get(j, "odd \"key\"")), "v\x02");
    cr_expect_str_eq(json_string_value(json_object_get(j, "msg")), "AdvanceStage OK 0.250 ms");
    json_decref(j);

    j = json_loads(lines[2], 0, &je);
    cr_assert_not_null(j, "line 3 is not JSON (%s)", je.text);
    cr_expect_eq(strlen(json_string_value(json_object_get(j, "msg"))), 1023);
    json_decref(j);
    cr_expect(strstr(lines[3], " I main: text again\n") != NULL, "%s", lines[3]);
    unlink(path);
    rmdir(dir);
}

Test(log, json_string_cuts_at_a_character_boundary)
{
    char out[12];
    /* Everything fits in 12 bytes; in 9 the third e-acute would cut the closing quote off. */
    size_t n = ksm_log_json_string(out, sizeof out, "ab\xc3\xa9\xc3\xa9\xc3\xa9");
    cr_expect_str_eq(out, "\"ab\xc3\xa9\xc3\xa9\xc3\xa9\"");
    cr_expect_eq(n, 10);
    n = ksm_log_json_string(out, 9, "ab\xc3\xa9\xc3\xa9\xc3\xa9");
    cr_expect_str_eq(out, "\"ab\xc3\xa9\xc3\xa9\"");
    n = ksm_log_json_string(out, sizeof out, "\"\"\"\"\"\"");
    cr_expect_str_eq(out, "\"\\\"\\\"\\\"\\\"\"");
    cr_expect_eq(n, strlen(out));
}

Test(log, format_names_parse)
{
    enum ksm_log_format f;
    cr_expect_eq(ksm_log_format_parse("json", &f), 0);
    cr_expect_eq(f, KSM_LOG_FORMAT_JSON);
    cr_expect_eq(ksm_log_format_parse("TEXT", &f), 0);
    cr_expect_eq(f, KSM_LOG_FORMAT_TEXT);
    cr_expect_eq(ksm_log_format_parse("xml", &f), KSM_EINVAL);
    cr_expect_str_eq(ksm_log_level_name(KSM_LOG_WARN), "warn");
}

Test(log, rate_limit_lets_a_burst_through_then_one_per_period_and_counts_the_rest)
{
    struct ksm_log_ratelimit rl = {0};
    const int64_t s = 1000000000;
    uint64_t sup = 99;
    int64_t t = 5 * s;
    /* burst 3 at once, then 1 a second */
    for (int i = 0; i < 3; i++) {
        cr_expect(ksm_log_ratelimit_allow_at(&rl, 1.0, 3.0, t, &sup), "line %d", i);
        cr_expect_eq(sup, 0);
    }
    for (int i = 0; i < 5; i++) cr_expect_not(ksm_log_ratelimit_allow_at(&rl, 1.0, 3.0, t, &sup));
    /* half a second earns half a token: still refused */
    cr_expect_not(ksm_log_ratelimit_allow_at(&rl, 1.0, 3.0, t + s / 2, &sup));
    /* a whole second: one line, which learns of the 6 refused before it */
    cr_expect(ksm_log_ratelimit_allow_at(&rl, 1.0, 3.0, t + s, &sup));
    cr_expect_eq(sup, 6);
    cr_expect_not(ksm_log_ratelimit_allow_at(&rl, 1.0, 3.0, t + s, &sup));
    /* a long quiet spell refills to the burst, not beyond */
    t += 100 * s;
    for (int i = 0; i < 3; i++) cr_expect(ksm_log_ratelimit_allow_at(&rl, 1.0, 3.0, t, &sup));
    cr_expect_not(ksm_log_ratelimit_allow_at(&rl, 1.0, 3.0, t, &sup));
    /* a clock that steps back changes nothing */
    cr_expect_not(ksm_log_ratelimit_allow_at(&rl, 1.0, 3.0, t - 50 * s, &sup));
}

Test(log, assert_aborts_on_a_broken_invariant, .signal = SIGABRT)
{
    int x = 1;
    KSM_ASSERT(x == 2);
}
