/* io/persist: the mutation protocol (entries, journal records, snapshots, rollback by replay,
 * create and delete) of the state directory (persist.h); opening and restoring it are
 * persist_restore.c, file helpers and the spec file persist_files.c. */
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
#include "io/persist_impl.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "kasmina/safetensors.h"
#include "kasmina/text.h"

/* Paths are bounded (the state directory at 3000 bytes, ids at 64) and every buffer has room for
 * them; messages may be cut, which is harmless. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

/* ---- entries ---- */

struct ksm_persist_model *ksm_persist__entry_acquire(ksm_persist *p, const char *id)
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
void ksm_persist__set_exists(struct ksm_persist_model *pm, bool exists)
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
    *out = ksm_persist__entry_acquire(p, model_id);
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
    int dfd = ksm_persist__open_model_dir(pm->p, pm->id), rc = 0;
    if (dfd < 0) {
        ksm_errf(err, errlen, 0, "cannot open the directory of model %s: %s", pm->id,
                 ksm_persist__read_reason(dfd));
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
        ksm_errf(err, errlen, 0, "cannot open journal %s: %s", path, ksm_persist__read_reason(rc));
        if (pm->jfd >= 0) close(pm->jfd);
        pm->jfd = -1;
    }
    return rc;
}

/* Installs the model's durable state (the snapshot blob, then the journal) into m, truncating a
 * torn journal tail, and leaves pm->jfd open for appending. */
int ksm_persist__replay(struct ksm_persist_model *pm, ksm_model *m, const uint8_t *snap,
                        size_t snap_len, char *err, size_t errlen)
{
    char dir[4200], path[4300], why[256];
    ksm_persist__model_dir(pm->p, pm->id, dir, sizeof dir);
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
    if ((rc = ksm_persist__read_fd(pm->jfd, &buf, &len)) != 0) {
        ksm_errf(err, errlen, 0, "cannot read %s: %s", path, ksm_persist__read_reason(rc));
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
int ksm_persist__read_snapshot(const ksm_persist *p, const char *id, uint8_t **snap, size_t *n,
                               char *err, size_t errlen)
{
    char path[4300];
    ksm_persist__model_dir(p, id, path, sizeof path);
    strncat(path, "/snapshot.safetensors", sizeof path - strlen(path) - 1);
    int dfd = ksm_persist__open_model_dir(p, id), rc = dfd < 0 ? dfd : 0;
    if (rc == 0) {
        rc = ksm_persist__read_file_at(dfd, "snapshot.safetensors", snap, n);
        close(dfd);
    }
    if (rc != 0) ksm_errf(err, errlen, 0, "cannot read %s: %s", path, ksm_persist__read_reason(rc));
    return rc;
}

static int reload(struct ksm_persist_model *pm, ksm_model *m, char *err, size_t errlen)
{
    uint8_t *snap = NULL;
    size_t n = 0;
    int rc = ksm_persist__read_snapshot(pm->p, pm->id, &snap, &n, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_persist__replay(pm, m, snap, n, err, errlen);
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
                 pm->id, ksm_persist__io_reason(rc), why[0] ? ": " : "", why);
    } else {
        KSM_LOGW("persist", "model %s: rolled back to its durable state (generation %llu)", pm->id,
                 (unsigned long long)ksm_model_generation(m));
    }
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
    ksm_persist__model_dir(p, id, dir, sizeof dir);
    ksm_persist__remove_dir_at(p->models_fd, tmpname, p->models);
    pthread_mutex_lock(&p->mu);
    uint64_t seq = p->next_seq++;
    pthread_mutex_unlock(&p->mu);
    void *snap = NULL;
    size_t n = 0;
    char *js = ksm_persist__spec_json(m, spec, seq);
    int rc = js == NULL ? KSM_ENOMEM : 0;
    if (rc == 0 && mkdir(tmp, 0700) != 0) rc = -errno;
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/spec.json", tmp);
        rc = ksm_persist__write_file(path, js, strlen(js));
    }
    if (rc == 0 &&
        (rc = ksm_model_export_state(m, NULL, 0, &snap, &n, NULL, why, sizeof why)) == 0) {
        snprintf(path, sizeof path, "%s/snapshot.safetensors", tmp);
        rc = ksm_persist__write_file(path, snap, n);
    }
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/journal", tmp);
        rc = ksm_persist__write_file(path, "", 0);
    }
    if (rc == 0) rc = ksm_persist__fsync_dir(tmp);
    if (rc == 0 && rename(tmp, dir) != 0) rc = -errno;
    if (rc == 0) rc = ksm_persist__fsync_dir(p->models); /* the commit point */
    free(js);
    free(snap);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "could not write the state of model %s under %s: %s", id,
                 p->models, ksm_persist__io_reason(rc));
        KSM_LOGE("persist", "%s", err ? err : "create failed");
        ksm_persist__remove_dir_at(p->models_fd, tmpname, p->models);
        return ksm_persist__write_failure(rc);
    }
    struct ksm_persist_model *pm = ksm_persist__entry_acquire(p, id);
    if (pm == NULL) return KSM_ENOMEM;
    snprintf(path, sizeof path, "%s/journal", dir);
    if (pm->jfd >= 0) close(pm->jfd);
    pm->jfd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    ksm_persist__set_exists(pm, pm->jfd >= 0);
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

