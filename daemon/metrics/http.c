/*
 * metrics/http: the HTTP listener, libmicrohttpd driven by the daemon's libuv loop.
 *
 * Why libmicrohttpd: it is a maintained HTTP/1.1 server library packaged by Debian
 * (libmicrohttpd-dev), so request parsing, keep-alive, pipelining, connection limits and
 * timeouts are its problem, not ours (http-parser, the other candidate, is only a parser and is
 * no longer maintained upstream; llhttp would still leave connection handling to us). It runs in
 * "external" mode with epoll (MHD_USE_EPOLL, no thread of its own): its single epoll fd is
 * watched by a uv_poll_t, and a uv_timer_t follows MHD_get_timeout(), so every request is
 * handled on the loop thread, where the snapshot lives. No lock is needed, and a slow client
 * cannot stall anything: MHD never blocks in MHD_run().
 *
 * We bind the socket ourselves (MHD_OPTION_LISTEN_SOCKET): errors name the address, and port 0
 * works (the bound port is logged and returned by ksm_metrics_port).
 */
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "metrics/metrics.h"
#include "metrics/metrics_impl.h"

#ifndef KSM_GIT_COMMIT
#define KSM_GIT_COMMIT ""
#endif

struct ksm_metrics {
    uv_loop_t *loop;
    ksm_engine *engine;
    ksm_rpc_server *rpc;
    struct MHD_Daemon *mhd;
    int listen_fd;
    int port;
    uv_poll_t poll;
    uv_timer_t mhd_timer, sample_timer;
    int open_handles;
    uint64_t sample_ms;
    struct ksm_metrics_snapshot *snap;
    char version[64], commit[64];
    struct ksm_metrics_build bi;
};

/* ---- address ---- */

/* "host:port", ":port", "[v6]:port" -> host (no brackets) and port. */
static int split_addr(const char *addr, char *host, size_t hostlen, char *port, size_t portlen)
{
    const char *colon = strrchr(addr, ':');
    if (colon == NULL || colon[1] == '\0') return KSM_EINVAL;
    const char *h = addr;
    size_t hl = (size_t)(colon - addr);
    if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl == 0) {
        h = "127.0.0.1";
        hl = strlen(h);
    }
    if (hl >= hostlen || strlen(colon + 1) >= portlen) return KSM_EINVAL;
    memcpy(host, h, hl);
    host[hl] = '\0';
    for (const char *p = colon + 1; *p; p++)
        if (*p < '0' || *p > '9') return KSM_EINVAL;
    long pv = strtol(colon + 1, NULL, 10);
    if (pv < 0 || pv > 65535) return KSM_EINVAL;
    snprintf(port, portlen, "%s", colon + 1);
    return 0;
}

static bool is_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family == AF_INET6)
        return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)sa)->sin6_addr);
    return false;
}

