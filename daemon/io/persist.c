/* io/persist: the state directory, model directories, journals and restore (see persist.h). */
#include "io/persist.h"

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
#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "kasmina/safetensors.h"
#include "kasmina/text.h"

/* Paths are bounded (the state directory at 3000 bytes, ids at 64) and every buffer has room for
 * them; messages may be cut, which is harmless. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

struct ksm_persist_model {
    ksm_persist *p;
    struct ksm_persist_model *next;
    char id[KSM_ID_MAX + 1];
    pthread_mutex_t mu; /* held across a mutation and its record */
    int refs;           /* under p->mu */
    bool exists;        /* has a directory <id>.d: written under both mu and p->mu (set_exists) */
    bool deleting;      /* renamed to .<id>.del, engine delete pending */
    bool failed;        /* a failed write could not be rolled back: refuse mutations */
    int jfd;
    uint64_t jsize; /* valid end of the journal */
    uint32_t jrecords;
    uint64_t seq; /* creation order */
};

struct ksm_persist {
    char *dir;
    char models[4096];
    int lock_fd;
    int dir_fd;    /* DIR */
    int models_fd; /* DIR/models, opened O_DIRECTORY | O_NOFOLLOW: start-up reads and cleanups */
    bool strict;   /* strict_restore */
    struct ksm_persist_quarantine *quar; /* filled by restore only, read-only afterwards */
    size_t n_quar;
    uint32_t compact_records;
    uint64_t compact_bytes;
    pthread_mutex_t mu; /* the entry list, next_seq */
    pthread_mutex_t create_mu;
    struct ksm_persist_model *list;
    uint64_t next_seq;
    ksm_engine *engine; /* set by ksm_persist_restore */
};

/* ---- files ---- */

/* A file operation's failure in words: the C library's sentence for an errno that has no KSM_E*
 * name (EFBIG, EDQUOT, EROFS, ...: "unknown error" would hide what happened), else
 * ksm_strerror's. */
static const char *io_reason(int rc)
{
    return rc < 0 && strcmp(ksm_err_name(rc), "KSM_EUNKNOWN") == 0 ? strerror(-rc)
                                                                   : ksm_strerror(rc);
}

/* The code a failed write of state answers: the disk-full class (no space, a quota, a file size
 * limit) is a resource running out, KSM_ENOSPC (RESOURCE_EXHAUSTED); anything else KSM_EIO. */
static int write_failure(int rc)
{
    return rc == -ENOSPC || rc == -EDQUOT || rc == -EFBIG ? KSM_ENOSPC : KSM_EIO;
}

static int write_all(int fd, const void *buf, size_t len)
{
    const char *q = buf;
    while (len > 0) {
        ssize_t w = write(fd, q, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (w == 0) return KSM_EIO;
        q += w;
        len -= (size_t)w;
    }
    return 0;
}

static int fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -errno;
    int rc = fsync(fd) != 0 ? -errno : 0;
    if (rc == KSM_EINVAL) rc = 0; /* a file system that cannot fsync a directory */
    close(fd);
    return rc;
}

/* Creates path with buf, fsynced (no rename: the caller commits the directory). */
static int write_file(const char *path, const void *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    int rc = write_all(fd, buf, len);
    if (rc == 0 && fsync(fd) != 0) rc = -errno;
    close(fd);
    return rc;
}

/* dir/name replaced atomically: dir/.name.tmp, fsync, rename, fsync dir. */
static int replace_file(const char *dir, const char *name, const void *buf, size_t len)
{
    char tmp[4200], dst[4200];
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    snprintf(dst, sizeof dst, "%s/%s", dir, name);
    int rc = write_file(tmp, buf, len);
    if (rc == 0 && rename(tmp, dst) != 0) rc = -errno;
    if (rc == 0) rc = fsync_dir(dir);
    if (rc != 0) unlink(tmp);
    return rc;
}

/* The whole of the regular file open at fd (anything else, e.g. a FIFO planted in its place, is
 * KSM_EFORMAT rather than a read that never ends). */
static int read_fd(int fd, uint8_t **out, size_t *len)
{
    struct stat st;
    if (fstat(fd, &st) != 0) return -errno;
    if (!S_ISREG(st.st_mode)) return KSM_EFORMAT;
    size_t n = (size_t)st.st_size, done = 0;
    uint8_t *buf = malloc(n ? n : 1);
    if (buf == NULL) return KSM_ENOMEM;
    while (done < n) {
        ssize_t r = pread(fd, buf + done, n - done, (off_t)done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int rc = -errno;
            free(buf);
            return rc;
        }
        if (r == 0) break;
        done += (size_t)r;
    }
    *out = buf;
    *len = done;
    return 0;
}

