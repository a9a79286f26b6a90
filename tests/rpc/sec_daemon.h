/*
 * A real kasminad with extra options for the security, limits and soak tests: a Unix socket in a
 * fresh temporary directory (health over it stays open, so readiness never needs TLS or a
 * token), optional TCP listeners whose bound port is read from the log, and test certificates
 * made with openssl. Header-only: each test binary includes it once.
 */
#pragma once

#include <criterion/criterion.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kasmina/client.h"

#ifndef KSM_KASMINAD
#define KSM_KASMINAD KSM_BUILD_DIR "/kasminad"
#endif

struct sec_daemon {
    pid_t pid;
    char dir[256];
    char sock[300];
    char target[320]; /* unix:... */
    char log[300];
    int port; /* first TCP listener's bound port, 0 if none */
};

static __attribute__((unused)) void sec_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* A fresh directory for the daemon (and the test's own files). */
static __attribute__((unused)) void sec_dir(struct sec_daemon *d)
{
    memset(d, 0, sizeof *d);
    snprintf(d->dir, sizeof d->dir, "/tmp/ksm-sec-XXXXXX");
    cr_assert_not_null(mkdtemp(d->dir));
    snprintf(d->sock, sizeof d->sock, "%s/run/s.sock", d->dir);
    snprintf(d->target, sizeof d->target, "unix:%s", d->sock);
    snprintf(d->log, sizeof d->log, "%s/kasminad.log", d->dir);
}

/* The log so far (static buffer). */
static __attribute__((unused)) const char *sec_log(const struct sec_daemon *d)
{
    static char buf[65536];
    buf[0] = '\0';
    FILE *f = fopen(d->log, "r");
    if (f == NULL) return buf;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* Starts kasminad with "--listen unix:<sock> --no-persist --no-cuda --log-level info" and extra
 * (NULL-terminated) after them. */
static __attribute__((unused)) void sec_spawn(struct sec_daemon *d, const char *const *extra)
{
    const char *argv[64];
    int n = 0;
    char listen[320];
    snprintf(listen, sizeof listen, "unix:%s", d->sock);
    const char *base[] = {"kasminad",  "--listen",    listen, "--no-persist",
                          "--no-cuda", "--log-level", "info", NULL};
    for (int i = 0; base[i]; i++) argv[n++] = base[i];
    for (int i = 0; extra && extra[i] && n < 62; i++) argv[n++] = extra[i];
    argv[n] = NULL;
    d->pid = fork();
    cr_assert_neq(d->pid, -1);
    if (d->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* a failed assertion must not leave a daemon behind */
        FILE *f = freopen(d->log, "w", stderr);
        (void)f;
        execv(KSM_KASMINAD, (char *const *)argv);
        _exit(127);
    }
}

/* Waits (up to 20 s) until health over the Unix socket says SERVING; reads the TCP port. */
static __attribute__((unused)) void sec_wait_ready(struct sec_daemon *d)
{
    struct ksm_client_options o = {.deadline_ms = 20000, .wait_for_ready = true};
    ksm_client *c;
    struct ksm_client_error e;
    cr_assert_eq(ksm_client_connect(d->target, &o, &c, &e), 0, "%s", e.message);
    enum ksm_health_status st = KSM_HEALTH_UNKNOWN;
    int rc = ksm_client_health(c, "", &st, &e);
    ksm_client_close(c);
    cr_assert_eq(rc, 0, "kasminad did not come up: %s; log:\n%s", e.message, sec_log(d));
    cr_assert_eq(st, KSM_HEALTH_SERVING);
    const char *p = strstr(sec_log(d), "listening on 127.0.0.1:");
    if (p == NULL) p = strstr(sec_log(d), "listening on 0.0.0.0:");
    if (p != NULL) d->port = atoi(strchr(p + 13, ':') + 1);
}

static __attribute__((unused)) void sec_start(struct sec_daemon *d, const char *const *extra)
{
    sec_spawn(d, extra);
    sec_wait_ready(d);
}

/* For start-up failures: waits (up to 20 s) for the exit; returns the exit status. */
static __attribute__((unused)) int sec_wait_exit(struct sec_daemon *d)
{
    int status = 0;
    for (int i = 0; i < 400; i++) {
        pid_t r = waitpid(d->pid, &status, WNOHANG);
        if (r == d->pid) {
            d->pid = 0;
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
        }
        sec_sleep_ms(50);
    }
    cr_assert_fail("kasminad did not exit; log:\n%s", sec_log(d));
    return -1;
}

static __attribute__((unused)) bool sec_alive(const struct sec_daemon *d)
{
    return d->pid > 0 && waitpid(d->pid, NULL, WNOHANG) == 0;
}

/* SIGTERM, wait; returns the exit status (0 = clean). Removes the directory. */
static __attribute__((unused)) int sec_stop(struct sec_daemon *d)
{
    int status = 0;
    if (d->pid > 0) {
        kill(d->pid, SIGTERM);
        waitpid(d->pid, &status, 0);
        d->pid = 0;
    }
    char cmd[320];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d->dir);
    if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", d->dir);
    return WIFEXITED(status) ? WEXITSTATUS(status)
                             : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

static __attribute__((unused)) ksm_client *sec_connect(const char *target,
                                                       const struct ksm_client_options *opts)
{
    ksm_client *c;
    struct ksm_client_error e;
    struct ksm_client_options o = {.deadline_ms = 30000};
    cr_assert_eq(ksm_client_connect(target, opts ? opts : &o, &c, &e), 0, "%s", e.message);
    return c;
}

/* Writes text to dir/name with mode. */
static __attribute__((unused)) void sec_write_file(const char *dir, const char *name,
                                                   const char *text, mode_t mode, char *path,
                                                   size_t len)
{
    snprintf(path, len, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "%s: %s", path, strerror(errno));
    fputs(text, f);
    fclose(f);
    cr_assert_eq(chmod(path, mode), 0);
}

/* Test PKI under dir (EC P-256, fast): ca.pem (CA), server.pem/.key (localhost, 127.0.0.1,
 * signed by ca), client.pem/.key (signed by ca), other-ca.pem and rogue.pem/.key (a client
 * certificate signed by other-ca). */
static __attribute__((unused)) void sec_make_certs(const char *dir)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "set -e; cd '%s'; K='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'; "
             "openssl req -x509 $K -keyout ca.key -out ca.pem -days 2 -subj '/CN=kasmina test "
             "CA'; "
             "openssl req -x509 $K -keyout other-ca.key -out other-ca.pem -days 2 -subj "
             "'/CN=other CA'; "
             "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' "
             "> server.ext; "
             "printf 'extendedKeyUsage=clientAuth\\n' > client.ext; "
             "openssl req $K -keyout server.key -out server.csr -subj '/CN=localhost'; "
             "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out "
             "server.pem -days 2 -extfile server.ext; "
             "openssl req $K -keyout client.key -out client.csr -subj '/CN=client'; "
             "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out "
             "client.pem -days 2 -extfile client.ext; "
             "openssl req $K -keyout rogue.key -out rogue.csr -subj '/CN=rogue'; "
             "openssl x509 -req -in rogue.csr -CA other-ca.pem -CAkey other-ca.key "
             "-CAcreateserial -out rogue.pem -days 2 -extfile client.ext; "
             "chmod 600 *.key",
             dir);
    char full[4200];
    snprintf(full, sizeof full, "(%s) >'%s/openssl.log' 2>&1", cmd, dir);
    cr_assert_eq(system(full), 0, "openssl failed (see %s/openssl.log)", dir);
}
