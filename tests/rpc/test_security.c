/*
 * Security of a real kasminad: TLS and mTLS with certificates made here by openssl, the bearer
 * token, socket permissions and the start-up checks. Every refused client is followed by a call
 * that must still succeed: a refusal never takes the daemon down.
 */
#include <grp.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sec_daemon.h"

TestSuite(security, .timeout = 120);

static char *path_in(const struct sec_daemon *d, const char *name)
{
    static char buf[8][320];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 320, "%s/%s", d->dir, name);
    return p;
}

/* A call over TCP with the given TLS material; returns its code (0 = served). */
static int tcp_call(const struct sec_daemon *d, const char *host, bool tls, const char *ca,
                    const char *cert, const char *key, const char *token, char *msg, size_t len)
{
    char target[64];
    snprintf(target, sizeof target, "%s:%d", host, d->port);
    struct ksm_client_options o = {.deadline_ms = 5000,
                                   .tls = tls,
                                   .tls_ca_file = ca,
                                   .tls_cert_file = cert,
                                   .tls_key_file = key,
                                   .bearer_token = token};
    ksm_client *c;
    struct ksm_client_error e;
    cr_assert_eq(ksm_client_connect(target, &o, &c, &e), 0, "%s", e.message);
    struct ksm_client_server_info info;
    memset(&info, 0, sizeof info);
    int rc = ksm_client_server_info(c, &info, &e);
    if (rc == 0) {
        cr_expect_str_eq(info.name, "kasminad");
        ksm_client_server_info_free(&info);
    }
    if (msg) snprintf(msg, len, "%s", e.message);
    ksm_client_close(c);
    return rc;
}

static void expect_unix_serves(const struct sec_daemon *d, const char *token)
{
    struct ksm_client_options o = {.deadline_ms = 10000, .bearer_token = token};
    ksm_client *c = sec_connect(d->target, &o);
    struct ksm_client_error e;
    struct ksm_model_info *list = NULL;
    size_t n = 0;
    cr_assert_eq(ksm_client_model_list(c, &list, &n, &e), 0, "the daemon stopped serving: %s",
                 e.message);
    free(list);
    ksm_client_close(c);
    cr_assert(sec_alive(d));
}

Test(security, mtls_accepts_the_right_certificate_and_refuses_the_rest)
{
    struct sec_daemon d;
    sec_dir(&d);
    sec_make_certs(d.dir);
    const char *args[] = {"--listen",
                          "127.0.0.1:0",
                          "--tls-cert",
                          path_in(&d, "server.pem"),
                          "--tls-key",
                          path_in(&d, "server.key"),
                          "--tls-client-ca",
                          path_in(&d, "ca.pem"),
                          NULL};
    sec_start(&d, args);
    cr_assert_gt(d.port, 0, "no TCP port in the log:\n%s", sec_log(&d));
    cr_assert_not_null(strstr(sec_log(&d), "TLS, client certificates required"));
    const char *ca = path_in(&d, "ca.pem"), *cert = path_in(&d, "client.pem"),
               *key = path_in(&d, "client.key");
    char msg[512];
    /* The right certificate, by name and by address. */
    cr_assert_eq(tcp_call(&d, "localhost", true, ca, cert, key, NULL, msg, sizeof msg), 0, "%s",
                 msg);
    cr_assert_eq(tcp_call(&d, "127.0.0.1", true, ca, cert, key, NULL, msg, sizeof msg), 0, "%s",
                 msg);
    /* No client certificate. */
    int rc = tcp_call(&d, "localhost", true, ca, NULL, NULL, NULL, msg, sizeof msg);
    cr_expect_eq(rc, KSM_ENOTREADY, "no client certificate: %s (%s)", ksm_err_name(rc), msg);
    expect_unix_serves(&d, NULL);
    /* A client certificate from another CA. */
    rc = tcp_call(&d, "localhost", true, ca, path_in(&d, "rogue.pem"), path_in(&d, "rogue.key"),
                  NULL, msg, sizeof msg);
    cr_expect_eq(rc, KSM_ENOTREADY, "wrong CA: %s (%s)", ksm_err_name(rc), msg);
    /* A client that trusts another CA refuses the server. */
    rc = tcp_call(&d, "localhost", true, path_in(&d, "other-ca.pem"), cert, key, NULL, msg,
                  sizeof msg);
    cr_expect_eq(rc, KSM_ENOTREADY, "server from an untrusted CA: %s (%s)", ksm_err_name(rc), msg);
    /* Plaintext on the TLS port. */
    rc = tcp_call(&d, "127.0.0.1", false, NULL, NULL, NULL, NULL, msg, sizeof msg);
    cr_expect_eq(rc, KSM_ENOTREADY, "plaintext on a TLS port: %s (%s)", ksm_err_name(rc), msg);
    /* Still serving, over both listeners. */
    cr_assert_eq(tcp_call(&d, "localhost", true, ca, cert, key, NULL, msg, sizeof msg), 0, "%s",
                 msg);
    expect_unix_serves(&d, NULL);
    cr_expect_eq(sec_stop(&d), 0);
}