/* Why a read_fd / read_file_at failed, in words. */
static const char *read_reason(int rc)
{
    if (rc == -ELOOP) return "it is a symbolic link, which kasminad never follows in its state";
    if (rc == KSM_EFORMAT) return "it is not a regular file";
    return io_reason(rc);
}

/* dfd/name, never through a symbolic link (-ELOOP) nor blocking on a FIFO. */
static int read_file_at(int dfd, const char *name, uint8_t **out, size_t *len)
{
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -errno;
    int rc = read_fd(fd, out, len);
    close(fd);
    return rc;
}

/* Removes dfd/name, a flat directory of kasminad's (a model directory left by an interrupted
 * create or delete), without following any link: a symbolic link or other non-directory at name
 * is unlinked itself, never its target; inside, entries are unlinked (unlinkat never follows a
 * link) and a subdirectory, which kasminad never makes, is left alone with a warning. shown is
 * the path of dfd, for messages. */
static void remove_dir_at(int dfd, const char *name, const char *shown)
{
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) return;
    if (!S_ISDIR(st.st_mode)) {
        KSM_LOGW("persist", "%s/%s is %s, not a directory: unlinking it (never what it points to)",
                 shown, name, S_ISLNK(st.st_mode) ? "a symbolic link" : "a file");
        unlinkat(dfd, name, 0);
        return;
    }
    int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (d == NULL) {
        if (fd >= 0) close(fd);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        struct stat es;
        if (fstatat(fd, de->d_name, &es, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(es.st_mode)) {
            KSM_LOGW("persist", "leaving %s/%s/%s: a directory kasminad did not make", shown, name,
                     de->d_name);
            continue;
        }
        unlinkat(fd, de->d_name, 0);
    }
    closedir(d);
    unlinkat(dfd, name, AT_REMOVEDIR);
}

/* The model's directory (<id>.d), never through a symbolic link. -errno on failure. */
static int open_model_dir(const ksm_persist *p, const char *id)
{
    char name[KSM_ID_MAX + 3];
    snprintf(name, sizeof name, "%s.d", id);
    int fd = openat(p->models_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    return fd >= 0 ? fd : -errno;
}

static int mkdir_p(const char *path)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *s = buf + 1; *s; s++) {
        if (*s != '/') continue;
        *s = '\0';
        if (mkdir(buf, 0700) != 0 && errno != EEXIST) return -errno;
        *s = '/';
    }
    if (mkdir(buf, 0700) != 0 && errno != EEXIST) return -errno;
    return 0;
}

static void model_dir(const ksm_persist *p, const char *id, char *buf, size_t n)
{
    snprintf(buf, n, "%s/%s.d", p->models, id);
}

/* ---- the spec file ---- */

static char *spec_json(ksm_model *m, const struct ksm_model_spec *spec, uint64_t seq)
{
    struct ksm_model_info *info = malloc(sizeof *info);
    if (info == NULL || ksm_model_get_info(m, info) != 0) {
        free(info);
        return NULL;
    }
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)spec->init_seed);
    json_t *slots = json_array();
    for (int i = 0; i < info->n_slots; i++)
        json_array_append_new(slots, json_string(info->slots[i].slot_id));
    json_t *o = json_pack(
        "{s:i, s:s, s:I, s:s, s:{s:I, s:I, s:I, s:I, s:I, s:I}, s:{s:I, s:I, s:I, s:I, s:I, s:I}, "
        "s:o, s:s, s:b, s:I}",
        "version", 1, "model_id", info->model_id, "seq", (json_int_t)seq, "topology",
        ksm_topology_name(info->topology), "cnn", "num_classes", (json_int_t)info->cnn.num_classes,
        "n_blocks", (json_int_t)info->cnn.n_blocks, "base_channels",
        (json_int_t)info->cnn.base_channels, "pool_layers", (json_int_t)info->cnn.pool_layers,
        "kernel_size", (json_int_t)info->cnn.kernel_size, "in_channels",
        (json_int_t)info->cnn.in_channels, "transformer", "vocab_size",
        (json_int_t)info->transformer.vocab_size, "n_embd", (json_int_t)info->transformer.n_embd,
        "n_head", (json_int_t)info->transformer.n_head, "n_layer",
        (json_int_t)info->transformer.n_layer, "block_size",
        (json_int_t)info->transformer.block_size, "num_segments",
        (json_int_t)info->transformer.num_segments, "slots", slots, "init_seed", seed,
        "permissive_gates", info->permissive_gates, "auto_forward_gates",
        (json_int_t)info->auto_forward_gates);
    free(info);
    if (o == NULL) return NULL;
    char *s = json_dumps(o, JSON_INDENT(1));
    json_decref(o);
    return s;
}

