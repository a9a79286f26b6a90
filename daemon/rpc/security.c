/*
 * rpc/security: who may talk to kasminad.
 *
 * - Unix sockets: mode 0600 in a 0700 directory; with socket-group, 0660 and the group, the
 *   directory 0750 and the group (only a directory the daemon owns and that is not shared, such
 *   as /tmp, is changed).
 * - TCP: plaintext only on loopback; a non-loopback address needs TLS (tls-cert + tls-key), or
 *   the explicit insecure allow-remote-tcp (a pod network behind a policy: kubelet probes). With
 *   TLS configured, every TCP listener uses it; with tls-client-ca the server requires and
 *   verifies client certificates (mTLS). Unix sockets stay plaintext.
 * - Bearer token (token-file): every call except grpc.health.v1 (so that probes work) needs the
 *   metadata "authorization: Bearer <token>", compared in constant time; a missing or wrong one
 *   gets UNAUTHENTICATED. The token is never logged and its memory is wiped on exit; refusals
 *   are logged at most once a second, with the count of those left out.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "rpc/server_impl.h"

#define SECRET_MAX (1u << 20) /* a PEM bundle or a token file larger than this is refused */

static void wipe_free(char *p, size_t n)
{
    if (p == NULL) return;
    volatile char *v = p;
    for (size_t i = 0; i < n; i++) v[i] = 0;
    free(p);
}

/* Reads a whole small file. private_only: refuse group/other permission bits. */
static int read_secret(const char *opt, const char *path, bool private_only, char **out,
                       size_t *len, char *err, size_t errlen)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "option --%s: cannot open '%s': %s", opt, path, strerror(errno));
        return KSM_EINVAL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "option --%s: '%s' is not a regular file", opt, path);
        close(fd);
        return KSM_EINVAL;
    }
    if (private_only && (st.st_mode & 077) != 0) {
        snprintf(err, errlen,
                 "option --%s: '%s' must not be accessible by group or others (mode %04o); run "
                 "chmod 600 on it",
                 opt, path, (unsigned)(st.st_mode & 07777));
        close(fd);
        return KSM_EINVAL;
    }
    if (st.st_size <= 0 || (uint64_t)st.st_size > SECRET_MAX) {
        snprintf(err, errlen, "option --%s: '%s' is %s", opt, path,
                 st.st_size <= 0 ? "empty" : "larger than 1 MiB");
        close(fd);
        return KSM_EINVAL;
    }
    size_t n = (size_t)st.st_size;
    char *buf = malloc(n + 1);
    if (buf == NULL) {
        close(fd);
        return KSM_ENOMEM;
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    if (got != n) {
        wipe_free(buf, n + 1);
        snprintf(err, errlen, "option --%s: cannot read '%s'", opt, path);
        return KSM_EINVAL;
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return 0;
}

static int read_pem(const char *opt, const char *path, const char *marker, bool private_only,
                    char **out, char *err, size_t errlen)
{
    size_t len;
    int rc = read_secret(opt, path, false, out, &len, err, errlen);
    if (rc != 0) return rc;
    if (strlen(*out) != len || strstr(*out, marker) == NULL) {
        wipe_free(*out, len);
        *out = NULL;
        snprintf(err, errlen, "option --%s: '%s' holds no PEM %s", opt, path,
                 strstr(marker, "KEY") ? "private key" : "certificate");
        return KSM_EINVAL;
    }
    struct stat st;
    if (private_only && stat(path, &st) == 0 && (st.st_mode & 077) != 0)
        KSM_LOGW("rpc", "the TLS key %s is accessible by group or others (mode %04o)", path,
                 (unsigned)(st.st_mode & 07777));
    return 0;
}

static int read_token(ksm_rpc_server *s, const char *path, char *err, size_t errlen)
{
    char *buf;
    size_t len;
    int rc = read_secret("token-file", path, true, &buf, &len, err, errlen);
    if (rc != 0) return rc;
    size_t n = len;
    while (n > 0 && isspace((unsigned char)buf[n - 1])) n--; /* a trailing newline is fine */
    bool ok = n > 0;
    for (size_t i = 0; ok && i < n; i++) ok = buf[i] > 0x20 && buf[i] < 0x7f;
    if (!ok) {
        wipe_free(buf, len + 1);
        snprintf(err, errlen,
                 "option --token-file: '%s' must hold one token of visible ASCII characters "
                 "(no spaces)",
                 path);
        return KSM_EINVAL;
    }
    buf[n] = '\0';
    s->token = buf;
    s->token_len = n;
    return 0;
}

static int resolve_group(ksm_rpc_server *s, const char *name, char *err, size_t errlen)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(name, &end, 10);
    if (name[0] != '\0' && *end == '\0' && errno == 0 && v < UINT32_MAX) {
        s->sock_gid = (unsigned)v;
    } else {
        struct group gr, *res = NULL;
        char buf[4096];
        if (getgrnam_r(name, &gr, buf, sizeof buf, &res) != 0 || res == NULL) {
            snprintf(err, errlen, "option --socket-group: no group named '%s'", name);
            return KSM_EINVAL;
        }
        s->sock_gid = (unsigned)gr.gr_gid;
    }
    s->have_gid = true;
    return 0;
}

