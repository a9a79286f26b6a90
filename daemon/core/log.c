/* Logging: a level check before formatting, a pluggable sink, a reopenable file. */
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "kasmina/text.h"

static atomic_int log_level = KSM_LOG_INFO;
static atomic_int log_format = KSM_LOG_FORMAT_TEXT;
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static ksm_log_sink_cb log_sink;
static void *log_sink_data;
static FILE *log_file; /* NULL = stderr */
static char *log_path;

void ksm_log_set_level(enum ksm_log_level level)
{
    if (level < KSM_LOG_ERROR) level = KSM_LOG_ERROR;
    if (level > KSM_LOG_DEBUG) level = KSM_LOG_DEBUG;
    atomic_store_explicit(&log_level, (int)level, memory_order_relaxed);
}

enum ksm_log_level ksm_log_get_level(void)
{
    return (enum ksm_log_level)atomic_load_explicit(&log_level, memory_order_relaxed);
}

static const char *const level_names[] = {"error", "warn", "info", "debug"};

int ksm_log_level_parse(const char *s, enum ksm_log_level *out)
{
    if (s == NULL || out == NULL) return KSM_EINVAL;
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            *out = (enum ksm_log_level)i;
            return 0;
        }
    }
    return KSM_EINVAL;
}

const char *ksm_log_level_name(enum ksm_log_level level)
{
    return (int)level >= 0 && (int)level <= 3 ? level_names[level] : "error";
}

void ksm_log_set_format(enum ksm_log_format format)
{
    atomic_store_explicit(&log_format, format == KSM_LOG_FORMAT_JSON ? 1 : 0, memory_order_relaxed);
}

enum ksm_log_format ksm_log_get_format(void)
{
    return (enum ksm_log_format)atomic_load_explicit(&log_format, memory_order_relaxed);
}

int ksm_log_format_parse(const char *s, enum ksm_log_format *out)
{
    if (s == NULL || out == NULL) return KSM_EINVAL;
    if (strcasecmp(s, "text") == 0)
        *out = KSM_LOG_FORMAT_TEXT;
    else if (strcasecmp(s, "json") == 0)
        *out = KSM_LOG_FORMAT_JSON;
    else
        return KSM_EINVAL;
    return 0;
}

void ksm_log_set_sink(ksm_log_sink_cb sink, void *user_data)
{
    pthread_mutex_lock(&log_mu);
    log_sink = sink;
    log_sink_data = user_data;
    pthread_mutex_unlock(&log_mu);
}

static int open_locked(const char *path)
{
    FILE *f = fopen(path, "ae");
    if (f == NULL) return -errno;
    setvbuf(f, NULL, _IOLBF, 0);
    if (log_file != NULL) fclose(log_file);
    log_file = f;
    return 0;
}

int ksm_log_open_file(const char *path)
{
    int rc = 0;
    pthread_mutex_lock(&log_mu);
    if (path == NULL) {
        if (log_file != NULL) fclose(log_file);
        log_file = NULL;
        free(log_path);
        log_path = NULL;
    } else {
        char *copy = strdup(path);
        if (copy == NULL) {
            rc = KSM_ENOMEM;
        } else if ((rc = open_locked(path)) == 0) {
            free(log_path);
            log_path = copy;
        } else {
            free(copy);
        }
    }
    pthread_mutex_unlock(&log_mu);
    return rc;
}

int ksm_log_reopen(void)
{
    int rc = 0;
    pthread_mutex_lock(&log_mu);
    if (log_path != NULL) rc = open_locked(log_path);
    pthread_mutex_unlock(&log_mu);
    return rc;
}

static const char level_mark[] = {'E', 'W', 'I', 'D'};

/* Appends the bytes of s[0..n) to out[cap] at *len when they fit (else nothing: the caller's
 * string stops at a whole escape or character). */
static bool put(char *out, size_t cap, size_t *len, const char *s, size_t n)
{
    if (*len + n + 1 > cap) return false;
    memcpy(out + *len, s, n);
    *len += n;
    return true;
}

/* Length of the UTF-8 character that lead byte b starts (1 for a stray byte). */
static size_t utf8_len(unsigned char b)
{
    if (b >= 0xf0) return 4;
    if (b >= 0xe0) return 3;
    if (b >= 0xc0) return 2;
    return 1;
}

size_t ksm_log_json_string(char *out, size_t cap, const char *s)
{
    if (cap == 0) return 0;
    size_t len = 0;
    /* Room is kept for the closing quote and the NUL. */
    if (cap < 3) {
        out[0] = '\0';
        return 0;
    }
    out[len++] = '"';
    size_t room = cap - 1; /* the closing quote */
    for (const char *p = s ? s : ""; *p;) {
        unsigned char b = (unsigned char)*p;
        char esc[8];
        const char *piece = p;
        size_t n = 1, adv = 1;
        if (b == '"' || b == '\\') {
            esc[0] = '\\';
            esc[1] = (char)b;
            piece = esc;
            n = 2;
        } else if (b == '\n' || b == '\r' || b == '\t') {
            esc[0] = '\\';
            esc[1] = b == '\n' ? 'n' : b == '\r' ? 'r' : 't';
            piece = esc;
            n = 2;
        } else if (b < 0x20 || b == 0x7f) {
            snprintf(esc, sizeof esc, "\\u%04x", b);
            piece = esc;
            n = 6;
        } else if (b >= 0x80) {
            size_t want = utf8_len(b), avail = strnlen(p, want);
            if (want > 1 && avail == want && ksm_utf8_valid(p, want, NULL)) {
                n = adv = want;
            } else {
                piece = "\\ufffd";
                n = 6;
            }
        }
        if (!put(out, room, &len, piece, n)) break;
        p += adv;
    }
    out[len++] = '"';
    out[len] = '\0';
    return len;
}