struct saved_spec {
    struct ksm_model_spec spec;
    char id[KSM_ID_MAX + 1];
    char slots[KSM_MAX_SLOTS][KSM_SLOT_ID_MAX];
    const char *slot_ptrs[KSM_MAX_SLOTS];
    uint64_t seq;
};

/* The model directory dfd's spec.json (path: its path, for messages). */
static int spec_parse(int dfd, const char *path, struct saved_spec *ss, char *err, size_t errlen)
{
    uint8_t *text = NULL;
    size_t len = 0;
    int rc = read_file_at(dfd, "spec.json", &text, &len);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "cannot read %s: %s", path, read_reason(rc));
        return rc;
    }
    json_error_t je;
    json_t *o = json_loadb((const char *)text, len, 0, &je);
    free(text);
    if (o == NULL) {
        ksm_errf(err, errlen, 0, "%s is not valid JSON: %s (line %d)", path, je.text, je.line);
        return KSM_EFORMAT;
    }
    memset(ss, 0, sizeof *ss);
    const char *id = NULL, *topo = NULL, *seed = NULL;
    json_int_t ver = 0, seq = 0, c[6] = {0}, t[6] = {0}, afg = 0;
    int perm = 0;
    json_t *slots = NULL;
    rc = json_unpack_ex(
        o, &je, JSON_STRICT,
        "{s:I, s:s, s:I, s:s, s:{s:I, s:I, s:I, s:I, s:I, s:I}, s:{s:I, s:I, s:I, s:I, s:I, s:I}, "
        "s:o, s:s, s:b, s:I}",
        "version", &ver, "model_id", &id, "seq", &seq, "topology", &topo, "cnn", "num_classes",
        &c[0], "n_blocks", &c[1], "base_channels", &c[2], "pool_layers", &c[3], "kernel_size",
        &c[4], "in_channels", &c[5], "transformer", "vocab_size", &t[0], "n_embd", &t[1], "n_head",
        &t[2], "n_layer", &t[3], "block_size", &t[4], "num_segments", &t[5], "slots", &slots,
        "init_seed", &seed, "permissive_gates", &perm, "auto_forward_gates", &afg);
    if (rc != 0 || ver != 1 || !json_is_array(slots) || json_array_size(slots) > KSM_MAX_SLOTS ||
        strlen(id) > KSM_ID_MAX) {
        ksm_errf(err, errlen, 0, "%s is not a kasmina model spec (version 1): %s", path,
                 rc ? je.text : "bad value");
        json_decref(o);
        return KSM_EFORMAT;
    }
    snprintf(ss->id, sizeof ss->id, "%s", id);
    ss->seq = (uint64_t)seq;
    ss->spec.topology = !strcmp(topo, "transformer") ? KSM_TOPOLOGY_TRANSFORMER : KSM_TOPOLOGY_CNN;
    ss->spec.cnn = (struct ksm_cnn_spec){(uint32_t)c[0], (uint32_t)c[1], (uint32_t)c[2],
                                         (int32_t)c[3],  (uint32_t)c[4], (uint32_t)c[5]};
    ss->spec.pool_layers_set = true;
    ss->spec.transformer =
        (struct ksm_transformer_spec){(uint32_t)t[0], (uint32_t)t[1], (uint32_t)t[2],
                                      (uint32_t)t[3], (uint32_t)t[4], (uint32_t)t[5]};
    for (size_t i = 0; i < json_array_size(slots); i++) {
        const char *s = json_string_value(json_array_get(slots, i));
        snprintf(ss->slots[i], sizeof ss->slots[i], "%s", s ? s : "");
        ss->slot_ptrs[i] = ss->slots[i];
    }
    ss->spec.slots = ss->slot_ptrs;
    ss->spec.n_slots = (int)json_array_size(slots);
    ss->spec.dtype = KSM_DTYPE_F32;
    ss->spec.init_seed = strtoull(seed, NULL, 10);
    ss->spec.permissive_gates = perm != 0;
    ss->spec.auto_forward_gates = (unsigned)afg;
    json_decref(o);
    return 0;
}

/* ---- entries ---- */

static struct ksm_persist_model *entry_acquire(ksm_persist *p, const char *id)
{
    pthread_mutex_lock(&p->mu);
    struct ksm_persist_model *e = p->list;
    while (e != NULL && strcmp(e->id, id) != 0) e = e->next;
    if (e == NULL && (e = calloc(1, sizeof *e)) != NULL) {
        e->p = p;
        snprintf(e->id, sizeof e->id, "%s", id);
        pthread_mutex_init(&e->mu, NULL);
        e->jfd = -1;
        e->next = p->list;
        p->list = e;
    }
    if (e != NULL) e->refs++;
    pthread_mutex_unlock(&p->mu);
    if (e != NULL) pthread_mutex_lock(&e->mu);
    return e;
}

