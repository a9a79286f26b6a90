/* io/persist_restore: opening the state directory, restoring its models at start-up (with
 * quarantine), closing it (persist.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io/journal.h"
#include "io/persist_impl.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "kasmina/safetensors.h"
#include "kasmina/text.h"

/* Paths are bounded (the state directory at 3000 bytes, ids at 64) and every buffer has room for
 * them; messages may be cut, which is harmless. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

/* ---- open / restore / close ---- */

/* Refuses a world-writable directory of the state (anyone could plant links or files in it, or
 * remove kasminad's), and warns about a group-writable one or one another user owns. */
static int check_dir(int fd, const char *path, char *err, size_t errlen)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int rc = -errno;
        ksm_errf(err, errlen, 0, "cannot stat %s: %s", path, strerror(errno));
        return rc;
    }
    unsigned mode = (unsigned)(st.st_mode & 07777);
    if (st.st_mode & S_IWOTH) {
        ksm_errf(err, errlen, 0,
                 "state directory %s is world-writable (mode %04o): anyone could plant, replace or "
                 "remove kasminad's files there; refusing to start (chmod 700 %s)",
                 path, mode, path);
        return KSM_EPERM;
    }
    if (st.st_mode & S_IWGRP)
        KSM_LOGW("persist",
                 "state directory %s is group-writable (mode %04o): members of group %u can change "
                 "kasminad's state (chmod g-w it unless that is intended)",
                 path, mode, (unsigned)st.st_gid);
    if (st.st_uid != geteuid())
        KSM_LOGW("persist",
                 "state directory %s is owned by uid %u, not by kasminad's user (uid %u)", path,
                 (unsigned)st.st_uid, (unsigned)geteuid());
    return 0;
}

