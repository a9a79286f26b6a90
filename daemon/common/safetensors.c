/*
 * safetensors reader and writer (see include/kasmina/safetensors.h).
 *
 * The reader accepts exactly the files that the reference implementation
 * (huggingface/safetensors) accepts, restricted to our five dtypes. It checks, in this order:
 *
 *   - the file holds at least the 8-byte length prefix;
 *   - the header length N is at most 100,000,000 bytes (the reference's limit) and the N bytes
 *     fit in the file;
 *   - the header starts with '{' and is one valid JSON object (jansson: strict UTF-8, no NUL
 *     bytes, no duplicate keys at any level, integers beyond int64 rejected); trailing JSON
 *     whitespace (the writer's space padding) is allowed, anything else after the object is not;
 *   - "__metadata__", when present, is an object of string values (null counts as absent);
 *   - every other key is a non-empty tensor name mapped to an object with exactly the fields
 *     "dtype" (a string; an unknown or unsupported one gives KSM_EDTYPE), "shape" (an array of at
 *     most KSM_MAX_DIMS JSON integers >= 0; reals, strings, booleans are rejected) and
 *     "data_offsets" (an array of two JSON integers 0 <= begin <= end <= data section size);
 *   - the element count and byte size do not overflow int64 / size_t, and numel * dtype size
 *     equals end - begin;
 *   - sorted by offset, the tensors tile the data section exactly, as the reference requires:
 *     the first begins at 0, each begins where the previous one ends (an earlier start is an
 *     overlap, a later one a gap) and the last ends at the end of the file. Bytes that belong to
 *     no tensor (a gap, or trailing bytes after the last tensor) are an error.
 *
 * Every failure returns KSM_EFORMAT (KSM_EDTYPE, -errno for I/O, KSM_ENOMEM) with one sentence in
 * errbuf that names the tensor or field. The file object owns one copy of the file's bytes; the
 * data section is placed at a 64-byte aligned address (individual tensors may still be unaligned
 * within it).
 *
 * The writer emits "__metadata__" first, then the tensors in the caller's order with contiguous
 * offsets in that order; the compact JSON header is padded with spaces so that the data section
 * starts at a multiple of 8 in the file.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "kasmina/safetensors.h"
#include "kasmina/text.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/crc32c.h"
#include "kasmina/errors.h"

#define ST_HEADER_MAX 100000000u /* the reference implementation's limit */
#define ST_DATA_ALIGN 64         /* in-memory alignment of the data section */
#define ST_FILE_ALIGN 8          /* in-file alignment of the data section (writer) */
#define ST_NAME_SHOWN 200        /* longest name quoted in a message */

struct ksm_st_file {
    void *mem;           /* owns the image (plus alignment slack) */
    const uint8_t *data; /* start of the data section */
    size_t data_len;
    struct ksm_st_tensor *tensors; /* data-offset order */
    size_t n;
    const struct ksm_st_tensor **by_name; /* sorted by name, for ksm_st_find */
    const char **meta;                    /* n_meta (key, value) pairs sorted by key */
    size_t n_meta;
    char *strings; /* arena holding names, metadata keys and values */
};

// ---- Small helpers ----

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void store_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* "[3,4]" into buf (truncated if needed). */
static const char *shape_str(char *buf, size_t len, int ndim, const int64_t *shape)
{
    size_t off = 0;
    int w = snprintf(buf, len, "[");
    off = w > 0 ? (size_t)w : 0;
    for (int d = 0; d < ndim && off < len; d++) {
        w = snprintf(buf + off, len - off, d ? ",%lld" : "%lld", (long long)shape[d]);
        if (w < 0) break;
        off += (size_t)w;
    }
    if (off < len) snprintf(buf + off, len - off, "]");
    return buf;
}

/* numel * size of a shape, or false on overflow (numel must fit int64, bytes size_t). */
static bool shape_bytes(int ndim, const int64_t *shape, size_t esize, int64_t *numel,
                        size_t *nbytes)
{
    uint64_t n = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return false;
        if (__builtin_mul_overflow(n, (uint64_t)shape[d], &n)) return false;
    }
    if (n > (uint64_t)INT64_MAX) return false;
    uint64_t b;
    if (__builtin_mul_overflow(n, (uint64_t)esize, &b) || b > SIZE_MAX) return false;
    *numel = (int64_t)n;
    *nbytes = (size_t)b;
    return true;
}

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

