/*
 * io/journal and io/persist: CRC32C against RFC 3720's vectors, record round trips, every
 * truncation point of a journal, flipped bytes, and a real engine restored from a real state
 * directory (files, fsync) truncated at record boundaries.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/journal.h"
#include "io/persist.h"
#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kt.h"

TestSuite(journal, .timeout = 120);

Test(journal, crc32c_rfc3720_vectors)
{
    uint8_t buf[48];
    /* RFC 3720 B.4: 32 bytes of zeros, of ones, incrementing, decrementing. */
    memset(buf, 0, 32);
    cr_assert_eq(ksm_crc32c(0, buf, 32), 0x8A9136AAu);
    memset(buf, 0xFF, 32);
    cr_assert_eq(ksm_crc32c(0, buf, 32), 0x62A8AB43u);
    for (int i = 0; i < 32; i++) buf[i] = (uint8_t)i;
    cr_assert_eq(ksm_crc32c(0, buf, 32), 0x46DD794Eu);
    for (int i = 0; i < 32; i++) buf[i] = (uint8_t)(31 - i);
    cr_assert_eq(ksm_crc32c(0, buf, 32), 0x113FDB5Cu);
    /* An iSCSI read command PDU (RFC 3720 B.4). */
    static const uint8_t pdu[48] = {0x01, 0xc0, 0, 0,    0,    0, 0, 0,    0,    0, 0,    0,
                                    0,    0,    0, 0,    0x14, 0, 0, 0,    0,    0, 0x04, 0,
                                    0,    0,    0, 0x14, 0,    0, 0, 0x18, 0x28, 0, 0,    0,
                                    0,    0,    0, 0,    0x02, 0, 0, 0,    0,    0, 0,    0};
    cr_assert_eq(ksm_crc32c(0, pdu, 48), 0xD9963A56u);
    cr_assert_eq(ksm_crc32c(0, "123456789", 9), 0xE3069283u);
    cr_assert_eq(ksm_crc32c_sw(0, "123456789", 9), 0xE3069283u);
}

Test(journal, crc32c_hw_equals_table_and_chains)
{
    uint8_t buf[1000];
    srand(7);
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)rand();
    for (size_t n = 0; n <= sizeof buf; n += 37) {
        uint32_t a = ksm_crc32c(0, buf, n), b = ksm_crc32c_sw(0, buf, n);
        cr_assert_eq(a, b, "length %zu", n);
        size_t k = n / 3;
        cr_assert_eq(ksm_crc32c(ksm_crc32c(0, buf, k), buf + k, n - k), a, "chained at %zu", k);
    }
}

/* A journal image of n records with payload sizes 0, 5, 10, ... */
static uint8_t *make_image(int n, size_t *len, size_t *ends)
{
    uint8_t *img = NULL;
    *len = 0;
    for (int i = 0; i < n; i++) {
        uint32_t pl = (uint32_t)(5 * i);
        img = realloc(img, *len + KSM_JOURNAL_HEADER + pl);
        uint8_t *payload = img + *len + KSM_JOURNAL_HEADER;
        for (uint32_t k = 0; k < pl; k++) payload[k] = (uint8_t)(i * 31 + k);
        ksm_journal_header(img + *len, KSM_JREC_SLOTS, 100 + (uint64_t)i, payload, pl);
        *len += KSM_JOURNAL_HEADER + pl;
        ends[i] = *len;
    }
    return img;
}

struct seen {
    int n;
    uint64_t gen[64];
};

static int count_cb(void *ud, const struct ksm_journal_rec *r)
{
    struct seen *s = ud;
    cr_assert_eq(r->len, 5u * (uint32_t)s->n);
    for (uint32_t k = 0; k < r->len; k++) cr_assert_eq(r->payload[k], (uint8_t)(s->n * 31 + k));
    s->gen[s->n++] = r->generation;
    return 0;
}

