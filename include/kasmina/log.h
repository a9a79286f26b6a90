/*
 * kasmina logging.
 *
 * KSM_LOG checks the level before it formats anything (redis' serverLog), so a disabled debug
 * line costs one load and one compare. Lines go to a sink callback; the default sink writes
 *
 *     2026-11-22T03:17:28.123Z I backend: message
 *
 * to stderr (or to the file given to ksm_log_open_file, which SIGHUP can reopen), or with
 * KSM_LOG_FORMAT_JSON one JSON object per line for log collectors (docs/logging.md):
 *
 *     {"ts":"2026-11-22T03:17:28.123Z","level":"info","module":"backend","msg":"message"}
 *
 * plus the line's structured fields (ksm_log_write_fields). Tests can install their own sink to
 * capture lines. KSM_LOGD compiles out unless KSM_DEBUG is defined; KSM_LOG(KSM_LOG_DEBUG, ...)
 * does not (the lines --log-level debug is for).
 */
#pragma once

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum ksm_log_level {
    KSM_LOG_ERROR = 0,
    KSM_LOG_WARN = 1,
    KSM_LOG_INFO = 2,
    KSM_LOG_DEBUG = 3,
};

/* The sink receives the fully formatted message (no trailing newline). It may be called from
 * any thread, concurrently; it must not call KSM_LOG itself. */
typedef void (*ksm_log_sink_cb)(enum ksm_log_level level, const char *module, const char *msg,
                                void *user_data);

/* Installs sink (NULL restores the default stderr/file sink). Thread-safe. */
void ksm_log_set_sink(ksm_log_sink_cb sink, void *user_data);

/* Sets/gets the current threshold; lines above it are dropped before formatting. */
void ksm_log_set_level(enum ksm_log_level level);
enum ksm_log_level ksm_log_get_level(void);

/* Parses "error|warn|info|debug". Returns 0 or KSM_EINVAL. */
int ksm_log_level_parse(const char *s, enum ksm_log_level *out);
/* "error", "warn", "info", "debug". */
const char *ksm_log_level_name(enum ksm_log_level level);

/* The default sink's line format: text (the default) or one JSON object per line. */
enum ksm_log_format {
    KSM_LOG_FORMAT_TEXT = 0,
    KSM_LOG_FORMAT_JSON = 1,
};
void ksm_log_set_format(enum ksm_log_format format);
enum ksm_log_format ksm_log_get_format(void);
/* Parses "text|json". Returns 0 or KSM_EINVAL. */
int ksm_log_format_parse(const char *s, enum ksm_log_format *out);

/* The default sink writes to path (appending) instead of stderr. NULL returns to stderr.
 * Calling it again with the same path reopens the file (log rotation on SIGHUP).
 * Returns 0 or -errno; on failure the previous destination stays. */
int ksm_log_open_file(const char *path);
int ksm_log_reopen(void);

/* Formats and emits one line. Use the KSM_LOG macro instead, which checks the level first. */
void ksm_log_write(enum ksm_log_level level, const char *module, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

#define KSM_LOG(level, module, ...)                                                                \
    do {                                                                                           \
        if ((int)(level) <= (int)ksm_log_get_level())                                              \
            ksm_log_write((level), (module), __VA_ARGS__);                                         \
    } while (0)

/* A structured field of a line: in JSON output a member of its own (str, or num when str is NULL;
 * a non-finite num is null); text output and sinks get only the message, which should say the
 * same in words. */
struct ksm_log_field {
    const char *key;
    const char *str;
    double num;
};

/* ksm_log_write with fields (n of them). Use KSM_LOG_FIELDS, which checks the level first. */
void ksm_log_write_fields(enum ksm_log_level level, const char *module,
                          const struct ksm_log_field *fields, int n, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;

#define KSM_LOG_FIELDS(level, module, fields, n, ...)                                              \
    do {                                                                                           \
        if ((int)(level) <= (int)ksm_log_get_level())                                              \
            ksm_log_write_fields((level), (module), (fields), (n), __VA_ARGS__);                   \
    } while (0)

/* Writes s as a JSON string (quotes included) into out[cap]: '"', '\\' and control bytes
 * escaped, invalid UTF-8 bytes as \ufffd; cut at a character boundary when out is too small.
 * Returns the bytes written (out is always NUL-terminated). */
size_t ksm_log_json_string(char *out, size_t cap, const char *s);

/* A token bucket for lines that can repeat without end (a client retrying a failing call):
 * burst lines at once, then rate_per_s lines per second. Zero-initialised (full); one per source
 * of lines. ksm_log_ratelimit_allow returns whether to log this line; when it does, *suppressed
 * (may be NULL) = the lines refused since the last one it allowed, for a "suppressed N" line.
 * Thread-safe. The _at form takes the CLOCK_MONOTONIC time in ns (tests). */
struct ksm_log_ratelimit {
    bool started;
    double tokens;
    int64_t last_ns;
    uint64_t suppressed;
};
bool ksm_log_ratelimit_allow(struct ksm_log_ratelimit *rl, double rate_per_s, double burst,
                             uint64_t *suppressed);
bool ksm_log_ratelimit_allow_at(struct ksm_log_ratelimit *rl, double rate_per_s, double burst,
                                int64_t now_ns, uint64_t *suppressed);

#define KSM_LOGE(module, ...) KSM_LOG(KSM_LOG_ERROR, module, __VA_ARGS__)
#define KSM_LOGW(module, ...) KSM_LOG(KSM_LOG_WARN, module, __VA_ARGS__)
#define KSM_LOGI(module, ...) KSM_LOG(KSM_LOG_INFO, module, __VA_ARGS__)
#ifdef KSM_DEBUG
#define KSM_LOGD(module, ...) KSM_LOG(KSM_LOG_DEBUG, module, __VA_ARGS__)
#else
#define KSM_LOGD(module, ...) ((void)0)
#endif

/* Always-on invariant check for kasmina's own invariants (never for input): logs file and line
 * and aborts. */
void ksm_assert_fail(const char *expr, const char *file, int line)
#if defined(__GNUC__)
    __attribute__((noreturn))
#endif
    ;
#define KSM_ASSERT(x)                                                                              \
    do {                                                                                           \
        if (!(x)) ksm_assert_fail(#x, __FILE__, __LINE__);                                         \
    } while (0)

#ifdef __cplusplus
}
#endif