/* pm->exists is read under either lock: under p->mu alone by entry_exists (ksm_persist_lock,
 * before it may wait for a creation) and by ksm_persist_unlock (after it released pm->mu), and
 * under pm->mu alone by the mutation paths. So every write holds both: the caller holds pm->mu,
 * and p->mu is taken here. Lock order pm->mu -> p->mu; no path takes pm->mu while holding p->mu
 * (entry_acquire releases p->mu first). */
static void set_exists(struct ksm_persist_model *pm, bool exists)
{
    pthread_mutex_lock(&pm->p->mu);
    pm->exists = exists;
    pthread_mutex_unlock(&pm->p->mu);
}

static bool entry_exists(ksm_persist *p, const char *id)
{
    pthread_mutex_lock(&p->mu);
    struct ksm_persist_model *e = p->list;
    while (e != NULL && strcmp(e->id, id) != 0) e = e->next;
    bool ok = e != NULL && e->exists;
    pthread_mutex_unlock(&p->mu);
    return ok;
}

void ksm_persist_unlock(ksm_persist_model *pm)
{
    if (pm == NULL) return;
    ksm_persist *p = pm->p;
    bool gone = !pm->exists && !pm->deleting;
    pthread_mutex_unlock(&pm->mu);
    pthread_mutex_lock(&p->mu);
    if (--pm->refs == 0 && gone && !pm->exists) {
        struct ksm_persist_model **pp = &p->list;
        while (*pp != pm) pp = &(*pp)->next;
        *pp = pm->next;
        if (pm->jfd >= 0) close(pm->jfd);
        pthread_mutex_destroy(&pm->mu);
        free(pm);
    }
    pthread_mutex_unlock(&p->mu);
}

bool ksm_persist_model_exists(const ksm_persist_model *pm) { return pm == NULL || pm->exists; }

int ksm_persist_lock(ksm_persist *p, const char *model_id, ksm_persist_model **out)
{
    *out = NULL;
    if (p == NULL) return 0;
    if (!entry_exists(p, model_id)) {
        /* Possibly a model whose creation is being written: wait for it. */
        pthread_mutex_lock(&p->create_mu);
        pthread_mutex_unlock(&p->create_mu);
    }
    *out = entry_acquire(p, model_id);
    return *out == NULL ? KSM_ENOMEM : 0;
}

/* ---- restore (start-up and rollback) ---- */

struct replay_ctx {
    ksm_model *m;
    uint64_t snap_gen;
    uint32_t applied;
    char *err;
    size_t errlen;
    const char *path;
    uint64_t prev_gen; /* the previous record's generation (0: none yet) */
};

static int replay_record(void *ud, const struct ksm_journal_rec *rec)
{
    struct replay_ctx *c = ud;
    if (rec->type != KSM_JREC_SLOTS) {
        snprintf(c->err, c->errlen, "journal %s: record at byte %llu has unknown type %u", c->path,
                 (unsigned long long)rec->offset, rec->type);
        return KSM_EFORMAT;
    }
    /* Records are appended in generation order, across compactions too (the leftovers of a
     * crashed compaction, <= the snapshot's generation, are older than anything appended after
     * them). Equal generations are legitimate: a journalled call that changed nothing (SetAlpha
     * to the same alpha, StepEpoch of empty slots) keeps the generation, and re-applying a record
     * of the model's current generation restores the state it already has. A record below its
     * predecessor is a stray copy of an older one: applying it would roll the model back.
     * Generation 0 is never a model's. */
    if (rec->generation == 0 || rec->generation < c->prev_gen) {
        snprintf(c->err, c->errlen,
                 "journal %s: record at byte %llu has generation %llu, below the previous "
                 "record's %llu (records are appended in generation order: an out-of-order copy)",
                 c->path, (unsigned long long)rec->offset, (unsigned long long)rec->generation,
                 (unsigned long long)c->prev_gen);
        return KSM_EFORMAT;
    }
    c->prev_gen = rec->generation;
    /* Only the head of a journal can be at or below the snapshot (ordered, as checked above):
     * leftovers of a compaction that crashed before it emptied the journal. */
    if (rec->generation <= c->snap_gen) return 0;
    char why[256];
    int rc = ksm_model_restore_state(c->m, rec->payload, rec->len, why, sizeof why);
    if (rc != 0) {
        snprintf(c->err, c->errlen, "journal %s: record at byte %llu does not restore: %s", c->path,
                 (unsigned long long)rec->offset, why);
        return rc;
    }
    if (ksm_model_generation(c->m) != rec->generation) {
        snprintf(c->err, c->errlen,
                 "journal %s: record at byte %llu says generation %llu but its state is generation "
                 "%llu",
                 c->path, (unsigned long long)rec->offset, (unsigned long long)rec->generation,
                 (unsigned long long)ksm_model_generation(c->m));
        return KSM_EFORMAT;
    }
    c->applied++;
    return 0;
}