/* A new snapshot of m, then an empty journal. A snapshot carries the training state, so it is
 * also the model's checkpoint: once it is durable its train_step is the model's checkpoint_step
 * (*train_step, may be NULL). Returns 0 or a code (err set); on failure the previous snapshot
 * and journal are left as they were. */
static int snapshot(struct ksm_persist_model *pm, ksm_model *m, uint64_t *train_step, char *err,
                    size_t errlen)
{
    void *blob = NULL;
    size_t n = 0;
    uint64_t gen = 0, step = 0;
    char dir[4200], why[256];
    ksm_persist__model_dir(pm->p, pm->id, dir, sizeof dir);
    int rc = ksm_model_export_snapshot(m, &blob, &n, &gen, &step, why, sizeof why);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "model %s: snapshot export failed: %s", pm->id, why);
        return rc;
    }
    rc = ksm_persist__replace_file(dir, "snapshot.safetensors", blob, n);
    free(blob);
    if (rc != 0) {
        ksm_errf(err, errlen, 0, "model %s: cannot write %s/snapshot.safetensors: %s", pm->id, dir,
                 ksm_persist__io_reason(rc));
        return rc;
    }
    /* Committed. Records left in the journal (if this truncate fails or a crash comes first) all
     * have generations <= gen and are skipped on restore. */
    ksm_model_set_checkpoint_step(m, step);
    if (train_step != NULL) *train_step = step;
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
                 ksm_persist__io_reason(rc), why[0] ? ": " : "", why);
        roll_back(pm, m);
        ksm_errf(err, errlen, 0,
                 "the state of model %s could not be written to disk (%s); the mutation was not "
                 "applied",
                 pm->id, ksm_persist__io_reason(rc));
        return ksm_persist__write_failure(rc);
    }
    pm->jsize += KSM_JOURNAL_HEADER + len;
    pm->jrecords++;
    if (pm->jrecords >= pm->p->compact_records || pm->jsize >= pm->p->compact_bytes) {
        char e2[512];
        if (snapshot(pm, m, NULL, e2, sizeof e2) != 0)
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
    if ((rc = snapshot(pm, m, NULL, why, sizeof why)) != 0) {
        KSM_LOGE("persist", "%s: rolling the change back", why);
        roll_back(pm, m);
        ksm_errf(err, errlen, 0,
                 "the state of model %s could not be written to disk (%s); the change was not "
                 "applied",
                 pm->id, ksm_persist__io_reason(rc));
        return ksm_persist__write_failure(rc);
    }
    return 0;
}

int ksm_persist_checkpoint(ksm_persist_model *pm, ksm_model *m, uint64_t *train_step, char *err,
                           size_t errlen)
{
    if (pm == NULL) return 0;
    int rc = check_usable(pm, err, errlen);
    if (rc != 0) return rc;
    char why[512];
    if ((rc = snapshot(pm, m, train_step, why, sizeof why)) != 0) {
        /* Nothing changed in memory and the previous checkpoint is still on disk: no rollback. */
        KSM_LOGE("persist", "checkpoint failed: %s", why);
        ksm_errf(err, errlen, 0,
                 "the checkpoint of model %s could not be written to disk (%s); its previous "
                 "checkpoint (train_step %llu) stays",
                 pm->id, ksm_persist__io_reason(rc),
                 (unsigned long long)ksm_model_checkpoint_step(m));
        return ksm_persist__write_failure(rc);
    }
    return 0;
}

int ksm_persist_delete_begin(ksm_persist_model *pm, char *err, size_t errlen)
{
    if (pm == NULL || !pm->exists) return 0;
    char dir[4200], del[4200], delname[KSM_ID_MAX + 8];
    ksm_persist__model_dir(pm->p, pm->id, dir, sizeof dir);
    snprintf(delname, sizeof delname, ".%s.del", pm->id);
    snprintf(del, sizeof del, "%s/%s", pm->p->models, delname);
    ksm_persist__remove_dir_at(pm->p->models_fd, delname, pm->p->models);
    int rc = rename(dir, del) != 0 ? -errno : 0;
    if (rc == 0) rc = ksm_persist__fsync_dir(pm->p->models);
    if (rc != 0) {
        if (access(del, F_OK) == 0) rename(del, dir);
        ksm_errf(err, errlen, 0, "cannot delete the state of model %s (%s): the model was kept",
                 pm->id, ksm_persist__io_reason(rc));
        return ksm_persist__write_failure(rc);
    }
    ksm_persist__set_exists(pm, false);
    pm->deleting = true;
    return 0;
}

void ksm_persist_delete_end(ksm_persist_model *pm, bool deleted)
{
    if (pm == NULL || !pm->deleting) return;
    char dir[4200], del[4200], delname[KSM_ID_MAX + 8];
    ksm_persist__model_dir(pm->p, pm->id, dir, sizeof dir);
    snprintf(delname, sizeof delname, ".%s.del", pm->id);
    snprintf(del, sizeof del, "%s/%s", pm->p->models, delname);
    pm->deleting = false;
    if (deleted) {
        if (pm->jfd >= 0) close(pm->jfd);
        pm->jfd = -1;
        ksm_persist__remove_dir_at(pm->p->models_fd, delname, pm->p->models);
        ksm_persist__fsync_dir(pm->p->models);
    } else if (rename(del, dir) == 0 && ksm_persist__fsync_dir(pm->p->models) == 0) {
        ksm_persist__set_exists(pm, true);
    } else {
        KSM_LOGE("persist", "model %s: cannot restore its state directory after a refused delete",
                 pm->id);
    }
}
