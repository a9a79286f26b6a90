/*
 * io/persist_impl: what the parts of io/persist share: the two structs, the file helpers
 * (persist_files.c: fd-relative, no symlink followed), the spec file, and the replay that both
 * restore (persist_restore.c) and a failed write's rollback (persist.c) use.
 */
#pragma once

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/persist.h"

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

struct saved_spec {
    struct ksm_model_spec spec;
    char id[KSM_ID_MAX + 1];
    char slots[KSM_MAX_SLOTS][KSM_SLOT_ID_MAX];
    const char *slot_ptrs[KSM_MAX_SLOTS];
    uint64_t seq;
};

struct ksm_persist_model *ksm_persist__entry_acquire(ksm_persist *p, const char *id);
int ksm_persist__fsync_dir(const char *path);
const char *ksm_persist__io_reason(int rc);
int ksm_persist__mkdir_p(const char *path);
void ksm_persist__model_dir(const ksm_persist *p, const char *id, char *buf, size_t n);
int ksm_persist__open_model_dir(const ksm_persist *p, const char *id);
int ksm_persist__read_fd(int fd, uint8_t **out, size_t *len);
int ksm_persist__read_file_at(int dfd, const char *name, uint8_t **out, size_t *len);
const char *ksm_persist__read_reason(int rc);
int ksm_persist__read_snapshot(const ksm_persist *p, const char *id, uint8_t **snap, size_t *n,
                               char *err, size_t errlen);
void ksm_persist__remove_dir_at(int dfd, const char *name, const char *shown);
int ksm_persist__replace_file(const char *dir, const char *name, const void *buf, size_t len);
int ksm_persist__replay(struct ksm_persist_model *pm, ksm_model *m, const uint8_t *snap,
                        size_t snap_len, char *err, size_t errlen);
void ksm_persist__set_exists(struct ksm_persist_model *pm, bool exists);
char *ksm_persist__spec_json(ksm_model *m, const struct ksm_model_spec *spec, uint64_t seq);
int ksm_persist__spec_parse(int dfd, const char *path, struct saved_spec *ss, char *err,
                            size_t errlen);
int ksm_persist__write_failure(int rc);
int ksm_persist__write_file(const char *path, const void *buf, size_t len);