/* The journal of a model being restored at start-up (pm->jfd < 0), opened through its directory
 * and never through a link. A missing journal is recreated empty, with a warning naming it: loud
 * when the snapshot is past generation 1 (a fresh model's), since then mutations may have been
 * journalled after it and are lost. */
static int open_journal(struct ksm_persist_model *pm, const char *path, const char *snap_path,
                        uint64_t snap_gen, char *err, size_t errlen)
{
    int dfd = open_model_dir(pm->p, pm->id), rc = 0;
    if (dfd < 0) {
        ksm_errf(err, errlen, 0, "cannot open the directory of model %s: %s", pm->id,
                 read_reason(dfd));
        return dfd;
    }
    pm->jfd = openat(dfd, "journal", O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (pm->jfd < 0 && errno == ENOENT) {
        /* Creation writes an empty journal and nothing removes it: it was lost or deleted.
         * Whatever it held after the snapshot is gone; past generation 1 the model is known to
         * have been changed since its creation. */
        KSM_LOGE("persist",
                 "journal %s is missing: model %s is restored from snapshot %s alone (generation "
                 "%llu%s) and gets an empty journal; mutations journalled after that snapshot, if "
                 "any, are lost",
                 path, pm->id, snap_path, (unsigned long long)snap_gen,
                 snap_gen > 1 ? ", i.e. changed after its creation" : ", the model as created");
        pm->jfd = openat(dfd, "journal", O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (pm->jfd >= 0 && fsync(dfd) != 0 && errno != EINVAL)
            KSM_LOGW("persist", "cannot fsync the directory of %s: %s", path, strerror(errno));
    }
    if (pm->jfd < 0) rc = -errno;
    close(dfd);
    struct stat st;
    if (rc == 0 && fstat(pm->jfd, &st) == 0 && !S_ISREG(st.st_mode)) rc = KSM_EFORMAT;
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "cannot open journal %s: %s", path, read_reason(rc));
        if (pm->jfd >= 0) close(pm->jfd);
        pm->jfd = -1;
    }
    return rc;
}

/* Installs the model's durable state (the snapshot blob, then the journal) into m, truncating a
 * torn journal tail, and leaves pm->jfd open for appending. */
static int replay(struct ksm_persist_model *pm, ksm_model *m, const uint8_t *snap, size_t snap_len,
                  char *err, size_t errlen)
{
    char dir[4200], path[4300], why[256];
    model_dir(pm->p, pm->id, dir, sizeof dir);
    snprintf(path, sizeof path, "%s/snapshot.safetensors", dir);
    ksm_st_file *f = NULL;
    int rc = ksm_st_parse(snap, snap_len, &f, why, sizeof why);
    const char *g = rc == 0 ? ksm_st_metadata(f, "kasmina.generation") : NULL;
    if (g == NULL) {
        ksm_errf(err, errlen, 0, "%s is not a kasmina snapshot: %s", path,
                 rc ? why : "no kasmina.generation");
        ksm_st_close(f);
        return KSM_EFORMAT;
    }
    uint32_t stored = 0, actual = 0;
    rc = ksm_st_crc32c_check(snap, snap_len, "kasmina.crc32c", &stored, &actual);
    if (rc == KSM_ENOENT) {
        KSM_LOGW("persist",
                 "%s has no kasmina.crc32c (written by an older kasminad): loaded unchecked; the "
                 "model's next snapshot will carry one",
                 path);
    } else if (rc != 0) {
        ksm_errf(err, errlen, 0,
                 "snapshot %s is damaged: the CRC32C of its bytes is %08x, its kasmina.crc32c says "
                 "%08x",
                 path, (unsigned)actual, (unsigned)stored);
        ksm_st_close(f);
        return KSM_EFORMAT;
    }
    uint64_t snap_gen = strtoull(g, NULL, 10);
    const char *dev = ksm_st_metadata(f, "kasmina.device");
    struct ksm_model_info *info = malloc(sizeof *info);
    if (info == NULL) {
        ksm_st_close(f);
        return KSM_ENOMEM;
    }
    rc = ksm_model_get_info(m, info);
    /* A rolled-back MoveModel: back to the snapshot's device (when it still exists). */
    if (rc == 0 && dev != NULL && strcmp(info->device, dev) != 0 && pm->p->engine != NULL &&
        ksm_engine_find_device(pm->p->engine, dev) != NULL)
        rc = ksm_model_move(m, dev, -1, why, sizeof why);
    free(info);
    ksm_st_close(f);
    if (rc == 0) rc = ksm_model_restore_state(m, snap, snap_len, why, sizeof why);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "%s does not restore: %s", path, why);
        return rc;
    }

    char snap_path[4300];
    snprintf(snap_path, sizeof snap_path, "%s", path);
    snprintf(path, sizeof path, "%s/journal", dir);
    if (pm->jfd < 0 && (rc = open_journal(pm, path, snap_path, snap_gen, err, errlen)) != 0)
        return rc;
    uint8_t *buf = NULL;
    size_t len = 0;
    if ((rc = read_fd(pm->jfd, &buf, &len)) != 0) {
        ksm_errf(err, errlen, 0, "cannot read %s: %s", path, read_reason(rc));
        return rc;
    }
    struct replay_ctx c = {m, snap_gen, 0, err, errlen, path, 0};
    uint64_t end = 0, bad = UINT64_MAX;
    rc = ksm_journal_scan(buf, len, replay_record, &c, &end, &bad);
    free(buf);
    if (rc == KSM_EFORMAT && bad != UINT64_MAX) {
        ksm_errf(err, errlen, 0,
                 "journal %s is damaged at byte %llu and a valid record follows (not a torn tail)",
                 path, (unsigned long long)bad);
        return rc;
    }
    if (rc != 0) return rc;
    if (end < len) {
        KSM_LOGW("persist", "journal %s: dropped a torn tail at byte %llu (%llu bytes)", path,
                 (unsigned long long)end, (unsigned long long)(len - end));
        if (ftruncate(pm->jfd, (off_t)end) != 0 || fdatasync(pm->jfd) != 0) {
            rc = -errno;
            ksm_errf(err, errlen, 0, "cannot truncate %s: %s", path, strerror(errno));
            return rc;
        }
    }
    pm->jsize = end;
    pm->jrecords = c.applied;
    return 0;
}