// ---- Reader ----

/* A tensor while parsing: name still points into the JSON, order is its rank in the header. */
struct st_rec {
    struct ksm_st_tensor t;
    uint64_t begin, end;
    size_t order;
};

static int cmp_rec(const void *a, const void *b)
{
    const struct st_rec *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

static int cmp_tensor_name(const void *a, const void *b)
{
    const struct ksm_st_tensor *x = *(const struct ksm_st_tensor *const *)a;
    const struct ksm_st_tensor *y = *(const struct ksm_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_meta(const void *a, const void *b)
{
    return strcmp(((const char *const *)a)[0], ((const char *const *)b)[0]);
}

/* A non-negative JSON integer, or false. Reals, booleans and strings are not integers. */
static bool json_uint(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v)) return false;
    json_int_t i = json_integer_value(v);
    if (i < 0) return false;
    *out = (uint64_t)i;
    return true;
}

static int parse_tensor(const char *name, const json_t *entry, uint64_t data_len, struct st_rec *r,
                        char *errbuf, size_t errlen)
{
    const int nl = ST_NAME_SHOWN;
    if (name[0] == '\0') return ksm_errf(errbuf, errlen, KSM_EFORMAT, "a tensor has an empty name");
    if (!json_is_object(entry))
        return ksm_errf(errbuf, errlen, KSM_EFORMAT, "tensor '%.*s': entry is not a JSON object",
                        nl, name);

    const char *key;
    json_t *val;
    json_object_foreach((json_t *)entry, key, val)
    {
        if (strcmp(key, "dtype") != 0 && strcmp(key, "shape") != 0 &&
            strcmp(key, "data_offsets") != 0)
            return ksm_errf(errbuf, errlen, KSM_EFORMAT, "tensor '%.*s': unknown field '%.*s'", nl,
                            name, 64, key);
    }

    // dtype
    const json_t *jd = json_object_get(entry, "dtype");
    if (jd == NULL)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT, "tensor '%.*s': missing field 'dtype'", nl,
                        name);
    if (!json_is_string(jd))
        return ksm_errf(errbuf, errlen, KSM_EFORMAT, "tensor '%.*s': dtype is not a string", nl,
                        name);
    if (ksm_dtype_parse(json_string_value(jd), &r->t.dtype) != 0)
        return ksm_errf(errbuf, errlen, KSM_EDTYPE,
                        "tensor '%.*s': unsupported dtype '%.*s' (F32, F16, BF16, I64, I32 are)",
                        nl, name, 32, json_string_value(jd));
    size_t esize = ksm_dtype_size(r->t.dtype);

    // shape
    const json_t *js = json_object_get(entry, "shape");
    if (js == NULL)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT, "tensor '%.*s': missing field 'shape'", nl,
                        name);
    if (!json_is_array(js))
        return ksm_errf(errbuf, errlen, KSM_EFORMAT, "tensor '%.*s': shape is not an array", nl,
                        name);
    size_t ndim = json_array_size(js);
    if (ndim > KSM_MAX_DIMS)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "tensor '%.*s': shape has %zu dimensions, more than the %d supported", nl,
                        name, ndim, KSM_MAX_DIMS);
    r->t.ndim = (int)ndim;
    for (size_t d = 0; d < ndim; d++) {
        uint64_t dim;
        if (!json_uint(json_array_get(js, d), &dim))
            return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                            "tensor '%.*s': shape[%zu] is not a non-negative integer", nl, name, d);
        r->t.shape[d] = (int64_t)dim;
    }
    char sbuf[160];
    int64_t numel;
    if (!shape_bytes(r->t.ndim, r->t.shape, esize, &numel, &r->t.nbytes))
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "tensor '%.*s': shape %s overflows its byte size", nl, name,
                        shape_str(sbuf, sizeof sbuf, r->t.ndim, r->t.shape));

    // data_offsets
    const json_t *jo = json_object_get(entry, "data_offsets");
    if (jo == NULL)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT, "tensor '%.*s': missing field 'data_offsets'",
                        nl, name);
    if (!json_is_array(jo) || json_array_size(jo) != 2)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "tensor '%.*s': data_offsets is not an array of two integers", nl, name);
    if (!json_uint(json_array_get(jo, 0), &r->begin) || !json_uint(json_array_get(jo, 1), &r->end))
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "tensor '%.*s': data_offsets are not non-negative integers", nl, name);
    if (r->begin > r->end)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "tensor '%.*s': data_offsets [%llu,%llu] end before they begin", nl, name,
                        (unsigned long long)r->begin, (unsigned long long)r->end);
    if (r->end > data_len)
        return ksm_errf(
            errbuf, errlen, KSM_EFORMAT,
            "tensor '%.*s': data_offsets [%llu,%llu] run past the %llu-byte data section", nl, name,
            (unsigned long long)r->begin, (unsigned long long)r->end, (unsigned long long)data_len);
    if (r->end - r->begin != (uint64_t)r->t.nbytes)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "tensor '%.*s': %s shape %s needs %zu bytes but data_offsets span %llu", nl,
                        name, ksm_dtype_name(r->t.dtype),
                        shape_str(sbuf, sizeof sbuf, r->t.ndim, r->t.shape), r->t.nbytes,
                        (unsigned long long)(r->end - r->begin));
    r->t.name = name;
    return 0;
}