int rpc_security_init(ksm_rpc_server *s, char *err, size_t errlen)
{
    const struct ksm_rpc_server_config *c = &s->cfg;
    int rc;
    if ((c->tls_cert_file != NULL) != (c->tls_key_file != NULL)) {
        snprintf(err, errlen, "options --tls-cert and --tls-key must be given together");
        return KSM_EINVAL;
    }
    if (c->tls_client_ca_file != NULL && c->tls_cert_file == NULL) {
        snprintf(err, errlen, "option --tls-client-ca needs --tls-cert and --tls-key");
        return KSM_EINVAL;
    }
    if (c->socket_group != NULL && (rc = resolve_group(s, c->socket_group, err, errlen)) != 0)
        return rc;
    if (c->tls_cert_file != NULL) {
        if ((rc = read_pem("tls-cert", c->tls_cert_file, "-----BEGIN CERTIFICATE-----", false,
                           &s->tls_cert_pem, err, errlen)) != 0 ||
            (rc = read_pem("tls-key", c->tls_key_file, "PRIVATE KEY-----", true, &s->tls_key_pem,
                           err, errlen)) != 0)
            return rc;
    }
    if (c->tls_client_ca_file != NULL &&
        (rc = read_pem("tls-client-ca", c->tls_client_ca_file, "-----BEGIN CERTIFICATE-----", false,
                       &s->tls_ca_pem, err, errlen)) != 0)
        return rc;
    if (c->token_file != NULL && (rc = read_token(s, c->token_file, err, errlen)) != 0) return rc;
    if (s->token != NULL)
        KSM_LOGI("rpc", "bearer token required (from %s); grpc.health.v1 stays open",
                 c->token_file);
    return 0;
}

void rpc_security_fini(ksm_rpc_server *s)
{
    wipe_free(s->token, s->token_len);
    s->token = NULL;
    s->token_len = 0;
    if (s->tls_key_pem != NULL) wipe_free(s->tls_key_pem, strlen(s->tls_key_pem));
    free(s->tls_cert_pem);
    free(s->tls_ca_pem);
    s->tls_key_pem = s->tls_cert_pem = s->tls_ca_pem = NULL;
}

grpc_server_credentials *rpc_listener_creds(ksm_rpc_server *s, const char *addr, bool tcp,
                                            bool loopback, char *err, size_t errlen)
{
    if (!tcp || s->tls_cert_pem == NULL) {
        if (tcp && !loopback && !s->cfg.allow_remote_tcp) {
            snprintf(err, errlen,
                     "listen address '%s' is not a loopback address: a remote TCP listener needs "
                     "TLS (tls-cert and tls-key), or allow-remote-tcp for plaintext behind a "
                     "network policy",
                     addr);
            return NULL;
        }
        if (tcp && !loopback)
            KSM_LOGW("rpc",
                     "%s serves plaintext off loopback (allow-remote-tcp): anyone who "
                     "reaches it can drive kasminad%s",
                     addr, s->token != NULL ? " with the token" : "");
        return grpc_insecure_server_credentials_create();
    }
    grpc_ssl_pem_key_cert_pair pair = {.private_key = s->tls_key_pem,
                                       .cert_chain = s->tls_cert_pem};
    grpc_ssl_server_certificate_config *conf =
        grpc_ssl_server_certificate_config_create(s->tls_ca_pem, &pair, 1);
    grpc_ssl_server_credentials_options *opts =
        grpc_ssl_server_credentials_create_options_using_config(
            s->tls_ca_pem != NULL ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                  : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            conf);
    grpc_server_credentials *creds =
        opts != NULL ? grpc_ssl_server_credentials_create_with_options(opts) : NULL;
    if (creds == NULL)
        snprintf(err, errlen, "cannot create the TLS credentials for '%s' (check tls-cert/tls-key)",
                 addr);
    return creds;
}