/* The model's snapshot file, read through its directory (never a link). */
static int read_snapshot(const ksm_persist *p, const char *id, uint8_t **snap, size_t *n, char *err,
                         size_t errlen)
{
    char path[4300];
    model_dir(p, id, path, sizeof path);
    strncat(path, "/snapshot.safetensors", sizeof path - strlen(path) - 1);
    int dfd = open_model_dir(p, id), rc = dfd < 0 ? dfd : 0;
    if (rc == 0) {
        rc = read_file_at(dfd, "snapshot.safetensors", snap, n);
        close(dfd);
    }
    if (rc != 0) ksm_errf(err, errlen, 0, "cannot read %s: %s", path, read_reason(rc));
    return rc;
}

static int reload(struct ksm_persist_model *pm, ksm_model *m, char *err, size_t errlen)
{
    uint8_t *snap = NULL;
    size_t n = 0;
    int rc = read_snapshot(pm->p, pm->id, &snap, &n, err, errlen);
    if (rc != 0) return rc;
    rc = replay(pm, m, snap, n, err, errlen);
    free(snap);
    return rc;
}

/* After a failed write: the journal back to its last good record, memory back to disk. */
static void roll_back(struct ksm_persist_model *pm, ksm_model *m)
{
    char why[512] = "";
    int rc = 0;
    if (pm->jfd >= 0 && (ftruncate(pm->jfd, (off_t)pm->jsize) != 0 || fdatasync(pm->jfd) != 0))
        rc = -errno;
    if (rc == 0) rc = reload(pm, m, why, sizeof why);
    if (rc != 0) {
        pm->failed = true;
        KSM_LOGE("persist",
                 "model %s: rolling back a failed write failed too (%s%s%s): its mutations are "
                 "refused until kasminad restarts",
                 pm->id, io_reason(rc), why[0] ? ": " : "", why);
    } else {
        KSM_LOGW("persist", "model %s: rolled back to its durable state (generation %llu)", pm->id,
                 (unsigned long long)ksm_model_generation(m));
    }
}

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
    int rc = mkdir_p(cfg->dir);
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
                 id, why, p->models, src, p->dir, io_reason(rc));
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
    model_dir(p, ss->id, dir, sizeof dir);
    uint8_t *snap = NULL;
    size_t n = 0;
    int rc = read_snapshot(p, ss->id, &snap, &n, err, errlen);
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
    struct ksm_persist_model *pm = entry_acquire(p, ss->id);
    if (pm == NULL) {
        rc = KSM_ENOMEM;
    } else {
        pm->seq = ss->seq;
        rc = replay(pm, m, snap, n, err, errlen);
        set_exists(pm, rc == 0);
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
        ksm_errf(err, errlen, 0, "cannot open %s/%s: %s", p->models, name, read_reason(rc));
        return rc;
    }
    int rc = spec_parse(dfd, path, ss, err, errlen);
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
            remove_dir_at(p->models_fd, name, p->models);
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