static int parse_metadata(const json_t *m, size_t *n_meta, size_t *str_bytes, char *errbuf,
                          size_t errlen)
{
    if (json_is_null(m)) return 0;
    if (!json_is_object(m))
        return ksm_errf(errbuf, errlen, KSM_EFORMAT, "__metadata__ is not a JSON object");
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)m, key, val)
    {
        if (!json_is_string(val))
            return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                            "__metadata__ value of '%.*s' is not a string", ST_NAME_SHOWN, key);
        *str_bytes += strlen(key) + 1 + json_string_length(val) + 1;
        (*n_meta)++;
    }
    return 0;
}

/* Parses the image f->mem holds at [img, img + len) and fills f. */
static int parse_image(ksm_st_file *f, const uint8_t *img, size_t len, char *errbuf, size_t errlen)
{
    if (len < 8)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "file is %zu bytes, too short for the 8-byte header length", len);
    uint64_t hlen = load_le64(img);
    /* A torch.save file (zip archive "PK\3\4" since torch 1.6, or a pickle starting with the
     * PROTO opcode 0x80 before that) reads as a header length over the limit: say what it is. */
    if (hlen > ST_HEADER_MAX && (memcmp(img, "PK\x03\x04", 4) == 0 || img[0] == 0x80))
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "this looks like a PyTorch torch.save file (zip/pickle), not safetensors; "
                        "convert it with "
                        "kasmina_client.esper.state_dict_to_safetensors(torch.load(path))");
    if (hlen > ST_HEADER_MAX)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "header length %llu exceeds the limit of %u bytes",
                        (unsigned long long)hlen, ST_HEADER_MAX);
    if (hlen > len - 8)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT,
                        "header length %llu exceeds the %zu bytes that follow it (truncated file?)",
                        (unsigned long long)hlen, len - 8);
    const char *hdr = (const char *)img + 8;
    if (hlen == 0 || hdr[0] != '{')
        return ksm_errf(errbuf, errlen, KSM_EFORMAT, "header does not start with '{'");
    f->data = img + 8 + hlen;
    f->data_len = len - 8 - (size_t)hlen;

    json_error_t jerr;
    json_t *root = json_loadb(hdr, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL)
        return ksm_errf(errbuf, errlen, KSM_EFORMAT, "header is not valid JSON: %s at byte %d",
                        jerr.text, jerr.position);
    int rc = 0;
    struct st_rec *recs = NULL;
    if (!json_is_object(root)) {
        rc = ksm_errf(errbuf, errlen, KSM_EFORMAT, "header is not a JSON object");
        goto out_free_json;
    }

    // Pass 1: validate every entry, count tensors, metadata and string bytes.
    size_t nkeys = json_object_size(root);
    recs = calloc(nkeys ? nkeys : 1, sizeof *recs);
    if (recs == NULL) {
        rc = ksm_errf(errbuf, errlen, KSM_ENOMEM, "out of memory for %zu header entries", nkeys);
        goto out_free_json;
    }
    const json_t *meta = NULL;
    size_t n = 0, n_meta = 0, str_bytes = 0;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val)
    {
        if (strcmp(key, "__metadata__") == 0) {
            meta = val;
            rc = parse_metadata(val, &n_meta, &str_bytes, errbuf, errlen);
        } else {
            recs[n].order = n;
            rc = parse_tensor(key, val, f->data_len, &recs[n], errbuf, errlen);
            str_bytes += strlen(key) + 1;
            n++;
        }
        if (rc != 0) goto out_free_recs;
    }

    // Pass 2: the tensors must tile the data section exactly.
    qsort(recs, n, sizeof *recs, cmp_rec);
    uint64_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        const struct st_rec *r = &recs[i];
        if (r->begin < pos) {
            rc = ksm_errf(
                errbuf, errlen, KSM_EFORMAT,
                "tensor '%.*s': data_offsets [%llu,%llu] overlap tensor '%.*s' ending at %llu",
                ST_NAME_SHOWN, r->t.name, (unsigned long long)r->begin, (unsigned long long)r->end,
                ST_NAME_SHOWN, recs[i - 1].t.name, (unsigned long long)pos);
            goto out_free_recs;
        }
        if (r->begin > pos) {
            rc = ksm_errf(errbuf, errlen, KSM_EFORMAT,
                          "tensor '%.*s': data_offsets begin at %llu, leaving bytes [%llu,%llu) of "
                          "the data section unused",
                          ST_NAME_SHOWN, r->t.name, (unsigned long long)r->begin,
                          (unsigned long long)pos, (unsigned long long)r->begin);
            goto out_free_recs;
        }
        pos = r->end;
    }
    if (pos != f->data_len && n == 0) {
        rc = ksm_errf(errbuf, errlen, KSM_EFORMAT,
                      "data section has %zu bytes but the header lists no tensors", f->data_len);
        goto out_free_recs;
    }
    if (pos != f->data_len) {
        rc = ksm_errf(errbuf, errlen, KSM_EFORMAT,
                      "data section has %llu trailing bytes after the last tensor ends at %llu",
                      (unsigned long long)(f->data_len - pos), (unsigned long long)pos);
        goto out_free_recs;
    }

    // Pass 3: copy into the file object.
    f->tensors = calloc(n ? n : 1, sizeof *f->tensors);
    f->by_name = calloc(n ? n : 1, sizeof *f->by_name);
    f->meta = calloc(n_meta ? 2 * n_meta : 1, sizeof *f->meta);
    f->strings = malloc(str_bytes ? str_bytes : 1);
    if (!f->tensors || !f->by_name || !f->meta || !f->strings) {
        rc = ksm_errf(errbuf, errlen, KSM_ENOMEM, "out of memory for %zu tensors", n);
        goto out_free_recs;
    }
    char *s = f->strings;
    for (size_t i = 0; i < n; i++) {
        struct ksm_st_tensor *t = &f->tensors[i];
        *t = recs[i].t;
        size_t l = strlen(recs[i].t.name) + 1;
        t->name = memcpy(s, recs[i].t.name, l);
        s += l;
        t->data = f->data + recs[i].begin;
        f->by_name[i] = t;
    }
    f->n = n;
    qsort(f->by_name, n, sizeof *f->by_name, cmp_tensor_name);
    if (meta != NULL && json_is_object(meta)) {
        size_t i = 0;
        json_object_foreach((json_t *)meta, key, val)
        {
            size_t kl = strlen(key) + 1, vl = json_string_length(val) + 1;
            f->meta[2 * i] = memcpy(s, key, kl);
            s += kl;
            f->meta[2 * i + 1] = memcpy(s, json_string_value(val), vl);
            s += vl;
            i++;
        }
        f->n_meta = n_meta;
        qsort(f->meta, n_meta, 2 * sizeof *f->meta, cmp_meta);
    }

