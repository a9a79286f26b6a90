/*
 * kasmina logging.
 *
 * KSM_LOG checks the level before it formats anything (redis' serverLog), so a disabled debug
 * line costs one load and one compare. Lines go to a sink callback; the default sink writes
 *
 *     2026-11-22T03:17:28.123Z I backend: message
 *
 * to stderr (or to the file given to ksm_log_open_file, which SIGHUP can reopen). Tests can
 * install their own sink to capture lines. KSM_LOG_DEBUGF compiles out unless KSM_DEBUG is
 * defined.
 */
#pragma once

#include <stdarg.h>
#include <stdbool.h>

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