Test(journal, round_trip_through_a_file)
{
    char path[] = "/tmp/ksm-journal-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    uint64_t off = 0;
    for (int i = 0; i < 8; i++) {
        uint8_t p[64];
        for (int k = 0; k < 5 * i; k++) p[k] = (uint8_t)(i * 31 + k);
        cr_assert_eq(ksm_journal_append(fd, off, KSM_JREC_SLOTS, 100 + (uint64_t)i, p, 5u * i), 0);
        off += KSM_JOURNAL_HEADER + 5u * (uint64_t)i;
    }
    struct stat st;
    fstat(fd, &st);
    cr_assert_eq((uint64_t)st.st_size, off);
    uint8_t *img = malloc(off);
    cr_assert_eq(pread(fd, img, off, 0), (ssize_t)off);
    close(fd);
    unlink(path);
    struct seen s = {0};
    uint64_t end = 0, bad = 0;
    cr_assert_eq(ksm_journal_scan(img, off, count_cb, &s, &end, &bad), 0);
    cr_assert_eq(s.n, 8);
    cr_assert_eq(end, off);
    for (int i = 0; i < 8; i++) cr_assert_eq(s.gen[i], 100u + (uint64_t)i);
    free(img);
}

Test(journal, every_truncation_point_keeps_the_prefix)
{
    size_t len, ends[12];
    uint8_t *img = make_image(12, &len, ends);
    for (size_t cut = 0; cut <= len; cut++) {
        int whole = 0;
        while (whole < 12 && ends[whole] <= cut) whole++;
        struct seen s = {0};
        uint64_t end = 0, bad = 0;
        cr_assert_eq(ksm_journal_scan(img, cut, count_cb, &s, &end, &bad), 0, "cut %zu", cut);
        cr_assert_eq(s.n, whole, "cut %zu: %d records, expected %d", cut, s.n, whole);
        cr_assert_eq(end, whole ? ends[whole - 1] : 0, "cut %zu: valid end", cut);
    }
    free(img);
}

Test(journal, every_flipped_byte_is_detected)
{
    size_t len, ends[6];
    uint8_t *img = make_image(6, &len, ends);
    for (size_t at = 0; at < len; at++) {
        img[at] ^= 0x20;
        int rec = 0;
        while (ends[rec] <= at) rec++;
        struct seen s = {0};
        uint64_t end = 0, bad = 0;
        int rc = ksm_journal_scan(img, len, count_cb, &s, &end, &bad);
        cr_assert_eq(s.n, rec, "byte %zu: only the records before the damaged one are delivered",
                     at);
        if (rec == 5) {
            /* The last record: indistinguishable from a torn write, dropped as a tail. */
            cr_assert_eq(rc, 0, "byte %zu", at);
            cr_assert_eq(end, ends[4]);
        } else {
            cr_assert_eq(rc, KSM_EFORMAT, "byte %zu: damage before a valid record is an error", at);
            cr_assert_eq(bad, rec ? ends[rec - 1] : 0, "byte %zu: offset of the damage", at);
        }
        img[at] ^= 0x20;
    }
    free(img);
}

/* ---- a real engine on a real state directory ---- */

static void export_model(ksm_engine *e, const char *id, void **buf, size_t *len)
{
    ksm_model *m;
    cr_assert_eq(ksm_engine_model_get(e, id, &m), 0);
    cr_assert_eq(ksm_model_export_weights(m, buf, len, NULL, 0), 0);
    ksm_model_unref(m);
}

