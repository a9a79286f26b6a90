/* io/journal: CRC32C and journal records (see journal.h). */
#include "io/journal.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "kasmina/errors.h"

/* ---- records ---- */

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static uint32_t record_crc(const uint8_t *hdr, const void *payload, uint32_t len)
{
    uint32_t c = ksm_crc32c(0, hdr, 8);
    c = ksm_crc32c(c, hdr + 12, KSM_JOURNAL_HEADER - 12);
    return ksm_crc32c(c, payload, len);
}

void ksm_journal_header(uint8_t hdr[KSM_JOURNAL_HEADER], uint32_t type, uint64_t generation,
                        const void *payload, uint32_t len)
{
    memcpy(hdr, "KSMJ", 4);
    put32(hdr + 4, len);
    put32(hdr + 8, 0);
    put32(hdr + 12, type);
    put64(hdr + 16, generation);
    put32(hdr + 8, record_crc(hdr, payload, len));
}

int ksm_journal_append(int fd, uint64_t offset, uint32_t type, uint64_t generation,
                       const void *payload, size_t len)
{
    if (len > KSM_JOURNAL_MAX_PAYLOAD) return KSM_EINVAL;
    uint8_t hdr[KSM_JOURNAL_HEADER];
    ksm_journal_header(hdr, type, generation, payload, (uint32_t)len);
    struct iovec iov[2] = {{hdr, sizeof hdr}, {(void *)payload, len}};
    size_t total = sizeof hdr + len, done = 0;
    while (done < total) {
        /* Re-slice the iovecs after a short write. */
        struct iovec v[2];
        int nv = 0;
        size_t skip = done;
        for (int i = 0; i < 2; i++) {
            if (skip >= iov[i].iov_len) {
                skip -= iov[i].iov_len;
                continue;
            }
            v[nv].iov_base = (char *)iov[i].iov_base + skip;
            v[nv].iov_len = iov[i].iov_len - skip;
            skip = 0;
            nv++;
        }
        ssize_t w = pwritev(fd, v, nv, (off_t)(offset + done));
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (w == 0) return KSM_EIO;
        done += (size_t)w;
    }
    if (fdatasync(fd) != 0) return -errno;
    return 0;
}

/* A complete, valid record at off? Fills rec. */
static bool record_at(const uint8_t *buf, size_t len, size_t off, struct ksm_journal_rec *rec)
{
    if (len - off < KSM_JOURNAL_HEADER) return false;
    const uint8_t *h = buf + off;
    if (memcmp(h, "KSMJ", 4) != 0) return false;
    uint32_t plen = get32(h + 4);
    if (plen > KSM_JOURNAL_MAX_PAYLOAD || plen > len - off - KSM_JOURNAL_HEADER) return false;
    if (record_crc(h, h + KSM_JOURNAL_HEADER, plen) != get32(h + 8)) return false;
    rec->type = get32(h + 12);
    rec->generation = get64(h + 16);
    rec->payload = h + KSM_JOURNAL_HEADER;
    rec->len = plen;
    rec->offset = off;
    return true;
}

int ksm_journal_scan(const uint8_t *buf, size_t len, ksm_journal_cb cb, void *ud,
                     uint64_t *valid_end, uint64_t *bad_at)
{
    size_t off = 0;
    struct ksm_journal_rec rec;
    while (off < len && record_at(buf, len, off, &rec)) {
        if (cb != NULL) {
            int rc = cb(ud, &rec);
            if (rc != 0) {
                *valid_end = off;
                return rc;
            }
        }
        off += KSM_JOURNAL_HEADER + rec.len;
    }
    *valid_end = off;
    if (off == len) return 0;
    /* A damaged record: is any valid record after it? Then it is not a torn tail. */
    for (size_t k = off + 1; k + KSM_JOURNAL_HEADER <= len; k++) {
        const uint8_t *hit = memmem(buf + k, len - k, "KSMJ", 4);
        if (hit == NULL) break;
        k = (size_t)(hit - buf);
        if (record_at(buf, len, k, &rec)) {
            if (bad_at) *bad_at = off;
            return KSM_EFORMAT;
        }
    }
    return 0;
}