int ksm_persist_open(const struct ksm_persist_config *cfg, ksm_persist **out, char *err,
                     size_t errlen)
{
    *out = NULL;
    if (cfg == NULL || cfg->dir == NULL || cfg->dir[0] == '\0' || strlen(cfg->dir) > 3000) {
        ksm_errf(err, errlen, 0, "the state directory must be a path of at most 3000 bytes");
        return KSM_EINVAL;
    }
    int rc = ksm_persist__mkdir_p(cfg->dir);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "cannot create state directory %s: %s", cfg->dir, strerror(-rc));
        return rc;
    }
    ksm_persist *p = calloc(1, sizeof *p);
    if (p == NULL || (p->dir = strdup(cfg->dir)) == NULL) {
        free(p);
        return KSM_ENOMEM;
    }
    p->lock_fd = p->dir_fd = p->models_fd = -1;
    p->compact_records = cfg->compact_records ? cfg->compact_records : 1000;
    p->compact_bytes = cfg->compact_bytes ? cfg->compact_bytes : (64ull << 20);
    p->strict = cfg->strict_restore;
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->create_mu, NULL);
    p->next_seq = 1;
    /* The configured path itself may be a link (an operator's choice); nothing below it is
     * followed. */
    if ((p->dir_fd = open(p->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
        rc = -errno;
        ksm_errf(err, errlen, 0, "cannot open state directory %s: %s", p->dir, strerror(errno));
        goto fail;
    }
    if ((rc = check_dir(p->dir_fd, p->dir, err, errlen)) != 0) goto fail;
    char path[4200];
    snprintf(path, sizeof path, "%s/LOCK", p->dir);
    p->lock_fd =
        openat(p->dir_fd, "LOCK", O_RDWR | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
    struct stat st;
    if (p->lock_fd >= 0 && (fstat(p->lock_fd, &st) != 0 || !S_ISREG(st.st_mode))) {
        close(p->lock_fd);
        p->lock_fd = -1;
        errno = EINVAL;
    }
    if (p->lock_fd < 0) {
        rc = -errno;
        ksm_errf(err, errlen, 0, "cannot open %s: %s", path,
                 rc == -ELOOP ? "it is a symbolic link, which kasminad never follows in its state"
                 : rc == KSM_EINVAL ? "it is not a regular file"
                                    : strerror(-rc));
        goto fail;
    }
    if (flock(p->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        rc = errno == EWOULDBLOCK ? KSM_EBUSY : -errno;
        char pid[32] = "";
        ssize_t r = pread(p->lock_fd, pid, sizeof pid - 1, 0);
        if (r > 0) pid[strcspn(pid, "\n")] = '\0';
        if (rc == KSM_EBUSY)
            ksm_errf(err, errlen, 0,
                     "state directory %s is in use by another kasminad (pid %s); use another "
                     "--state-dir or --no-persist",
                     p->dir, r > 0 ? pid : "unknown");
        else
            ksm_errf(err, errlen, 0, "cannot lock %s: %s", path, strerror(-rc));
        goto fail;
    }
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    if (ftruncate(p->lock_fd, 0) != 0 || pwrite(p->lock_fd, pid, (size_t)n, 0) != n)
        KSM_LOGW("persist", "cannot write the pid into %s: %s", path, strerror(errno));
    snprintf(p->models, sizeof p->models, "%s/models", p->dir);
    if (mkdirat(p->dir_fd, "models", 0700) != 0 && errno != EEXIST) {
        rc = -errno;
        ksm_errf(err, errlen, 0, "cannot create %s: %s", p->models, strerror(errno));
        goto fail;
    }
    p->models_fd = openat(p->dir_fd, "models", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (p->models_fd < 0) {
        rc = -errno;
        ksm_errf(err, errlen, 0, "cannot open %s: %s", p->models,
                 rc == -ELOOP || rc == -ENOTDIR
                     ? "it is not a directory (kasminad never follows a symbolic link in its state)"
                     : strerror(-rc));
        goto fail;
    }
    if ((rc = check_dir(p->models_fd, p->models, err, errlen)) != 0) goto fail;
    *out = p;
    return 0;
fail:
    ksm_persist_close(p);
    return rc;
}

const char *ksm_persist_dir(const ksm_persist *p) { return p ? p->dir : NULL; }

const struct ksm_persist_quarantine *ksm_persist_quarantined(const ksm_persist *p, size_t *n)
{
    *n = p != NULL ? p->n_quar : 0;
    return *n > 0 ? p->quar : NULL;
}

void ksm_persist_close(ksm_persist *p)
{
    if (p == NULL) return;
    while (p->list != NULL) {
        struct ksm_persist_model *e = p->list;
        p->list = e->next;
        if (e->jfd >= 0) close(e->jfd);
        pthread_mutex_destroy(&e->mu);
        free(e);
    }
    if (p->models_fd >= 0) close(p->models_fd);
    if (p->dir_fd >= 0) close(p->dir_fd);
    if (p->lock_fd >= 0) close(p->lock_fd); /* releases the flock */
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->create_mu);
    free(p->quar);
    free(p->dir);
    free(p);
}

static int cmp_seq(const void *a, const void *b)
{
    const struct saved_spec *x = *(struct saved_spec *const *)a,
                            *y = *(struct saved_spec *const *)b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* A model directory's name before ".d": the engine's id grammar (kasmina/text.h). */
static bool id_ok(const char *s, size_t n)
{
    char id[KSM_ID_MAX + 1];
    if (n == 0 || n > KSM_ID_MAX) return false;
    memcpy(id, s, n);
    id[n] = '\0';
    return ksm_id_valid(id, KSM_ID_MAX, NULL);
}

/* .<id>.tmp or .<id>.del: a creation that did not commit, or a deletion that did. */
static bool leftover_name(const char *name, size_t len)
{
    return len > 5 && name[0] == '.' &&
           (strcmp(name + len - 4, ".tmp") == 0 || strcmp(name + len - 4, ".del") == 0) &&
           id_ok(name + 1, len - 5);
}

/* A failure of the daemon or of its environment (memory, a device, a limit of its configuration,
 * file permissions, e.g. after a run as another user), not of a model's files: never a reason
 * to set the files aside, which would move every model away at once. */
static bool is_damage(int rc)
{
    return rc != KSM_ENOMEM && rc != KSM_EDEVMEM && rc != KSM_EDEVICE && rc != KSM_ENOPLUGIN &&
           rc != KSM_ELIMIT && rc != -EMFILE && rc != -ENFILE && rc != KSM_EACCES &&
           rc != KSM_EPERM && rc != -EROFS;
}

/* Moves DIR/models/<id>.d to DIR/quarantine/<id>.<unix time>[.k].d (both directories fsynced)
 * and records it. */
static int quarantine(ksm_persist *p, const char *id, const char *why, char *err, size_t errlen)
{
    struct ksm_persist_quarantine *nq = realloc(p->quar, (p->n_quar + 1) * sizeof *nq);
    if (nq == NULL) return KSM_ENOMEM;
    p->quar = nq;
    char src[KSM_ID_MAX + 3], dst[KSM_ID_MAX + 64];
    snprintf(src, sizeof src, "%s.d", id);
    int rc = 0, qfd = -1;
    if (mkdirat(p->dir_fd, "quarantine", 0700) != 0 && errno != EEXIST) rc = -errno;
    if (rc == 0 && (qfd = openat(p->dir_fd, "quarantine",
                                 O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0)
        rc = -errno;
    long long now = (long long)time(NULL);
    for (int k = 0; rc == 0; k++) {
        struct stat st;
        if (k == 0)
            snprintf(dst, sizeof dst, "%s.%lld.d", id, now);
        else
            snprintf(dst, sizeof dst, "%s.%lld.%d.d", id, now, k);
        if (fstatat(qfd, dst, &st, AT_SYMLINK_NOFOLLOW) == 0) {
            if (k == 1000) rc = KSM_EEXIST;
            continue;
        }
        if (errno != ENOENT) rc = -errno;
        if (rc == 0 && renameat(p->models_fd, src, qfd, dst) != 0) rc = -errno;
        break;
    }
    if (rc == 0 && fsync(qfd) != 0 && errno != EINVAL) rc = -errno;
    if (rc == 0 && fsync(p->models_fd) != 0 && errno != EINVAL) rc = -errno;
    if (qfd >= 0) close(qfd);
    if (rc != 0) {
        ksm_errf(err, errlen, 0,
                 "model %s is damaged (%s) and cannot be quarantined: moving %s/%s into "
                 "%s/quarantine failed: %s",
                 id, why, p->models, src, p->dir, ksm_persist__io_reason(rc));
        return rc;
    }
    struct ksm_persist_quarantine *q = &p->quar[p->n_quar++];
    memset(q, 0, sizeof *q);
    snprintf(q->id, sizeof q->id, "%s", id);
    snprintf(q->reason, sizeof q->reason, "%s", why);
    snprintf(q->moved_to, sizeof q->moved_to, "%s/quarantine/%s", p->dir, dst);
    KSM_LOGE(
        "persist",
        "model %s quarantined: %s; its files were moved to %s (kept, never deleted); the other "
        "models are served",
        id, why, q->moved_to);
    return 0;
}

/* A model whose files failed to restore (why says how): quarantined, or with strict_restore the
 * end of start-up (err names the file). A failure that is not the files' ends start-up in either
 * mode. Returns 0 when the model was set aside. */
static int damaged(ksm_persist *p, const char *id, int rc, const char *why, char *err,
                   size_t errlen)
{
    if (!is_damage(rc)) {
        ksm_errf(err, errlen, 0, "%s", why);
        return rc;
    }
    if (p->strict) {
        ksm_errf(
            err, errlen, 0,
            "%s (--strict-restore: refusing to start; without it model %s would be quarantined)",
            why, id);
        return rc;
    }
    return quarantine(p, id, why, err, errlen);
}

static int restore_one(ksm_persist *p, ksm_engine *e, const struct saved_spec *ss, char *err,
                       size_t errlen)
{
    char dir[4200], why[256];
    ksm_persist__model_dir(p, ss->id, dir, sizeof dir);
    uint8_t *snap = NULL;
    size_t n = 0;
    int rc = ksm_persist__read_snapshot(p, ss->id, &snap, &n, err, errlen);
    if (rc != 0) return rc;
    struct ksm_model_spec spec = ss->spec;
    ksm_st_file *f = NULL;
    if (ksm_st_parse(snap, n, &f, NULL, 0) == 0) {
        const char *dev = ksm_st_metadata(f, "kasmina.device");
        if (dev != NULL && ksm_engine_find_device(e, dev) != NULL)
            spec.device = dev;
        else if (dev != NULL)
            KSM_LOGW("persist", "model %s was on device %s, which is gone: restoring it on %s",
                     ss->id, dev, ksm_device_name(ksm_engine_default_device(e)));
    }
    ksm_model *m = NULL;
    rc = ksm_engine_model_create(e, ss->id, &spec, &m, why, sizeof why);
    ksm_st_close(f);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "%s/spec.json does not create a model: %s", dir, why);
        free(snap);
        return rc;
    }
    struct ksm_persist_model *pm = ksm_persist__entry_acquire(p, ss->id);
    if (pm == NULL) {
        rc = KSM_ENOMEM;
    } else {
        pm->seq = ss->seq;
        rc = ksm_persist__replay(pm, m, snap, n, err, errlen);
        ksm_persist__set_exists(pm, rc == 0);
        if (rc == 0)
            KSM_LOGI("persist", "model %s restored: generation %llu, %u journal record(s)", ss->id,
                     (unsigned long long)ksm_model_generation(m), pm->jrecords);
        ksm_persist_unlock(pm);
    }
    free(snap);
    ksm_model_unref(m);
    if (rc != 0) ksm_engine_model_delete(e, ss->id, NULL);
    return rc;
}

/* The spec of DIR/models/<name> (a real directory, name = <id>.d), checked against its name. */
static int load_spec(ksm_persist *p, const char *name, size_t id_len, struct saved_spec *ss,
                     char *err, size_t errlen)
{
    char path[4400];
    snprintf(path, sizeof path, "%s/%s/spec.json", p->models, name);
    int dfd = openat(p->models_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) {
        int rc = -errno;
        ksm_errf(err, errlen, 0, "cannot open %s/%s: %s", p->models, name,
                 ksm_persist__read_reason(rc));
        return rc;
    }
    int rc = ksm_persist__spec_parse(dfd, path, ss, err, errlen);
    close(dfd);
    if (rc == 0 && (strlen(ss->id) != id_len || strncmp(ss->id, name, id_len) != 0)) {
        ksm_errf(err, errlen, 0, "%s names model \"%s\", not the directory's", path, ss->id);
        rc = KSM_EFORMAT;
    }
    return rc;
}

int ksm_persist_restore(ksm_persist *p, ksm_engine *e, size_t *n_models, char *err, size_t errlen)
{
    if (n_models) *n_models = 0;
    p->engine = e;
    /* A file description of its own for readdir (a dup would share models_fd's position). */
    int fd = openat(p->models_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (d == NULL) {
        int rc = -errno;
        if (fd >= 0) close(fd);
        ksm_errf(err, errlen, 0, "cannot read %s: %s", p->models, strerror(-rc));
        return rc;
    }
    /* Names first (cleanups and quarantines change the directory), then the models. Nothing is
     * followed through a link: every look is fstatat(AT_SYMLINK_NOFOLLOW) on models_fd. */
    char(*names)[KSM_ID_MAX + 3] = NULL;
    size_t n_names = 0, cap = 0;
    int rc = 0;
    struct dirent *de;
    char path[4400];
    while (rc == 0 && (de = readdir(d)) != NULL) {
        const char *name = de->d_name;
        size_t len = strlen(name);
        if (!strcmp(name, ".") || !strcmp(name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", p->models, name);
        struct stat st;
        if (fstatat(p->models_fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            KSM_LOGW("persist", "ignoring %s: %s", path, strerror(errno));
            continue;
        }
        if (leftover_name(name, len)) {
            KSM_LOGI("persist", "removing %s (left by an interrupted create/delete)", path);
            ksm_persist__remove_dir_at(p->models_fd, name, p->models);
            continue;
        }
        if (S_ISLNK(st.st_mode)) {
            KSM_LOGW("persist",
                     "ignoring %s: a symbolic link (kasminad never follows links in its state "
                     "directory); left alone",
                     path);
            continue;
        }
        if (!S_ISDIR(st.st_mode) || len < 3 || strcmp(name + len - 2, ".d") != 0 ||
            !id_ok(name, len - 2)) {
            KSM_LOGW("persist", "ignoring %s: not a model directory (<id>.d); left alone", path);
            continue;
        }
        if (n_names == cap) {
            cap = cap ? 2 * cap : 16;
            char(*nv)[KSM_ID_MAX + 3] = realloc(names, cap * sizeof *nv);
            if (nv == NULL) {
                rc = KSM_ENOMEM;
                break;
            }
            names = nv;
        }
        snprintf(names[n_names++], sizeof *names, "%s", name);
    }
    closedir(d);
    struct saved_spec **specs = calloc(n_names ? n_names : 1, sizeof *specs);
    size_t n = 0, restored = 0;
    char why[1024];
    if (rc == 0 && specs == NULL) rc = KSM_ENOMEM;
    for (size_t i = 0; rc == 0 && i < n_names; i++) {
        size_t id_len = strlen(names[i]) - 2;
        char id[KSM_ID_MAX + 1];
        snprintf(id, sizeof id, "%.*s", (int)id_len, names[i]);
        if ((specs[n] = malloc(sizeof **specs)) == NULL) {
            rc = KSM_ENOMEM;
            break;
        }
        why[0] = '\0';
        int lrc = load_spec(p, names[i], id_len, specs[n], why, sizeof why);
        if (lrc == 0) {
            n++;
        } else {
            free(specs[n]);
            rc = damaged(p, id, lrc, why, err, errlen);
        }
    }
    if (rc == 0 && n > 0) qsort(specs, n, sizeof *specs, cmp_seq);
    for (size_t i = 0; i < n && rc == 0; i++) {
        why[0] = '\0';
        int rrc = restore_one(p, e, specs[i], why, sizeof why);
        if (specs[i]->seq >= p->next_seq) p->next_seq = specs[i]->seq + 1;
        if (rrc == 0)
            restored++;
        else
            rc = damaged(p, specs[i]->id, rrc, why, err, errlen);
    }
    for (size_t i = 0; i < n; i++) free(specs[i]);
    free(specs);
    free(names);
    if (rc == 0 && n_models) *n_models = restored;
    return rc;
}