Test(security, tls_without_client_ca_needs_no_client_certificate)
{
    struct sec_daemon d;
    sec_dir(&d);
    sec_make_certs(d.dir);
    const char *args[] = {"--listen",   "127.0.0.1:0",
                          "--tls-cert", path_in(&d, "server.pem"),
                          "--tls-key",  path_in(&d, "server.key"),
                          NULL};
    sec_start(&d, args);
    cr_assert_not_null(strstr(sec_log(&d), "(TLS)"), "%s", sec_log(&d));
    char msg[512];
    cr_assert_eq(
        tcp_call(&d, "localhost", true, path_in(&d, "ca.pem"), NULL, NULL, NULL, msg, sizeof msg),
        0, "%s", msg);
    int rc = tcp_call(&d, "127.0.0.1", false, NULL, NULL, NULL, NULL, msg, sizeof msg);
    cr_expect_eq(rc, KSM_ENOTREADY, "plaintext on a TLS port: %s (%s)", ksm_err_name(rc), msg);
    cr_assert_eq(
        tcp_call(&d, "localhost", true, path_in(&d, "ca.pem"), NULL, NULL, NULL, msg, sizeof msg),
        0, "%s", msg);
    cr_expect_eq(sec_stop(&d), 0);
}

Test(security, a_non_loopback_listener_needs_tls)
{
    struct sec_daemon d;
    sec_dir(&d);
    const char *args[] = {"--listen", "0.0.0.0:0", NULL};
    sec_spawn(&d, args);
    cr_expect_neq(sec_wait_exit(&d), 0);
    cr_expect_not_null(strstr(sec_log(&d), "'0.0.0.0:0' is not a loopback address: a remote TCP "
                                           "listener needs TLS"),
                       "%s", sec_log(&d));
    cr_expect_neq(access(d.sock, F_OK), 0, "the Unix socket was left behind");
    /* With TLS it serves (reached over loopback here). */
    sec_make_certs(d.dir);
    const char *tls[] = {"--listen",   "0.0.0.0:0",
                         "--tls-cert", path_in(&d, "server.pem"),
                         "--tls-key",  path_in(&d, "server.key"),
                         NULL};
    sec_start(&d, tls);
    char msg[512];
    cr_assert_eq(
        tcp_call(&d, "localhost", true, path_in(&d, "ca.pem"), NULL, NULL, NULL, msg, sizeof msg),
        0, "%s", msg);
    kill(d.pid, SIGTERM);
    cr_expect_eq(sec_wait_exit(&d), 0);
    /* The explicit insecure exception (kubelet probes on a pod IP) is logged as such. */
    const char *plain[] = {"--listen", "0.0.0.0:0", "--allow-remote-tcp", NULL};
    sec_start(&d, plain);
    cr_expect_not_null(strstr(sec_log(&d), "serves plaintext off loopback (allow-remote-tcp)"),
                       "%s", sec_log(&d));
    cr_assert_eq(tcp_call(&d, "127.0.0.1", false, NULL, NULL, NULL, NULL, msg, sizeof msg), 0, "%s",
                 msg);
    cr_expect_eq(sec_stop(&d), 0);
}

static void expect_auth_failure(ksm_client *c, const char *want)
{
    struct ksm_client_error e;
    struct ksm_model_info *list = NULL;
    size_t n = 0;
    int rc = ksm_client_model_list(c, &list, &n, &e);
    free(list);
    cr_expect_eq(rc, KSM_EAUTH, "%s (%s)", ksm_err_name(rc), e.message);
    cr_expect_eq(e.grpc_status, 16 /* UNAUTHENTICATED */);
    cr_expect_str_eq(e.message, want);
}

static int stop_after_one(void *ud, uint64_t seq, const struct ksm_lifecycle_event *ev)
{
    (void)ud, (void)seq, (void)ev;
    return 1;
}