/* The JSON line of a message and its fields, newline included. */
static void json_line(char *line, size_t cap, const char *when, enum ksm_log_level level,
                      const char *module, const struct ksm_log_field *f, int n, const char *msg)
{
    size_t len = (size_t)snprintf(line, cap, "{\"ts\":\"%s\",\"level\":\"%s\",\"module\":", when,
                                  level_names[level]);
    if (len >= cap) len = cap - 1;
    len += ksm_log_json_string(line + len, cap - len - 3, module);
    /* Fields first, the message last: a message cut for length loses its tail, not the fields. */
    for (int i = 0; i < n && f != NULL; i++) {
        if (f[i].key == NULL) continue;
        char key[80], val[400];
        ksm_log_json_string(key, sizeof key, f[i].key);
        if (f[i].str != NULL)
            ksm_log_json_string(val, sizeof val, f[i].str);
        else if (isfinite(f[i].num))
            snprintf(val, sizeof val, "%.15g", f[i].num);
        else
            snprintf(val, sizeof val, "null");
        int w = snprintf(line + len, cap - len, ",%s:%s", key, val);
        if (w < 0 || (size_t)w >= cap - len - 3) {
            line[len] = '\0';
            break;
        }
        len += (size_t)w;
    }
    if (len + 8 < cap) {
        memcpy(line + len, ",\"msg\":", 7);
        len += 7;
        len += ksm_log_json_string(line + len, cap - len - 2, msg);
    }
    line[len++] = '}';
    line[len++] = '\n';
    line[len] = '\0';
}

static void emit(enum ksm_log_level level, const char *module, const struct ksm_log_field *f, int n,
                 const char *msg)
{
    if (module == NULL) module = "-";
    if ((int)level < 0 || (int)level > 3) level = KSM_LOG_ERROR;

    pthread_mutex_lock(&log_mu);
    if (log_sink != NULL) {
        log_sink(level, module, msg, log_sink_data);
    } else {
        struct timespec ts;
        struct tm tm;
        char when[64], sec[32];
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        strftime(sec, sizeof sec, "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(when, sizeof when, "%s.%03dZ", sec, (int)(ts.tv_nsec / 1000000L) % 1000);
        FILE *out = log_file != NULL ? log_file : stderr;
        if (ksm_log_get_format() == KSM_LOG_FORMAT_JSON) {
            char line[4096];
            json_line(line, sizeof line, when, level, module, f, n, msg);
            fputs(line, out);
        } else {
            fprintf(out, "%s %c %s: %s\n", when, level_mark[level], module, msg);
        }
    }
    pthread_mutex_unlock(&log_mu);
}

void ksm_log_write(enum ksm_log_level level, const char *module, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    emit(level, module, NULL, 0, msg);
}

void ksm_log_write_fields(enum ksm_log_level level, const char *module,
                          const struct ksm_log_field *fields, int n, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    emit(level, module, fields, n, msg);
}

// ---- Rate limits ----

static pthread_mutex_t rl_mu = PTHREAD_MUTEX_INITIALIZER;

bool ksm_log_ratelimit_allow_at(struct ksm_log_ratelimit *rl, double rate_per_s, double burst,
                                int64_t now_ns, uint64_t *suppressed)
{
    pthread_mutex_lock(&rl_mu);
    if (!rl->started) {
        rl->started = true;
        rl->tokens = burst;
        rl->last_ns = now_ns;
    }
    if (now_ns > rl->last_ns) {
        rl->tokens += (double)(now_ns - rl->last_ns) * 1e-9 * rate_per_s;
        if (rl->tokens > burst) rl->tokens = burst;
        rl->last_ns = now_ns;
    }
    bool ok = rl->tokens >= 1.0;
    if (ok) {
        rl->tokens -= 1.0;
        if (suppressed != NULL) *suppressed = rl->suppressed;
        rl->suppressed = 0;
    } else {
        rl->suppressed++;
    }
    pthread_mutex_unlock(&rl_mu);
    return ok;
}

bool ksm_log_ratelimit_allow(struct ksm_log_ratelimit *rl, double rate_per_s, double burst,
                             uint64_t *suppressed)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ksm_log_ratelimit_allow_at(rl, rate_per_s, burst,
                                      (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec, suppressed);
}

void ksm_assert_fail(const char *expr, const char *file, int line)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "kasmina: assertion failed: %s (%s:%d)\n", expr, file, line);
    if (n > 0) {
        ssize_t w = write(STDERR_FILENO, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
        (void)w;
    }
    abort();
}