static int bind_listener(const char *addr, bool allow_remote, int *fd_out, int *port_out, char *err,
                         size_t errlen)
{
    char host[256], port[8];
    if (split_addr(addr, host, sizeof host, port, sizeof port) != 0) {
        snprintf(err, errlen, "option --metrics-listen: '%s' is not host:port (port 0..65535)",
                 addr);
        return KSM_EINVAL;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int g = getaddrinfo(host, port, &hints, &res);
    if (g != 0) {
        snprintf(err, errlen, "option --metrics-listen: cannot resolve '%s': %s", host,
                 gai_strerror(g));
        return KSM_EINVAL;
    }
    int rc = KSM_EIO, fd = -1, last_errno = 0;
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        if (!allow_remote && !is_loopback(ai->ai_addr)) {
            freeaddrinfo(res);
            snprintf(err, errlen,
                     "option --metrics-listen: %s is not a loopback address and the exporter "
                     "serves model ids and statistics to anyone who reaches it; add "
                     "--metrics-allow-remote to serve it there anyway",
                     addr);
            return KSM_EINVAL;
        }
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            last_errno = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0) {
            if (!is_loopback(ai->ai_addr))
                KSM_LOGW("metrics",
                         "metrics listener %s is not on loopback (metrics-allow-remote): anyone "
                         "who can reach it reads model ids and statistics (read-only)",
                         addr);
            rc = 0;
            break;
        }
        last_errno = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (rc != 0) {
        snprintf(err, errlen, "option --metrics-listen: cannot listen on %s: %s", addr,
                 strerror(last_errno));
        return last_errno == EADDRINUSE ? KSM_EBUSY : KSM_EIO;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    *port_out = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                         : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    *fd_out = fd;
    return 0;
}

/* ---- requests ---- */

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, const char *type,
                               char *body, size_t len, bool must_free)
{
    struct MHD_Response *r =
        must_free ? MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE)
                  : MHD_create_response_from_buffer(len, body, MHD_RESPMEM_PERSISTENT);
    if (r == NULL) {
        if (must_free) free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED) MHD_add_response_header(r, "Allow", "GET, HEAD");
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result text(struct MHD_Connection *conn, unsigned status, const char *msg)
{
    return respond(conn, status, "text/plain; charset=utf-8", (char *)msg, strlen(msg), false);
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload,
                                 size_t *upload_size, void **con_cls)
{
    ksm_metrics *m = cls;
    (void)version;
    (void)upload;
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "Only GET and HEAD are served here.\n");
    if (*upload_size != 0) { /* a GET with a body: ignore the body */
        *upload_size = 0;
        return MHD_YES;
    }
    (void)con_cls;
    if (strcmp(url, "/") == 0 || strcmp(url, "/index.html") == 0)
        return respond(conn, MHD_HTTP_OK, "text/html; charset=utf-8",
                       (char *)ksm_metrics_status_html, ksm_metrics_status_html_len, false);
    bool prom = strcmp(url, "/metrics") == 0;
    if (!prom && strcmp(url, "/status.json") != 0)
        return text(conn, MHD_HTTP_NOT_FOUND, "Not found: try /metrics, /status.json or /.\n");
    struct ksm_sbuf b = {0};
    int rc = prom ? ksm_metrics_render_prom(m->snap, m->rpc, &m->bi, &b)
                  : ksm_metrics_render_status(m->snap, m->rpc, &m->bi, &b);
    if (rc != 0) {
        ksm_sbuf_free(&b);
        return text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "Out of memory rendering the page.\n");
    }
    return respond(conn, MHD_HTTP_OK,
                   prom ? "text/plain; version=0.0.4; charset=utf-8" : "application/json", b.p,
                   b.len, true);
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[256];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && msg[n - 1] == '\n') msg[--n] = '\0';
    KSM_LOGD("metrics", "libmicrohttpd: %s", msg);
}

/* ---- the loop ---- */

static void on_mhd_timer(uv_timer_t *t);

/* Runs MHD, then re-arms the timer for MHD's next deadline (connection timeouts, or 0 when it
 * has buffered work that no fd will announce). */
static void drive(ksm_metrics *m)
{
    MHD_run(m->mhd);
    MHD_UNSIGNED_LONG_LONG to = 0;
    if (MHD_get_timeout(m->mhd, &to) == MHD_YES)
        uv_timer_start(&m->mhd_timer, on_mhd_timer, to > 60000 ? 60000 : (uint64_t)to, 0);
    else
        uv_timer_stop(&m->mhd_timer);
}

static void on_mhd_timer(uv_timer_t *t) { drive(t->data); }

static void on_poll(uv_poll_t *p, int status, int events)
{
    (void)status;
    (void)events;
    drive(p->data);
}

static void sample(ksm_metrics *m)
{
    struct ksm_metrics_snapshot *s = NULL;
    if (ksm_metrics_snapshot_take(m->engine, &s) != 0) {
        KSM_LOGW("metrics",
                 "cannot sample the engine: out of host memory (keeping the last sample)");
        return;
    }
    ksm_metrics_snapshot_free(m->snap);
    m->snap = s;
}

static void on_sample(uv_timer_t *t) { sample(t->data); }