out_free_recs:
    free(recs);
out_free_json:
    json_decref(root);
    return rc;
}

/* An image buffer of len bytes whose data section (after the header length found in prefix, if
 * plausible) lands on an ST_DATA_ALIGN boundary. */
static uint8_t *alloc_image(ksm_st_file *f, size_t len, const uint8_t *prefix, size_t prefix_len)
{
    if (len > SIZE_MAX - ST_DATA_ALIGN) return NULL;
    size_t data_off = 0;
    if (prefix_len >= 8) {
        uint64_t h = load_le64(prefix);
        if (h <= ST_HEADER_MAX && h <= len - 8) data_off = 8 + (size_t)h;
    }
    f->mem = malloc(len + ST_DATA_ALIGN);
    if (f->mem == NULL) return NULL;
    uintptr_t a = (uintptr_t)f->mem + data_off;
    size_t pad = (ST_DATA_ALIGN - a % ST_DATA_ALIGN) % ST_DATA_ALIGN;
    return (uint8_t *)f->mem + pad;
}

int ksm_st_parse(const void *buf, size_t len, ksm_st_file **out, char *errbuf, size_t errlen)
{
    if (errbuf != NULL && errlen > 0) errbuf[0] = '\0';
    if (out == NULL || (buf == NULL && len > 0))
        return ksm_errf(errbuf, errlen, KSM_EINVAL, "invalid argument to ksm_st_parse");
    *out = NULL;
    ksm_st_file *f = calloc(1, sizeof *f);
    if (f == NULL) return ksm_errf(errbuf, errlen, KSM_ENOMEM, "out of memory for the file object");
    uint8_t *img = alloc_image(f, len, buf, len);
    if (img == NULL) {
        free(f);
        return ksm_errf(errbuf, errlen, KSM_ENOMEM, "out of memory for a %zu-byte file", len);
    }
    if (len > 0) memcpy(img, buf, len);
    int rc = parse_image(f, img, len, errbuf, errlen);
    if (rc != 0) {
        ksm_st_close(f);
        return rc;
    }
    *out = f;
    return 0;
}

