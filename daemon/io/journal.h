/*
 * io/journal: CRC32C and the append-only record format of a model's journal (io/persist).
 *
 * A journal is a sequence of records, each
 *
 *     "KSMJ" | u32 payload length | u32 CRC32C | u32 type | u64 generation | payload
 *
 * (little-endian, 24-byte header). The CRC covers the header without its own field and the
 * payload, so a flipped bit anywhere in a record is caught. Records are only ever appended (one
 * pwrite + fdatasync each) and the file is only ever truncated, so a crash can leave at most one
 * torn record, at the end. ksm_journal_scan() tells that apart from damage in the middle: a bad
 * record that is followed by a valid one is corruption (the tail of an append-only file cannot
 * be followed by anything), one that is not is a torn tail.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "common/crc32c.h"

#ifdef __cplusplus
extern "C" {
#endif


#define KSM_JOURNAL_HEADER      24
#define KSM_JOURNAL_MAX_PAYLOAD (1u << 30)

enum ksm_journal_type {
    KSM_JREC_SLOTS = 1, /* payload: ksm_model_export_state() of the slots a mutation touched */
};

struct ksm_journal_rec {
    uint32_t type;
    uint64_t generation;
    const uint8_t *payload;
    uint32_t len;
    uint64_t offset; /* of the record's header in the file */
};

/* Fills hdr for a record of (type, generation, payload). */
void ksm_journal_header(uint8_t hdr[KSM_JOURNAL_HEADER], uint32_t type, uint64_t generation,
                        const void *payload, uint32_t len);

/* Appends one record at offset (the file's current valid end) with one pwrite, then fdatasync.
 * Returns 0 or -errno / KSM_EINVAL (payload too large). On failure the caller truncates the file
 * back to offset. */
int ksm_journal_append(int fd, uint64_t offset, uint32_t type, uint64_t generation,
                       const void *payload, size_t len);

typedef int (*ksm_journal_cb)(void *ud, const struct ksm_journal_rec *rec);

/* Walks a journal image in order, calling cb (may be NULL) for each valid record; a non-zero
 * return of cb stops the walk and is returned. *valid_end = the offset after the last valid
 * record. Returns 0 when the image is whole or ends in a torn tail (*valid_end < len then), or
 * KSM_EFORMAT when a damaged record is followed by a valid one (*bad_at = the damaged record's
 * offset; *valid_end as above). */
int ksm_journal_scan(const uint8_t *buf, size_t len, ksm_journal_cb cb, void *ud,
                     uint64_t *valid_end, uint64_t *bad_at);

#ifdef __cplusplus
}
#endif