Test(security, bearer_token_is_required_except_for_health)
{
    struct sec_daemon d;
    sec_dir(&d);
    char tok[320];
    sec_write_file(d.dir, "token", "k7Qw-9xZ_secret-token\n", 0600, tok, sizeof tok);
    const char *args[] = {"--token-file", tok, NULL};
    sec_start(&d, args); /* readiness: health over the socket without a token */
    const char *missing = "The call needs a bearer token (metadata authorization: Bearer <token>).";
    const char *wrong = "The bearer token is not valid.";

    ksm_client *none = sec_connect(d.target, NULL);
    expect_auth_failure(none, missing);
    /* WatchEvents is guarded too. */
    struct ksm_client_error e;
    int rc = ksm_client_watch_events(none, "", 0, 200, stop_after_one, NULL, &e);
    cr_expect_eq(rc, KSM_EAUTH, "WatchEvents without a token: %s (%s)", ksm_err_name(rc),
                 e.message);
    /* Health stays open for probes. */
    enum ksm_health_status st = KSM_HEALTH_UNKNOWN;
    cr_expect_eq(ksm_client_health(none, "", &st, &e), 0, "%s", e.message);
    cr_expect_eq(st, KSM_HEALTH_SERVING);
    ksm_client_close(none);

    const char *bad[] = {"k7Qw-9xZ_secret-tokeN", "k7Qw-9xZ_secret-toke", "k7Qw-9xZ_secret-token2",
                         "x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct ksm_client_options o = {.deadline_ms = 10000, .bearer_token = bad[i]};
        ksm_client *c = sec_connect(d.target, &o);
        expect_auth_failure(c, wrong);
        ksm_client_close(c);
    }
    /* The right token (the file's trailing newline is not part of it). */
    expect_unix_serves(&d, "k7Qw-9xZ_secret-token");
    /* The token never reaches the log. */
    cr_expect_null(strstr(sec_log(&d), "secret-token"), "the log holds the token:\n%s",
                   sec_log(&d));
    /* Refusals are logged at most once a second (the first one was "no bearer token"): a wrong
     * token a second later has a line of its own (rpc_hostile counts the lines left out). */
    usleep(1100 * 1000);
    struct ksm_client_options o = {.deadline_ms = 10000, .bearer_token = "x"};
    ksm_client *late = sec_connect(d.target, &o);
    expect_auth_failure(late, wrong);
    ksm_client_close(late);
    cr_expect_not_null(strstr(sec_log(&d), "refused: wrong bearer token"), "%s", sec_log(&d));
    cr_expect_eq(sec_stop(&d), 0);
}

Test(security, token_and_mtls_together)
{
    struct sec_daemon d;
    sec_dir(&d);
    sec_make_certs(d.dir);
    char tok[320];
    sec_write_file(d.dir, "token", "tcp-token-42", 0400, tok, sizeof tok);
    const char *args[] = {"--listen",
                          "127.0.0.1:0",
                          "--tls-cert",
                          path_in(&d, "server.pem"),
                          "--tls-key",
                          path_in(&d, "server.key"),
                          "--tls-client-ca",
                          path_in(&d, "ca.pem"),
                          "--token-file",
                          tok,
                          NULL};
    sec_start(&d, args);
    const char *ca = path_in(&d, "ca.pem"), *cert = path_in(&d, "client.pem"),
               *key = path_in(&d, "client.key");
    char msg[512];
    cr_expect_eq(tcp_call(&d, "localhost", true, ca, cert, key, "tcp-token-42", msg, sizeof msg), 0,
                 "%s", msg);
    cr_expect_eq(tcp_call(&d, "localhost", true, ca, cert, key, "tcp-token-41", msg, sizeof msg),
                 KSM_EAUTH, "%s", msg);
    cr_expect_eq(tcp_call(&d, "localhost", true, ca, cert, key, NULL, msg, sizeof msg), KSM_EAUTH,
                 "%s", msg);
    cr_expect_eq(tcp_call(&d, "localhost", true, ca, cert, key, "tcp-token-42", msg, sizeof msg), 0,
                 "%s", msg);
    cr_expect_eq(sec_stop(&d), 0);
}