/* pread until len bytes or end of file; returns the count or -errno. */
static ssize_t read_full(int fd, void *buf, size_t len, off_t off)
{
    size_t got = 0;
    while (got < len) {
        ssize_t r = pread(fd, (char *)buf + got, len - got, off + (off_t)got);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

int ksm_st_open(const char *path, ksm_st_file **out, char *errbuf, size_t errlen)
{
    if (errbuf != NULL && errlen > 0) errbuf[0] = '\0';
    if (path == NULL || out == NULL)
        return ksm_errf(errbuf, errlen, KSM_EINVAL, "invalid argument to ksm_st_open");
    *out = NULL;
    char ebuf[128];
    // O_NONBLOCK: opening a FIFO must not hang; it has no effect on regular files.
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        return ksm_errf(errbuf, errlen, -e, "cannot open '%s': %s", path,
                        strerror_r(e, ebuf, sizeof ebuf));
    }
    int rc;
    ksm_st_file *f = NULL;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        rc = ksm_errf(errbuf, errlen, -e, "cannot stat '%s': %s", path,
                      strerror_r(e, ebuf, sizeof ebuf));
        goto out_close;
    }
    if (S_ISDIR(st.st_mode)) {
        rc = ksm_errf(errbuf, errlen, -EISDIR, "'%s' is a directory", path);
        goto out_close;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = ksm_errf(errbuf, errlen, KSM_EINVAL, "'%s' is not a regular file", path);
        goto out_close;
    }
    if ((uint64_t)st.st_size > SIZE_MAX - ST_DATA_ALIGN) {
        rc = ksm_errf(errbuf, errlen, -EFBIG, "'%s' is too large to load", path);
        goto out_close;
    }
    size_t size = (size_t)st.st_size;
    uint8_t prefix[8];
    ssize_t np = read_full(fd, prefix, sizeof prefix, 0);
    if (np < 0) {
        rc = ksm_errf(errbuf, errlen, (int)np, "cannot read '%s': %s", path,
                      strerror_r((int)-np, ebuf, sizeof ebuf));
        goto out_close;
    }
    f = calloc(1, sizeof *f);
    uint8_t *img = f ? alloc_image(f, size, prefix, (size_t)np) : NULL;
    if (img == NULL) {
        rc = ksm_errf(errbuf, errlen, KSM_ENOMEM, "out of memory for the %zu bytes of '%s'", size,
                      path);
        goto out_free;
    }
    // A file that shrank since fstat is parsed as read (and then fails as truncated).
    ssize_t got = read_full(fd, img, size, 0);
    if (got < 0) {
        rc = ksm_errf(errbuf, errlen, (int)got, "cannot read '%s': %s", path,
                      strerror_r((int)-got, ebuf, sizeof ebuf));
        goto out_free;
    }
    char perr[512];
    rc = parse_image(f, img, (size_t)got, perr, sizeof perr);
    if (rc != 0) {
        ksm_errf(errbuf, errlen, rc, "%s: %s", path, perr);
        goto out_free;
    }
    close(fd);
    *out = f;
    return 0;

out_free:
    ksm_st_close(f);
out_close:
    close(fd);
    return rc;
}