int rpc_socket_secure(ksm_rpc_server *s, const char *path, char *err, size_t errlen)
{
    if (!s->have_gid) {
        if (chmod(path, 0600) != 0) {
            snprintf(err, errlen, "cannot chmod the socket %s: %s", path, strerror(errno));
            return KSM_EIO;
        }
        return 0;
    }
    gid_t gid = (gid_t)s->sock_gid;
    if (chown(path, (uid_t)-1, gid) != 0 || chmod(path, 0660) != 0) {
        snprintf(err, errlen, "option --socket-group: cannot give the socket %s to group %u: %s",
                 path, (unsigned)gid, strerror(errno));
        return KSM_EPERM;
    }
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == NULL || slash == dir) return 0;
    *slash = '\0';
    struct stat st;
    /* Only a private directory of ours: never loosen or re-own a shared one (/tmp, /run). */
    if (stat(dir, &st) != 0 || st.st_uid != geteuid() || (st.st_mode & S_ISVTX) ||
        (st.st_mode & 0002))
        return 0;
    if (chown(dir, (uid_t)-1, gid) != 0 || chmod(dir, 0750) != 0) {
        snprintf(err, errlen,
                 "option --socket-group: cannot give the socket directory %s to group %u: %s", dir,
                 (unsigned)gid, strerror(errno));
        return KSM_EPERM;
    }
    return 0;
}

/* Constant time in the secret: every byte of the expected token is visited whatever the input. */
static bool token_equal(const char *given, size_t glen, const char *want, size_t wlen)
{
    volatile unsigned char acc = glen != wlen;
    for (size_t i = 0; i < wlen; i++)
        acc |= (unsigned char)want[i] ^ (unsigned char)(i < glen ? given[i] : 0);
    return acc == 0;
}

/* At most one refusal line per second: a client hammering with a bad token must not fill the
 * disk or drown the other log lines. The next line counts the refusals left out. */
static bool refusal_log_due(ksm_rpc_server *s, uint64_t *suppressed)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t now = (int64_t)ts.tv_sec + 1, last = atomic_load(&s->auth_log_sec);
    if (now > last && atomic_compare_exchange_strong(&s->auth_log_sec, &last, now)) {
        *suppressed = atomic_exchange(&s->auth_log_suppressed, 0);
        return true;
    }
    atomic_fetch_add(&s->auth_log_suppressed, 1);
    return false;
}

bool rpc_authorize(ksm_rpc_server *s, struct rpc_call *c)
{
    if (s->token == NULL) return true;
    if (c->m != NULL && (c->m->kind == RPC_HEALTH_CHECK || c->m->kind == RPC_HEALTH_WATCH))
        return true;
    const grpc_slice *value = NULL;
    for (size_t i = 0; i < c->md.count; i++) {
        grpc_slice k = c->md.metadata[i].key;
        if (GRPC_SLICE_LENGTH(k) == 13 &&
            memcmp(GRPC_SLICE_START_PTR(k), "authorization", 13) == 0) {
            value = &c->md.metadata[i].value;
            break;
        }
    }
    const char *why = "The call needs a bearer token (metadata authorization: Bearer <token>).";
    if (value != NULL) {
        const char *v = (const char *)GRPC_SLICE_START_PTR(*value);
        size_t n = GRPC_SLICE_LENGTH(*value);
        if (n > 7 && strncasecmp(v, "Bearer ", 7) == 0 &&
            token_equal(v + 7, n - 7, s->token, s->token_len))
            return true;
        why = "The bearer token is not valid.";
    }
    uint64_t suppressed;
    if (refusal_log_due(s, &suppressed)) {
        char *method = c->m != NULL ? NULL : grpc_slice_to_c_string(c->details.method);
        char more[96] = "";
        if (suppressed > 0)
            snprintf(more, sizeof more, " (and %llu more refusals not logged since the last line)",
                     (unsigned long long)suppressed);
        KSM_LOGW("rpc", "%s: refused: %s%s", c->m != NULL ? c->m->path : method,
                 value != NULL ? "wrong bearer token" : "no bearer token", more);
        gpr_free(method);
    }
    rpc_call_finish(c, NULL, KSM_EAUTH, why, 0);
    return false;
}
