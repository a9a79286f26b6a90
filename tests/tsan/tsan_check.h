/*
 * The tests/tsan programs' tiny harness: plain C, no Criterion (Criterion forks its tests, and
 * ThreadSanitizer aborts in forked children of a threaded process). CHECK prints the failed
 * condition and exits 1; ThreadSanitizer itself makes the process exit 66 on a report.
 */
#pragma once

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define CHECK_OK(expr)                                                                             \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        CHECK(rc_ == 0, "%s returned %d", #expr, rc_);                                             \
    } while (0)

static inline void run_threads(int n, void *(*fn)(void *), void *args, size_t arg_size)
{
    pthread_t th[64];
    CHECK(n <= 64, "too many threads");
    for (int i = 0; i < n; i++)
        CHECK_OK(pthread_create(&th[i], NULL, fn, (char *)args + (size_t)i * arg_size));
    for (int i = 0; i < n; i++) CHECK_OK(pthread_join(th[i], NULL));
}