void ksm_st_close(ksm_st_file *f)
{
    if (f == NULL) return;
    free(f->tensors);
    free(f->by_name);
    free(f->meta);
    free(f->strings);
    free(f->mem);
    free(f);
}

size_t ksm_st_count(const ksm_st_file *f) { return f ? f->n : 0; }

const struct ksm_st_tensor *ksm_st_get(const ksm_st_file *f, size_t i)
{
    return f && i < f->n ? &f->tensors[i] : NULL;
}

const struct ksm_st_tensor *ksm_st_find(const ksm_st_file *f, const char *name)
{
    if (f == NULL || name == NULL || f->n == 0) return NULL;
    struct ksm_st_tensor key = {.name = name};
    const struct ksm_st_tensor *kp = &key;
    const struct ksm_st_tensor **hit =
        bsearch(&kp, f->by_name, f->n, sizeof *f->by_name, cmp_tensor_name);
    return hit ? *hit : NULL;
}

const char *ksm_st_metadata(const ksm_st_file *f, const char *key)
{
    if (f == NULL || key == NULL || f->n_meta == 0) return NULL;
    const char *k[2] = {key, NULL};
    const char **hit = bsearch(k, f->meta, f->n_meta, 2 * sizeof *f->meta, cmp_meta);
    return hit ? hit[1] : NULL;
}

const char *ksm_st_metadata_key(const ksm_st_file *f, size_t i)
{
    return f != NULL && i < f->n_meta ? f->meta[2 * i] : NULL;
}

// ---- Writer ----

static bool unique_strings(const char **v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_str_ptr);
    for (size_t i = 1; i < n; i++)
        if (strcmp(v[i - 1], v[i]) == 0) return false;
    return true;
}

static int check_input(const struct ksm_st_tensor *tensors, size_t n, const char *const *meta,
                       size_t n_meta)
{
    if ((n > 0 && tensors == NULL) || (n_meta > 0 && meta == NULL)) return KSM_EINVAL;
    for (size_t i = 0; i < n; i++) {
        const struct ksm_st_tensor *t = &tensors[i];
        if (t->name == NULL || t->name[0] == '\0' || strcmp(t->name, "__metadata__") == 0 ||
            !ksm_utf8_valid(t->name, strlen(t->name), NULL))
            return KSM_EINVAL;
        size_t esize = ksm_dtype_size(t->dtype);
        if (esize == 0 || t->ndim < 0 || t->ndim > KSM_MAX_DIMS) return KSM_EINVAL;
        int64_t numel;
        size_t nbytes;
        if (!shape_bytes(t->ndim, t->shape, esize, &numel, &nbytes)) return KSM_EINVAL;
        if (nbytes != t->nbytes || (nbytes > 0 && t->data == NULL)) return KSM_EINVAL;
    }
    for (size_t i = 0; i < 2 * n_meta; i++)
        if (meta[i] == NULL || !ksm_utf8_valid(meta[i], strlen(meta[i]), NULL)) return KSM_EINVAL;

    size_t m = n > n_meta ? n : n_meta;
    const char **v = malloc((m ? m : 1) * sizeof *v);
    if (v == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < n; i++) v[i] = tensors[i].name;
    bool ok = unique_strings(v, n);
    for (size_t i = 0; i < n_meta; i++) v[i] = meta[2 * i];
    ok = ok && unique_strings(v, n_meta);
    free(v);
    return ok ? 0 : KSM_EINVAL;
}

/* Builds the 8-byte prefix plus padded JSON header: *hdr (malloc'd, *hdr_len bytes, a multiple
 * of ST_FILE_ALIGN) and the data section's size. */
