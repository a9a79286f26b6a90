/*
 * A real kasminad for the rpc tests: started on a Unix socket in a fresh temporary directory
 * (--no-persist --cpu-devices 2), ready once health says SERVING, stopped with SIGTERM.
 * Header-only: each test binary includes it once.
 */
#pragma once

#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kasmina/client.h"

#ifndef KSM_KASMINAD
#define KSM_KASMINAD KSM_BUILD_DIR "/kasminad"
#endif

struct rpc_daemon {
    pid_t pid;
    char dir[256];
    char sock[300];
    char target[320];
};

/* Starts the daemon and waits (up to 20 s) until it serves. */
static void rpc_daemon_start(struct rpc_daemon *d)
{
    memset(d, 0, sizeof *d);
    snprintf(d->dir, sizeof d->dir, "/tmp/ksm-rpc-XXXXXX");
    cr_assert_not_null(mkdtemp(d->dir));
    snprintf(d->sock, sizeof d->sock, "%s/s.sock", d->dir);
    snprintf(d->target, sizeof d->target, "unix:%s", d->sock);
    char listen[320];
    snprintf(listen, sizeof listen, "unix:%s", d->sock);
    char log[300];
    snprintf(log, sizeof log, "%s/kasminad.log", d->dir);
    d->pid = fork();
    cr_assert_neq(d->pid, -1);
    if (d->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* a failed assertion must not leave a daemon behind */
        FILE *f = freopen(log, "w", stderr);
        (void)f;
        execl(KSM_KASMINAD, "kasminad", "--listen", listen, "--no-persist", "--cpu-devices", "2",
              "--log-level", "warn", (char *)NULL);
        _exit(127);
    }
    struct ksm_client_options o = {.deadline_ms = 20000, .wait_for_ready = true};
    ksm_client *c;
    struct ksm_client_error e;
    cr_assert_eq(ksm_client_connect(d->target, &o, &c, &e), 0, "%s", e.message);
    enum ksm_health_status st = KSM_HEALTH_UNKNOWN;
    int rc = ksm_client_health(c, "", &st, &e);
    ksm_client_close(c);
    cr_assert_eq(rc, 0, "kasminad did not come up on %s: %s (log %s)", d->target, e.message, log);
    cr_assert_eq(st, KSM_HEALTH_SERVING);
}

/* SIGTERM, wait; returns the exit status (0 = clean). Removes the directory. */
static int rpc_daemon_stop(struct rpc_daemon *d)
{
    int status = -1;
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

static ksm_client *rpc_connect(const struct rpc_daemon *d)
{
    ksm_client *c;
    struct ksm_client_error e;
    struct ksm_client_options o = {.deadline_ms = 30000};
    cr_assert_eq(ksm_client_connect(d->target, &o, &c, &e), 0, "%s", e.message);
    return c;
}
