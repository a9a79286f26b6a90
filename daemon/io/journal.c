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

/* ---- CRC32C ---- */

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[i] = c;
    }
}

uint32_t ksm_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = buf;
    uint32_t c = ~crc;
    while (len--) c = crc_table[(c ^ *p++) & 0xFFu] ^ (c >> 8);
    return ~c;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const void *buf,
                                                            size_t len)
{
    const uint8_t *p = buf;
    uint64_t c = ~crc;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return ~c32;
}

uint32_t ksm_crc32c(uint32_t crc, const void *buf, size_t len)
{
    static int have = -1; /* benign race: every thread computes the same answer */
    if (have < 0) {
        __builtin_cpu_init();
        have = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    return have ? crc32c_hw(crc, buf, len) : ksm_crc32c_sw(crc, buf, len);
}
#else
uint32_t ksm_crc32c(uint32_t crc, const void *buf, size_t len)
{
    return ksm_crc32c_sw(crc, buf, len);
}
#endif

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