static int build_header(const struct ksm_st_tensor *tensors, size_t n, const char *const *meta,
                        size_t n_meta, char **hdr, size_t *hdr_len, uint64_t *data_len)
{
    int rc = check_input(tensors, n, meta, n_meta);
    if (rc != 0) return rc;
    json_t *root = json_object();
    if (root == NULL) return KSM_ENOMEM;
    rc = KSM_ENOMEM;
    if (n_meta > 0) {
        json_t *m = json_object();
        if (m == NULL || json_object_set_new(root, "__metadata__", m) != 0) goto out_free_json;
        for (size_t i = 0; i < n_meta; i++)
            if (json_object_set_new(m, meta[2 * i], json_string(meta[2 * i + 1])) != 0)
                goto out_free_json;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const struct ksm_st_tensor *t = &tensors[i];
        if (t->nbytes > (uint64_t)INT64_MAX - off) {
            rc = KSM_EINVAL;
            goto out_free_json;
        }
        json_t *shape = json_array();
        json_t *e =
            json_pack("{s:s, s:o, s:[I,I]}", "dtype", ksm_dtype_name(t->dtype), "shape", shape,
                      "data_offsets", (json_int_t)off, (json_int_t)(off + t->nbytes));
        if (e == NULL || json_object_set_new(root, t->name, e) != 0) goto out_free_json;
        for (int d = 0; d < t->ndim; d++)
            if (json_array_append_new(shape, json_integer(t->shape[d])) != 0) goto out_free_json;
        off += t->nbytes;
    }
    char *js = json_dumps(root, JSON_COMPACT);
    if (js == NULL) goto out_free_json;
    size_t jl = strlen(js);
    size_t padded = (8 + jl + ST_FILE_ALIGN - 1) / ST_FILE_ALIGN * ST_FILE_ALIGN;
    if (padded - 8 > ST_HEADER_MAX) {
        rc = KSM_EINVAL;
        free(js);
        goto out_free_json;
    }
    char *h = malloc(padded);
    if (h == NULL) {
        free(js);
        goto out_free_json;
    }
    store_le64((uint8_t *)h, padded - 8);
    memcpy(h + 8, js, jl);
    memset(h + 8 + jl, ' ', padded - 8 - jl);
    free(js);
    *hdr = h;
    *hdr_len = padded;
    *data_len = off;
    rc = 0;
out_free_json:
    json_decref(root);
    return rc;
}

int ksm_st_serialize(const struct ksm_st_tensor *tensors, size_t n, const char *const *meta,
                     size_t n_meta, void **out, size_t *len)
{
    if (out == NULL || len == NULL) return KSM_EINVAL;
    *out = NULL;
    *len = 0;
    char *hdr;
    size_t hl;
    uint64_t dl;
    int rc = build_header(tensors, n, meta, n_meta, &hdr, &hl, &dl);
    if (rc != 0) return rc;
    if (dl > SIZE_MAX - hl) {
        free(hdr);
        return KSM_ENOMEM;
    }
    uint8_t *buf = malloc(hl + (size_t)dl);
    if (buf == NULL) {
        free(hdr);
        return KSM_ENOMEM;
    }
    memcpy(buf, hdr, hl);
    free(hdr);
    size_t off = hl;
    for (size_t i = 0; i < n; i++) {
        if (tensors[i].nbytes > 0) memcpy(buf + off, tensors[i].data, tensors[i].nbytes);
        off += tensors[i].nbytes;
    }
    *out = buf;
    *len = off;
    return 0;
}

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (w == 0) return KSM_EIO;
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* fsync of the directory holding path, so that a rename in it is durable. */
static int sync_dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir;
    if (slash == NULL)
        dir = strdup(".");
    else if (slash == path)
        dir = strdup("/");
    else
        dir = strndup(path, (size_t)(slash - path));
    if (dir == NULL) return KSM_ENOMEM;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dir);
    if (fd < 0) return -errno;
    int rc = fsync(fd) != 0 ? -errno : 0;
    // Some file systems cannot fsync a directory; that is not a failure of ours.
    if (rc == KSM_EINVAL) rc = 0;
    close(fd);
    return rc;
}

