/*
 * rpc/listeners: the server's addresses: a Unix socket (its directory created, the socket's
 * mode and group, a lock file so a second daemon on the same path refuses) or TCP (plaintext on
 * loopback, TLS elsewhere unless allow-remote-tcp says otherwise), with its credentials
 * (rpc/security.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <grpc/grpc_security.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "rpc/server_impl.h"

static int mkdir_p(const char *dir, mode_t mode)
{
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s", dir) >= (int)sizeof tmp) return -ENAMETOOLONG;
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(tmp, mode) != 0 && errno != EEXIST) return -errno;
        *p = '/';
    }
    if (mkdir(tmp, mode) != 0 && errno != EEXIST) return -errno;
    return 0;
}

static int prepare_unix(ksm_rpc_server *s, const char *path, char *err, size_t errlen)
{
    struct sockaddr_un sun;
    if (path[0] != '/' || strlen(path) >= sizeof sun.sun_path) {
        snprintf(err, errlen,
                 "listen address unix:%s must be an absolute path shorter than %zu bytes", path,
                 sizeof sun.sun_path);
        return KSM_EINVAL;
    }
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash != NULL && slash != dir) {
        *slash = '\0';
        int rc = mkdir_p(dir, 0700);
        if (rc != 0) {
            snprintf(err, errlen, "cannot create the socket directory %s: %s", dir, strerror(-rc));
            return KSM_EIO;
        }
    }
    char lockpath[PATH_MAX];
    snprintf(lockpath, sizeof lockpath, "%s.lock", path);
    int fd = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open the lock file %s: %s", lockpath, strerror(errno));
        return KSM_EIO;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        char pid[32] = "";
        ssize_t n = pread(fd, pid, sizeof pid - 1, 0);
        if (n > 0) pid[n] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        close(fd);
        if (e == EWOULDBLOCK) {
            snprintf(err, errlen,
                     "another kasminad%s%s is already serving on %s (lock %s is held); refusing "
                     "to start",
                     pid[0] ? " pid " : "", pid, path, lockpath);
            return KSM_EBUSY;
        }
        snprintf(err, errlen, "cannot lock %s: %s", lockpath, strerror(e));
        return KSM_EIO;
    }
    if (ftruncate(fd, 0) == 0) dprintf(fd, "%d\n", (int)getpid());
    /* The lock is ours: a socket file left there is stale. */
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            close(fd);
            snprintf(err, errlen, "%s exists and is not a socket; refusing to replace it", path);
            return KSM_EEXIST;
        }
        unlink(path);
    }
    s->unix_paths[s->n_unix] = strdup(path);
    s->lock_fds[s->n_unix] = fd;
    s->n_unix++;
    return 0;
}

static bool loopback_host(const char *addr)
{
    return strncmp(addr, "127.", 4) == 0 || strncmp(addr, "localhost:", 10) == 0 ||
           strncmp(addr, "[::1]:", 6) == 0;
}

int rpc_add_listener(ksm_rpc_server *s, const char *addr, char *err, size_t errlen)
{
    char target[PATH_MAX + 16];
    bool is_unix = strncmp(addr, "unix:", 5) == 0;
    if (is_unix) {
        const char *path = addr + 5;
        if (strncmp(path, "//", 2) == 0) path += 2;
        int rc = prepare_unix(s, path, err, errlen);
        if (rc != 0) return rc;
        snprintf(target, sizeof target, "unix:%s", path);
    } else {
        const char *hp = addr;
        if (strncmp(hp, "tcp://", 6) == 0)
            hp += 6;
        else if (strncmp(hp, "tcp:", 4) == 0)
            hp += 4;
        const char *colon = strrchr(hp, ':');
        if (colon == NULL || colon[1] == '\0') {
            snprintf(err, errlen, "listen address '%s' must be unix:/path or host:port", addr);
            return KSM_EINVAL;
        }
        char *end;
        long port = strtol(colon + 1, &end, 10);
        if (*end != '\0' || port < 0 || port > 65535) {
            snprintf(err, errlen, "listen address '%s' has a bad port (0..65535)", addr);
            return KSM_EINVAL;
        }
        if (colon == hp)
            snprintf(target, sizeof target, "127.0.0.1%s", colon);
        else
            snprintf(target, sizeof target, "%s", hp);
    }
    grpc_server_credentials *creds =
        rpc_listener_creds(s, addr, !is_unix, !is_unix && loopback_host(target), err, errlen);
    if (creds == NULL) return KSM_EINVAL;
    mode_t old = umask(0177);
    int port = grpc_server_add_http2_port(s->server, target, creds);
    umask(old);
    grpc_server_credentials_release(creds);
    if (port == 0) {
        snprintf(err, errlen, "cannot listen on %s (address in use or not permitted)", target);
        return KSM_EIO;
    }
    if (is_unix) {
        int rc = rpc_socket_secure(s, target + 5, err, errlen);
        if (rc != 0) return rc;
        KSM_LOGI("rpc", "listening on %s (mode %s%s)", target,
                 s->have_gid ? "0660, group " : "0600",
                 s->cfg.socket_group != NULL ? s->cfg.socket_group : "");
    } else {
        /* The bound port (useful with port 0) and the transport security. */
        char shown[PATH_MAX + 16];
        const char *colon = strrchr(target, ':');
        snprintf(shown, sizeof shown, "%.*s:%d", (int)(colon - target), target, port);
        KSM_LOGI("rpc", "listening on %s (%s)", shown,
                 s->tls_cert_pem == NULL
                     ? (loopback_host(target) ? "plaintext, loopback" : "plaintext")
                 : s->tls_ca_pem != NULL ? "TLS, client certificates required"
                                         : "TLS");
    }
    return 0;
}
