/*
 * io/persist: kasminad's crash-safe state (docs/weights.md#state-on-disk).
 *
 * Layout of the state directory:
 *
 *     DIR/LOCK                        flock'd by the daemon that owns DIR (holds its pid)
 *     DIR/models/<id>.d/spec.json     how to rebuild the model (host spec, slots, init seed)
 *     DIR/models/<id>.d/snapshot.safetensors
 *                                     ksm_model_export_state(): every tensor, every slot's
 *                                     _extra_state, kasmina.generation, kasmina.device, and the
 *                                     training state (momentum buffers, train_step,
 *                                     configuration): every snapshot is a checkpoint
 *     DIR/models/<id>.d/journal       records (io/journal.h) appended since the snapshot
 *
 * The journal is state-based, not a log of operations: each record holds the post-mutation
 * state of the slots the mutation touched (their _extra_state and seed/gate tensors) and the
 * model generation, and restores through the same atomic loader as the snapshot
 * (ksm_model_restore_state). Replaying operations instead would not reproduce wall-clock
 * timestamps nor depend only on what is on disk. Restoring = snapshot, then every record whose
 * generation is above the snapshot's, in order; records at or below it are leftovers of a
 * compaction that crashed before it emptied the journal, and are skipped.
 *
 * Model creation and deletion are directory operations, each committed by one rename: create
 * builds models/.<id>.tmp (spec, snapshot, empty journal, all fsynced) and renames it to
 * <id>.d; delete renames <id>.d to .<id>.del before the model leaves memory, then removes it.
 * LoadWeights and MoveModel write a new snapshot (write temp, fsync, rename, fsync dir) and
 * then empty the journal. Compaction does the same after compact_records records or
 * compact_bytes bytes, and so does a checkpoint (ksm_persist_checkpoint). A crash at any point
 * leaves either the old or the new state.
 *
 * Training (TrainStep, ConfigureTraining) is not journalled: it becomes durable with the next
 * snapshot, which carries the weights, the momentum buffers, train_step and the configuration.
 * So a restored model has its lifecycle as of its last journal record and its training state as
 * of its snapshot: replaying a record keeps the modules the model already holds (the record's
 * copies of their tensors may be trained past the snapshot; ksm_model_restore_state), a seed
 * germinated after the snapshot comes back with its initial weights, and an optimizer dropped by
 * a fossilization after it stays dropped (docs/training.md#durability-and-checkpoints).
 *
 * The rule between memory and disk: a mutation's reply is sent only after its record is
 * durable (fdatasync). The rpc layer holds the model's persist lock (ksm_persist_lock) across
 * the engine mutation and the write, so records are in mutation order. If the write fails, the
 * journal is truncated back to its last good record and the model is reloaded from disk (its
 * memory rolls back to the last acknowledged state, its training to the last checkpoint); the
 * call fails with KSM_EIO. If that
 * rollback fails too, the model is marked failed: every later mutation of it is refused
 * (KSM_EIO) until a restart restores the durable state, so memory is never served ahead of
 * disk for more than the one failed call.
 *
 * Hostile or damaged input (DIR is trusted no more than its contents): nothing under DIR is
 * followed through a symbolic link. The models directory is opened once (O_DIRECTORY |
 * O_NOFOLLOW) and every start-up read and cleanup goes through it with openat / fstatat
 * (AT_SYMLINK_NOFOLLOW) / unlinkat, so a planted link is skipped with a warning, or for a
 * leftover .<id>.tmp / .<id>.del name unlinked itself, never its target; a file written (a new
 * snapshot's temporary file) first unlinks whatever is at its name and is created O_EXCL |
 * O_NOFOLLOW, so it is never written through a link. A world-writable DIR or
 * DIR/models stops start-up; a group-writable one, or one another user owns, is logged.
 * Every state blob carries kasmina.crc32c (safetensors.h: the CRC32C of the whole blob) and
 * journal records must have non-decreasing generations (a compaction's leftovers, <= the
 * snapshot's generation, come first and are skipped). A model whose files are damaged (spec,
 * snapshot checksum, a journal damaged in its middle or out of generation order, a symbolic link
 * inside its directory) is quarantined: its directory moves to DIR/quarantine/<id>.<unix
 * time>.d (fsynced, never deleted), the reason (file and byte offset) is logged and kept
 * (ksm_persist_quarantined), and the other models are served; CreateModel may reuse the id.
 * With strict_restore set, such damage stops start-up instead, naming the file. Entries of
 * DIR/models that are not model directories are logged and left alone. A missing journal is
 * recreated empty, with a warning naming it (loud when the snapshot is past generation 1: the
 * mutations it held, if any, are lost).
 *
 * Disk-full class failures of a write (ENOSPC, EDQUOT, EFBIG) fail the call with KSM_ENOSPC
 * (RESOURCE_EXHAUSTED), every other write failure with KSM_EIO; the rollback is the same.
 *
 * Thread-safety: every function may be called from any thread; calls for one model serialise
 * on its lock.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/kasmina.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ksm_persist ksm_persist;
typedef struct ksm_persist_model ksm_persist_model;

struct ksm_persist_config {
    const char *dir;          /* created (0700) if missing */
    uint32_t compact_records; /* snapshot after this many journal records (0 = 1000) */
    uint64_t compact_bytes;   /* ... or this many journal bytes (0 = 64 MiB) */
    bool strict_restore;      /* damage stops start-up instead of quarantining the model */
};