int ksm_st_write(const char *path, const struct ksm_st_tensor *tensors, size_t n,
                 const char *const *meta, size_t n_meta)
{
    if (path == NULL || path[0] == '\0') return KSM_EINVAL;
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (base[0] == '\0' || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) return KSM_EINVAL;

    char *hdr;
    size_t hl;
    uint64_t dl;
    int rc = build_header(tensors, n, meta, n_meta, &hdr, &hl, &dl);
    if (rc != 0) return rc;

    // The temporary sits next to the target so that rename() is atomic. O_EXCL with a fresh name
    // (not mkstemp) so that the file gets 0666 & ~umask like any other new file.
    static atomic_uint counter;
    size_t tl = strlen(path) + 64;
    char *tmp = malloc(tl);
    if (tmp == NULL) {
        free(hdr);
        return KSM_ENOMEM;
    }
    int fd = -1;
    for (int attempt = 0; attempt < 100; attempt++) {
        snprintf(tmp, tl, "%s.tmp.%ld.%u", path, (long)getpid(), atomic_fetch_add(&counter, 1u));
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0 || errno != EEXIST) break;
    }
    if (fd < 0) {
        rc = -errno;
        goto out_free;
    }

    rc = write_all(fd, hdr, hl);
    for (size_t i = 0; rc == 0 && i < n; i++)
        rc = write_all(fd, tensors[i].data, tensors[i].nbytes);
    if (rc == 0 && fsync(fd) != 0) rc = -errno;
    if (close(fd) != 0 && rc == 0) rc = -errno; // no retry: the descriptor is gone either way
    if (rc == 0 && rename(tmp, path) != 0) rc = -errno;
    if (rc != 0) {
        unlink(tmp);
        goto out_free;
    }
    // The new file is in place; a failed directory sync is still reported.
    rc = sync_dir_of(path);

out_free:
    free(tmp);
    free(hdr);
    return rc;
}

// ---- Self-checksum ----

/* The offset of the 8-character value of "key":"XXXXXXXX" in buf's header, or -1 when the key is
 * absent, -2 when the blob is malformed or the key appears more than once or its value is not 8
 * characters. An occurrence inside a JSON string value is impossible: there its quotes are
 * escaped (\"key\":\"), which the pattern does not match. */
static long long crc_value_at(const uint8_t *buf, size_t len, const char *key)
{
    if (buf == NULL || key == NULL || len < 8) return -2;
    uint64_t hl = load_le64(buf);
    if (hl > len - 8) return -2;
    char pat[160];
    int pn = snprintf(pat, sizeof pat, "\"%s\":\"", key);
    if (pn <= 0 || (size_t)pn >= sizeof pat) return -2;
    const uint8_t *h = buf + 8, *end = buf + 8 + hl, *hit = NULL;
    for (const uint8_t *q = h; q < end;) {
        const uint8_t *f = memmem(q, (size_t)(end - q), pat, (size_t)pn);
        if (f == NULL) break;
        if (hit != NULL) return -2;
        hit = f;
        q = f + 1;
    }
    if (hit == NULL) return -1;
    const uint8_t *v = hit + pn;
    if ((size_t)(end - v) < 9 || v[8] != '"') return -2;
    return (long long)(v - buf);
}

static uint32_t crc_with_placeholder(const uint8_t *buf, size_t len, size_t at)
{
    uint32_t c = ksm_crc32c(0, buf, at);
    c = ksm_crc32c(c, KSM_ST_CRC_PLACEHOLDER, 8);
    return ksm_crc32c(c, buf + at + 8, len - at - 8);
}

int ksm_st_crc32c_seal(void *buf, size_t len, const char *key)
{
    uint8_t *b = buf;
    long long at = crc_value_at(b, len, key);
    if (at < 0 || memcmp(b + at, KSM_ST_CRC_PLACEHOLDER, 8) != 0) return KSM_EINVAL;
    char hex[9];
    snprintf(hex, sizeof hex, "%08x", (unsigned)crc_with_placeholder(b, len, (size_t)at));
    memcpy(b + at, hex, 8);
    return 0;
}

int ksm_st_crc32c_check(const void *buf, size_t len, const char *key, uint32_t *stored,
                        uint32_t *actual)
{
    if (stored) *stored = 0;
    if (actual) *actual = 0;
    const uint8_t *b = buf;
    long long at = crc_value_at(b, len, key);
    if (at == -1) return KSM_ENOENT;
    if (at < 0) return KSM_EFORMAT;
    uint32_t want = 0;
    for (int i = 0; i < 8; i++) {
        char c = (char)b[at + i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return KSM_EFORMAT;
        want = want << 4 | (uint32_t)d;
    }
    uint32_t got = crc_with_placeholder(b, len, (size_t)at);
    if (stored) *stored = want;
    if (actual) *actual = got;
    return got == want ? 0 : KSM_EFORMAT;
}