/* ---- mutations ---- */

void ksm_persist_create_begin(ksm_persist *p)
{
    if (p) pthread_mutex_lock(&p->create_mu);
}

void ksm_persist_create_end(ksm_persist *p)
{
    if (p) pthread_mutex_unlock(&p->create_mu);
}

int ksm_persist_created(ksm_persist *p, ksm_model *m, const struct ksm_model_spec *spec, char *err,
                        size_t errlen)
{
    if (p == NULL) return 0;
    const char *id = ksm_model_id(m);
    char tmp[4200], tmpname[KSM_ID_MAX + 8], dir[4200], path[4300], why[256];
    snprintf(tmpname, sizeof tmpname, ".%s.tmp", id);
    snprintf(tmp, sizeof tmp, "%s/%s", p->models, tmpname);
    model_dir(p, id, dir, sizeof dir);
    remove_dir_at(p->models_fd, tmpname, p->models);
    pthread_mutex_lock(&p->mu);
    uint64_t seq = p->next_seq++;
    pthread_mutex_unlock(&p->mu);
    void *snap = NULL;
    size_t n = 0;
    char *js = spec_json(m, spec, seq);
    int rc = js == NULL ? KSM_ENOMEM : 0;
    if (rc == 0 && mkdir(tmp, 0700) != 0) rc = -errno;
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/spec.json", tmp);
        rc = write_file(path, js, strlen(js));
    }
    if (rc == 0 &&
        (rc = ksm_model_export_state(m, NULL, 0, &snap, &n, NULL, why, sizeof why)) == 0) {
        snprintf(path, sizeof path, "%s/snapshot.safetensors", tmp);
        rc = write_file(path, snap, n);
    }
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/journal", tmp);
        rc = write_file(path, "", 0);
    }
    if (rc == 0) rc = fsync_dir(tmp);
    if (rc == 0 && rename(tmp, dir) != 0) rc = -errno;
    if (rc == 0) rc = fsync_dir(p->models); /* the commit point */
    free(js);
    free(snap);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "could not write the state of model %s under %s: %s", id,
                 p->models, io_reason(rc));
        KSM_LOGE("persist", "%s", err ? err : "create failed");
        remove_dir_at(p->models_fd, tmpname, p->models);
        return write_failure(rc);
    }
    struct ksm_persist_model *pm = entry_acquire(p, id);
    if (pm == NULL) return KSM_ENOMEM;
    snprintf(path, sizeof path, "%s/journal", dir);
    if (pm->jfd >= 0) close(pm->jfd);
    pm->jfd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    set_exists(pm, pm->jfd >= 0);
    pm->failed = false;
    pm->jsize = 0;
    pm->jrecords = 0;
    pm->seq = seq;
    ksm_persist_unlock(pm);
    if (pm->jfd < 0) {
        ksm_errf(err, errlen, 0, "cannot open %s: %s", path, strerror(errno));
        return KSM_EIO;
    }
    return 0;
}

static int check_usable(struct ksm_persist_model *pm, char *err, size_t errlen)
{
    if (pm->failed) {
        ksm_errf(err, errlen, 0,
                 "model %s: an earlier write of its state failed and could not be rolled back; "
                 "restart kasminad to restore its durable state",
                 pm->id);
        return KSM_EIO;
    }
    if (!pm->exists) {
        ksm_errf(err, errlen, 0, "model %s has no persistent state", pm->id);
        return KSM_EIO;
    }
    return 0;
}

/* A new snapshot of m, then an empty journal. Returns 0 or a code (err set). */
static int snapshot(struct ksm_persist_model *pm, ksm_model *m, char *err, size_t errlen)
{
    void *blob = NULL;
    size_t n = 0;
    uint64_t gen = 0;
    char dir[4200], why[256];
    model_dir(pm->p, pm->id, dir, sizeof dir);
    int rc = ksm_model_export_state(m, NULL, 0, &blob, &n, &gen, why, sizeof why);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "model %s: snapshot export failed: %s", pm->id, why);
        return rc;
    }
    rc = replace_file(dir, "snapshot.safetensors", blob, n);
    free(blob);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "model %s: cannot write %s/snapshot.safetensors: %s", pm->id, dir,
                 io_reason(rc));
        return rc;
    }
    /* Committed. Records left in the journal (if this truncate fails or a crash comes first) all
     * have generations <= gen and are skipped on restore. */
    if (ftruncate(pm->jfd, 0) != 0 || fdatasync(pm->jfd) != 0) {
        KSM_LOGW("persist", "model %s: cannot empty the journal after a snapshot: %s", pm->id,
                 strerror(errno));
        return 0;
    }
    pm->jsize = 0;
    pm->jrecords = 0;
    return 0;
}

