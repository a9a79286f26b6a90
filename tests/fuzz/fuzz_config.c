/*
 * fuzz_config: kasminad's option parsing (daemon/kasminad config.c) from its three sources.
 *
 * Input: [config file text] NUL [token] NUL [token] ... The file text (when not empty) is served
 * from a memfd as "--config /proc/self/fd/N"; a token "KASMINA_NAME=value" is set in the
 * environment for this input only; every other token is one argv word. So a config file alone,
 * a command line alone and their mix are all plain inputs.
 *
 * Oracles: no sanitizer report (ksm_config_fini frees everything: LeakSanitizer); a result of 0
 * has every option within its documented range; a failure returns KSM_EINVAL or 1 (--help).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"
#include "kasmina/errors.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_TOKENS 48

static int memfd = -1;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    memfd = memfd_create("kasmina-fuzz-config", MFD_CLOEXEC);
    if (memfd < 0) abort();
    /* The fuzzer's own environment must not leak into the inputs. */
    extern char **environ;
    for (int again = 1; again;) {
        again = 0;
        for (char **e = environ; *e != NULL; e++)
            if (strncmp(*e, "KASMINA_", 8) == 0) {
                char name[128];
                snprintf(name, sizeof name, "%.*s", (int)strcspn(*e, "="), *e);
                unsetenv(name);
                again = 1;
                break;
            }
    }
    return 0;
}

static void check_ranges(const struct ksm_config *c)
{
    if (c->n_listen > KSM_CFG_MAX_LISTEN) abort();
    for (size_t i = 0; i < c->n_listen; i++)
        if (c->listen[i] == NULL || c->listen[i][0] == '\0') abort();
    if (c->cpu_devices < 1 || c->cpu_devices > 16) abort();
    if (c->workers < 1 || c->workers > 64) abort();
    if (c->max_concurrent_calls < 1 || c->max_concurrent_calls > 100000) abort();
    if (c->max_message_bytes < 1024 || c->max_message_bytes > 2147483647u) abort();
    if (c->event_ring < 16 || c->event_ring > 1048576) abort();
    if (c->subscriber_buffer < 1 || c->subscriber_buffer > 1048576) abort();
    if (!(c->drain_timeout >= 0 && c->drain_timeout <= 3600)) abort();
    if (c->log_level == NULL) abort();
    if (c->state_dir != NULL && c->no_persist) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = malloc(size + 1);
    if (buf == NULL) return 0;
    memcpy(buf, data, size);
    buf[size] = '\0';
    const char *end = buf + size;

    char *argv[MAX_TOKENS + 4];
    char *envs[MAX_TOKENS];
    int argc = 0, n_env = 0;
    char fdpath[64];
    argv[argc++] = "kasminad";

    size_t file_len = strlen(buf);
    if (file_len > 0) {
        if (ftruncate(memfd, 0) != 0 || pwrite(memfd, buf, file_len, 0) != (ssize_t)file_len)
            abort();
        snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", memfd);
        argv[argc++] = "--config";
        argv[argc++] = fdpath;
    }
    for (char *p = buf + file_len + 1; p < end && argc < MAX_TOKENS + 3; p += strlen(p) + 1) {
        char *eq = strchr(p, '=');
        if (strncmp(p, "KASMINA_", 8) == 0 && eq != NULL && n_env < MAX_TOKENS) {
            *eq = '\0';
            if (setenv(p, eq + 1, 1) == 0) envs[n_env++] = p;
        } else {
            argv[argc++] = p;
        }
    }
    argv[argc] = NULL;

    struct ksm_config c;
    int rc = ksm_config_load(&c, argc, argv, "fuzz");
    if (rc == 0)
        check_ranges(&c);
    else if (rc != 1 && rc != KSM_EINVAL)
        abort();
    ksm_config_fini(&c);
    for (int i = 0; i < n_env; i++) unsetenv(envs[i]);
    free(buf);
    return 0;
}