static void expect_startup_refused(const char *const *args, const char *want, const char *setup)
{
    struct sec_daemon d;
    sec_dir(&d);
    char p[320];
    if (setup != NULL) sec_write_file(d.dir, "token", setup, 0644, p, sizeof p);
    const char *full[16];
    int n = 0;
    for (int i = 0; args[i]; i++) {
        if (strcmp(args[i], "@token") == 0) {
            snprintf(p, sizeof p, "%s/token", d.dir);
            full[n++] = p;
        } else {
            full[n++] = args[i];
        }
    }
    full[n] = NULL;
    sec_spawn(&d, full);
    int st = sec_wait_exit(&d);
    cr_expect_neq(st, 0, "kasminad started with %s", args[1]);
    cr_expect_not_null(strstr(sec_log(&d), want), "want '%s' in:\n%s", want, sec_log(&d));
    sec_stop(&d);
}

Test(security, bad_token_files_and_tls_options_are_refused_at_start_up)
{
    const char *tok[] = {"--token-file", "@token", NULL};
    /* Group/world-readable token file (0644). */
    expect_startup_refused(tok, "option --token-file: '/tmp/ksm-sec-", "abc\n");
    expect_startup_refused(tok, "must not be accessible by group or others (mode 0644)", "abc\n");
    const char *missing[] = {"--token-file", "/nonexistent/token", NULL};
    expect_startup_refused(missing, "option --token-file: cannot open '/nonexistent/token'", NULL);
    const char *half[] = {"--tls-cert", "/nonexistent/cert.pem", NULL};
    expect_startup_refused(half, "options --tls-cert and --tls-key must be given together", NULL);
    const char *group[] = {"--socket-group", "no-such-group-kasmina", NULL};
    expect_startup_refused(group, "option --socket-group: no group named 'no-such-group-kasmina'",
                           NULL);
}

Test(security, empty_or_spaced_tokens_are_refused)
{
    struct sec_daemon d;
    sec_dir(&d);
    char p[320];
    sec_write_file(d.dir, "token", "two words\n", 0600, p, sizeof p);
    const char *args[] = {"--token-file", p, NULL};
    sec_spawn(&d, args);
    cr_expect_neq(sec_wait_exit(&d), 0);
    cr_expect_not_null(strstr(sec_log(&d), "must hold one token of visible ASCII"), "%s",
                       sec_log(&d));
    cr_expect_null(strstr(sec_log(&d), "two words"), "the log holds the token");
    sec_write_file(d.dir, "token", "\n\n", 0600, p, sizeof p);
    sec_spawn(&d, args);
    cr_expect_neq(sec_wait_exit(&d), 0);
    sec_stop(&d);
}

Test(security, unix_socket_permissions)
{
    struct sec_daemon d;
    sec_dir(&d);
    sec_start(&d, NULL);
    struct stat st, dst;
    char dir[320];
    snprintf(dir, sizeof dir, "%s/run", d.dir);
    cr_assert_eq(stat(d.sock, &st), 0);
    cr_assert_eq(stat(dir, &dst), 0);
    cr_expect(S_ISSOCK(st.st_mode));
    cr_expect_eq(st.st_mode & 0777, 0600, "socket mode %o", st.st_mode & 0777);
    cr_expect_eq(dst.st_mode & 0777, 0700, "directory mode %o", dst.st_mode & 0777);
    cr_expect_eq(sec_stop(&d), 0);

    /* socket-group: a group this process may give files to (root: any; else a supplementary
     * group, else its own). */
    gid_t gid = getegid();
    const char *gname = NULL;
    if (geteuid() == 0) {
        struct group *g = getgrnam("daemon");
        if (g != NULL) gid = g->gr_gid, gname = "daemon";
    } else {
        gid_t groups[64];
        int n = getgroups(64, groups);
        for (int i = 0; i < n; i++)
            if (groups[i] != getegid()) gid = groups[i];
    }
    char gnum[32];
    snprintf(gnum, sizeof gnum, "%u", (unsigned)gid);
    sec_dir(&d);
    const char *args[] = {"--socket-group", gname != NULL ? gname : gnum, NULL};
    sec_start(&d, args);
    snprintf(dir, sizeof dir, "%s/run", d.dir);
    cr_assert_eq(stat(d.sock, &st), 0);
    cr_assert_eq(stat(dir, &dst), 0);
    cr_expect_eq(st.st_mode & 0777, 0660, "socket mode %o", st.st_mode & 0777);
    cr_expect_eq(st.st_gid, gid, "socket group %u, want %u", (unsigned)st.st_gid, (unsigned)gid);
    cr_expect_eq(dst.st_mode & 0777, 0750, "directory mode %o", dst.st_mode & 0777);
    cr_expect_eq(dst.st_gid, gid);
    expect_unix_serves(&d, NULL);
    cr_expect_eq(sec_stop(&d), 0);
}