/* A model set aside at start-up (see above). */
struct ksm_persist_quarantine {
    char id[KSM_ID_MAX + 1];
    char reason[768];    /* one sentence naming the file (and byte offset) and what is wrong */
    char moved_to[3200]; /* its directory now (DIR/quarantine/<id>.<unix time>.d) */
};

/* Creates/locks the state directory. KSM_EBUSY (with the other daemon's pid in err) when
 * another process holds it; -errno for I/O. */
int ksm_persist_open(const struct ksm_persist_config *cfg, ksm_persist **out, char *err,
                     size_t errlen);
/* Rebuilds every model of the directory into e (in creation order), dropping torn journal
 * tails (logged with their byte offset) and quarantining damaged models. With strict_restore,
 * KSM_EFORMAT (err names the file) for damage it cannot repair. Failures that are not the files'
 * (memory, devices, --max-models) and a quarantine that cannot move the directory stop it in
 * either mode. *n_models (may be NULL) = models restored. */
int ksm_persist_restore(ksm_persist *p, ksm_engine *e, size_t *n_models, char *err, size_t errlen);
/* Releases the lock. NULL is a no-op. */
void ksm_persist_close(ksm_persist *p);
const char *ksm_persist_dir(const ksm_persist *p);
/* The models ksm_persist_restore quarantined, in the order it met them (*n = 0 and NULL when
 * none, or p is NULL). Borrowed: filled by ksm_persist_restore before anything is served and
 * never changed afterwards, so any thread may read it until ksm_persist_close. */
const struct ksm_persist_quarantine *ksm_persist_quarantined(const ksm_persist *p, size_t *n);

/* ---- the mutation protocol (p NULL: every call is a no-op returning 0) ---- */

/* Creation: begin (serialises creations), engine create, created() writes the model's
 * directory (on failure the caller deletes the model from the engine), end. */
void ksm_persist_create_begin(ksm_persist *p);
int ksm_persist_created(ksm_persist *p, ksm_model *m, const struct ksm_model_spec *spec, char *err,
                        size_t errlen);
void ksm_persist_create_end(ksm_persist *p);

/* The model's lock (waits for a creation in progress). *out NULL when p is NULL. */
int ksm_persist_lock(ksm_persist *p, const char *model_id, ksm_persist_model **out);
void ksm_persist_unlock(ksm_persist_model *pm);
/* With the model's lock held: whether the model has a committed directory (true for pm NULL).
 * False once a DeleteModel has committed: a mutation that looked the model up before then must
 * answer "no such model" and change nothing. */
bool ksm_persist_model_exists(const ksm_persist_model *pm);

/* After a successful engine mutation: journal slot_id's state (NULL/"" = every slot). */
int ksm_persist_log_slots(ksm_persist_model *pm, ksm_model *m, const char *slot_id, char *err,
                          size_t errlen);
/* After LoadWeights / MoveModel: a new snapshot. */
int ksm_persist_log_snapshot(ksm_persist_model *pm, ksm_model *m, char *err, size_t errlen);
/* Checkpoint: a new snapshot, which carries the training state (weights, BatchNorm buffers,
 * momentum buffers, train_step, the training configuration), then an empty journal; *train_step
 * (may be NULL) = the step now durable, also the model's checkpoint_step. Memory is not changed:
 * when the write fails (KSM_ENOSPC / KSM_EIO) the previous snapshot and journal stay as they
 * were and nothing is rolled back. */
int ksm_persist_checkpoint(ksm_persist_model *pm, ksm_model *m, uint64_t *train_step, char *err,
                           size_t errlen);
/* Deletion: delete_begin commits (rename) before the engine deletes; delete_end(ok) removes the
 * files, or renames them back when the engine refused. */
int ksm_persist_delete_begin(ksm_persist_model *pm, char *err, size_t errlen);
void ksm_persist_delete_end(ksm_persist_model *pm, bool deleted);

#ifdef __cplusplus
}
#endif