int ksm_persist_log_slots(ksm_persist_model *pm, ksm_model *m, const char *slot_id, char *err,
                          size_t errlen)
{
    if (pm == NULL) return 0;
    int rc = check_usable(pm, err, errlen);
    if (rc != 0) return rc;
    const char *ids[KSM_MAX_SLOTS];
    int n_ids = 0;
    struct ksm_model_info *info = NULL;
    if (slot_id != NULL && slot_id[0] != '\0') {
        ids[n_ids++] = slot_id;
    } else {
        if ((info = malloc(sizeof *info)) == NULL || ksm_model_get_info(m, info) != 0) {
            free(info);
            info = NULL;
            rc = KSM_ENOMEM;
        } else {
            for (int i = 0; i < info->n_slots; i++) ids[n_ids++] = info->slots[i].slot_id;
        }
    }
    void *blob = NULL;
    size_t len = 0;
    uint64_t gen = 0;
    char why[256] = "";
    if (rc == 0) rc = ksm_model_export_state(m, ids, n_ids, &blob, &len, &gen, why, sizeof why);
    free(info);
    if (rc == 0) rc = ksm_journal_append(pm->jfd, pm->jsize, KSM_JREC_SLOTS, gen, blob, len);
    free(blob);
    if (rc != 0) {
        KSM_LOGE("persist", "model %s: cannot journal a mutation (%s%s%s): rolling it back", pm->id,
                 io_reason(rc), why[0] ? ": " : "", why);
        roll_back(pm, m);
        ksm_errf(err, errlen, 0,
                 "the state of model %s could not be written to disk (%s); the mutation was not "
                 "applied",
                 pm->id, io_reason(rc));
        return write_failure(rc);
    }
    pm->jsize += KSM_JOURNAL_HEADER + len;
    pm->jrecords++;
    if (pm->jrecords >= pm->p->compact_records || pm->jsize >= pm->p->compact_bytes) {
        char e2[512];
        if (snapshot(pm, m, e2, sizeof e2) != 0)
            KSM_LOGW("persist", "compaction failed (the journal keeps growing): %s", e2);
    }
    return 0;
}

int ksm_persist_log_snapshot(ksm_persist_model *pm, ksm_model *m, char *err, size_t errlen)
{
    if (pm == NULL) return 0;
    int rc = check_usable(pm, err, errlen);
    if (rc != 0) return rc;
    char why[512];
    if ((rc = snapshot(pm, m, why, sizeof why)) != 0) {
        KSM_LOGE("persist", "%s: rolling the change back", why);
        roll_back(pm, m);
        ksm_errf(err, errlen, 0,
                 "the state of model %s could not be written to disk (%s); the change was not "
                 "applied",
                 pm->id, io_reason(rc));
        return write_failure(rc);
    }
    return 0;
}

int ksm_persist_delete_begin(ksm_persist_model *pm, char *err, size_t errlen)
{
    if (pm == NULL || !pm->exists) return 0;
    char dir[4200], del[4200], delname[KSM_ID_MAX + 8];
    model_dir(pm->p, pm->id, dir, sizeof dir);
    snprintf(delname, sizeof delname, ".%s.del", pm->id);
    snprintf(del, sizeof del, "%s/%s", pm->p->models, delname);
    remove_dir_at(pm->p->models_fd, delname, pm->p->models);
    int rc = rename(dir, del) != 0 ? -errno : 0;
    if (rc == 0) rc = fsync_dir(pm->p->models);
    if (rc != 0) {
        if (access(del, F_OK) == 0) rename(del, dir);
        ksm_errf(err, errlen, 0, "cannot delete the state of model %s (%s): the model was kept",
                 pm->id, io_reason(rc));
        return write_failure(rc);
    }
    set_exists(pm, false);
    pm->deleting = true;
    return 0;
}

void ksm_persist_delete_end(ksm_persist_model *pm, bool deleted)
{
    if (pm == NULL || !pm->deleting) return;
    char dir[4200], del[4200], delname[KSM_ID_MAX + 8];
    model_dir(pm->p, pm->id, dir, sizeof dir);
    snprintf(delname, sizeof delname, ".%s.del", pm->id);
    snprintf(del, sizeof del, "%s/%s", pm->p->models, delname);
    pm->deleting = false;
    if (deleted) {
        if (pm->jfd >= 0) close(pm->jfd);
        pm->jfd = -1;
        remove_dir_at(pm->p->models_fd, delname, pm->p->models);
        fsync_dir(pm->p->models);
    } else if (rename(del, dir) == 0 && fsync_dir(pm->p->models) == 0) {
        set_exists(pm, true);
    } else {
        KSM_LOGE("persist", "model %s: cannot restore its state directory after a refused delete",
                 pm->id);
    }
}
