/* Logging: a level check before formatting, a pluggable sink, a reopenable file. */
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

static atomic_int log_level = KSM_LOG_INFO;
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

int ksm_log_level_parse(const char *s, enum ksm_log_level *out)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    if (s == NULL || out == NULL) return KSM_EINVAL;
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, names[i]) == 0) {
            *out = (enum ksm_log_level)i;
            return 0;
        }
    }
    return KSM_EINVAL;
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

void ksm_log_write(enum ksm_log_level level, const char *module, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (module == NULL) module = "-";
    if ((int)level < 0 || (int)level > 3) level = KSM_LOG_ERROR;

    pthread_mutex_lock(&log_mu);
    if (log_sink != NULL) {
        log_sink(level, module, msg, log_sink_data);
    } else {
        struct timespec ts;
        struct tm tm;
        char when[32];
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
        fprintf(log_file != NULL ? log_file : stderr, "%s.%03ldZ %c %s: %s\n", when,
                ts.tv_nsec / 1000000L, level_mark[level], module, msg);
    }
    pthread_mutex_unlock(&log_mu);
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