Test(journal, engine_restores_each_record_prefix)
{
    char *dir = kt_tmpdir("persist"), err[512];
    ksm_engine *e = kt_engine_cpu(1);
    ksm_persist *p;
    struct ksm_persist_config pc = {.dir = dir, .compact_records = 1000};
    cr_assert_eq(ksm_persist_open(&pc, &p, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_persist_restore(p, e, NULL, err, sizeof err), 0, "%s", err);
    /* A second owner of the directory is refused. */
    ksm_persist *p2;
    cr_assert_eq(ksm_persist_open(&pc, &p2, err, sizeof err), KSM_EBUSY);
    cr_assert(strstr(err, "in use by another kasminad") != NULL, "%s", err);

    static const char *const slots[] = {"r0c0", "r0c1"};
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                  .slots = slots,
                                  .n_slots = 2,
                                  .permissive_gates = true,
                                  .init_seed = 3};
    spec.cnn = (struct ksm_cnn_spec){
        .num_classes = 4, .n_blocks = 2, .base_channels = 4, .pool_layers = -1};
    ksm_model *m;
    ksm_persist_create_begin(p);
    cr_assert_eq(ksm_engine_model_create(e, "j", &spec, &m, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_persist_created(p, m, &spec, err, sizeof err), 0, "%s", err);
    ksm_persist_create_end(p);

    enum { N = 6 };
    void *want[N + 1];
    size_t want_len[N + 1];
    export_model(e, "j", &want[0], &want_len[0]);
    for (int i = 0; i < N; i++) {
        ksm_persist_model *pm;
        cr_assert_eq(ksm_persist_lock(p, "j", &pm), 0);
        const char *slot = slots[i % 2];
        int rc;
        if (i < 2) {
            struct ksm_germinate_args g = {.blueprint_id = "conv_light", .init_seed = 9};
            rc = ksm_model_germinate(m, slot, &g, NULL, err, sizeof err);
        } else if (i < 4) {
            rc = ksm_model_advance(m, slot, KSM_STAGE_UNKNOWN, NULL, NULL, err, sizeof err);
        } else {
            struct ksm_metrics_update u = {.has_val_accuracy = true, .val_accuracy = 40.0 + i};
            rc = ksm_model_record_metrics(m, slot, &u, NULL, err, sizeof err);
        }
        cr_assert_eq(rc, 0, "mutation %d: %s", i, err);
        cr_assert_eq(ksm_persist_log_slots(pm, m, slot, err, sizeof err), 0, "%s", err);
        ksm_persist_unlock(pm);
        export_model(e, "j", &want[i + 1], &want_len[i + 1]);
    }
    ksm_model_unref(m);
    ksm_engine_free(e);
    ksm_persist_close(p);

    char jpath[600];
    snprintf(jpath, sizeof jpath, "%s/models/j.d/journal", dir);
    FILE *f = fopen(jpath, "rb");
    cr_assert_not_null(f);
    static uint8_t full[1 << 20];
    size_t jlen = fread(full, 1, sizeof full, f);
    fclose(f);
    size_t ends[N];
    cr_assert_eq(ksm_journal_scan(full, jlen, NULL, NULL, &(uint64_t){0}, NULL), 0);
    size_t off = 0;
    for (int i = 0; i < N; i++) {
        off += KSM_JOURNAL_HEADER + (full[off + 4] | full[off + 5] << 8 | full[off + 6] << 16 |
                                     (size_t)full[off + 7] << 24);
        ends[i] = off;
    }
    cr_assert_eq(off, jlen);
    /* Cut at every record boundary and just before/after it: the prefix comes back. */
    for (int r = 0; r <= N; r++) {
        size_t at = r ? ends[r - 1] : 0;
        for (int d = -1; d <= 1; d++) {
            if ((at == 0 && d < 0) || at + (size_t)(d + 1) > jlen + 1) continue;
            size_t cut = at + (size_t)d;
            if (cut > jlen) continue;
            int whole = 0;
            while (whole < N && ends[whole] <= cut) whole++;
            FILE *w = fopen(jpath, "wb");
            fwrite(full, 1, cut, w);
            fclose(w);
            e = kt_engine_cpu(1);
            cr_assert_eq(ksm_persist_open(&pc, &p, err, sizeof err), 0, "%s", err);
            cr_assert_eq(ksm_persist_restore(p, e, NULL, err, sizeof err), 0, "cut %zu: %s", cut,
                         err);
            void *got;
            size_t got_len;
            export_model(e, "j", &got, &got_len);
            cr_assert(got_len == want_len[whole] && !memcmp(got, want[whole], got_len),
                      "cut %zu: state of %d records", cut, whole);
            free(got);
            ksm_engine_free(e);
            ksm_persist_close(p);
            struct stat st;
            stat(jpath, &st);
            cr_assert_eq((size_t)st.st_size, whole ? ends[whole - 1] : 0, "cut %zu: tail truncated",
                         cut);
        }
    }
    for (int i = 0; i <= N; i++) free(want[i]);
    kt_rmtree(dir);
    free(dir);
}