int ksm_metrics_start(uv_loop_t *loop, ksm_engine *e, ksm_rpc_server *rpc,
                      const struct ksm_metrics_config *cfg, ksm_metrics **out, char *err,
                      size_t errlen)
{
    char dummy[8];
    if (err == NULL || errlen == 0) {
        err = dummy;
        errlen = sizeof dummy;
    }
    err[0] = '\0';
    if (cfg == NULL || cfg->listen == NULL) {
        snprintf(err, errlen, "option --metrics-listen: no address");
        return KSM_EINVAL;
    }
    ksm_metrics *m = calloc(1, sizeof *m);
    if (m == NULL) return KSM_ENOMEM;
    m->loop = loop;
    m->engine = e;
    m->rpc = rpc;
    snprintf(m->version, sizeof m->version, "%s", cfg->version ? cfg->version : "");
    snprintf(m->commit, sizeof m->commit, "%s", cfg->commit ? cfg->commit : KSM_GIT_COMMIT);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    m->bi =
        (struct ksm_metrics_build){.version = m->version,
                                   .commit = m->commit,
                                   .start_unix_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec};
    double iv = cfg->sample_interval_s > 0 ? cfg->sample_interval_s : 1.0;
    m->sample_ms = (uint64_t)(iv * 1000.0);
    if (m->sample_ms == 0) m->sample_ms = 1;
    int rc = bind_listener(cfg->listen, cfg->allow_remote, &m->listen_fd, &m->port, err, errlen);
    if (rc != 0) {
        free(m);
        return rc;
    }
    m->mhd = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_access, m,
                              MHD_OPTION_LISTEN_SOCKET, m->listen_fd, MHD_OPTION_CONNECTION_LIMIT,
                              (unsigned)64, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)30,
                              MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_END);
    if (m->mhd == NULL) {
        snprintf(err, errlen, "option --metrics-listen: libmicrohttpd could not start on %s",
                 cfg->listen);
        close(m->listen_fd);
        free(m);
        return KSM_EIO;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(m->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    if (info == NULL || uv_poll_init(loop, &m->poll, info->epoll_fd) != 0) {
        snprintf(err, errlen, "metrics: cannot watch libmicrohttpd's epoll fd");
        MHD_stop_daemon(m->mhd);
        close(m->listen_fd);
        free(m);
        return KSM_EIO;
    }
    m->poll.data = m;
    uv_timer_init(loop, &m->mhd_timer);
    m->mhd_timer.data = m;
    uv_timer_init(loop, &m->sample_timer);
    m->sample_timer.data = m;
    m->open_handles = 3;
    sample(m);
    uv_poll_start(&m->poll, UV_READABLE, on_poll);
    uv_timer_start(&m->sample_timer, on_sample, m->sample_ms, m->sample_ms);
    drive(m);
    char host[256], port[8];
    if (split_addr(cfg->listen, host, sizeof host, port, sizeof port) != 0) host[0] = '\0';
    bool v6 = strchr(host, ':') != NULL;
    KSM_LOGI("metrics",
             "serving http://%s%s%s:%d/ (/metrics, /status.json; engine sampled every %g s)",
             v6 ? "[" : "", host, v6 ? "]" : "", m->port, iv);
    *out = m;
    return 0;
}

int ksm_metrics_port(const ksm_metrics *m) { return m->port; }

static void on_closed(uv_handle_t *h)
{
    ksm_metrics *m = h->data;
    if (--m->open_handles > 0) return;
    ksm_metrics_snapshot_free(m->snap);
    free(m);
}

void ksm_metrics_stop(ksm_metrics *m)
{
    if (m == NULL) return;
    /* The poll handle goes first: MHD closes its epoll fd in MHD_stop_daemon. */
    uv_poll_stop(&m->poll);
    uv_close((uv_handle_t *)&m->poll, on_closed);
    uv_close((uv_handle_t *)&m->mhd_timer, on_closed);
    uv_close((uv_handle_t *)&m->sample_timer, on_closed);
    MHD_stop_daemon(m->mhd); /* closes the listen socket too (it was not quiesced) */
    m->mhd = NULL;
}
