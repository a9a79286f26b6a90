/* The shared test helpers of kt.h. */
#include "kt.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kasmina/errors.h"

/* ---- engine fixture ---- */

ksm_engine *kt_engine_new(const struct ksm_engine_config *cfg)
{
    ksm_engine *e = NULL;
    char err[512] = "";
    cr_assert_eq(ksm_engine_new(cfg, &e, err, sizeof err), 0, "ksm_engine_new: %s", err);
    return e;
}

ksm_engine *kt_engine_cpu(int n)
{
    struct ksm_engine_config cfg = {.cpu_devices = n};
    return kt_engine_new(&cfg);
}

ksm_model *kt_model_new(ksm_engine *e, const char *id, struct ksm_model_spec spec)
{
    ksm_model *m = NULL;
    char err[512] = "";
    cr_assert_eq(ksm_engine_model_create(e, id, &spec, &m, err, sizeof err), 0, "create %s: %s", id,
                 err);
    return m;
}

/* ---- goldens ---- */

ksm_st_file *kt_golden_open(const char *file)
{
    char path[1024], err[256] = "";
    snprintf(path, sizeof path, "%s/%s", KSM_GOLDEN_DIR, file);
    ksm_st_file *f = NULL;
    cr_assert_eq(ksm_st_open(path, &f, err, sizeof err), 0, "%s: %s", path, err);
    return f;
}

const struct ksm_st_tensor *kt_golden_need(ksm_st_file *f, const char *name)
{
    const struct ksm_st_tensor *t = ksm_st_find(f, name);
    cr_assert_not_null(t, "fixture tensor %s missing", name);
    return t;
}

float *kt_golden_floats(const struct ksm_st_tensor *t)
{
    cr_assert_eq(t->dtype, KSM_DTYPE_F32, "%s: not F32", t->name);
    float *v = malloc(t->nbytes ? t->nbytes : 4);
    cr_assert_not_null(v);
    memcpy(v, t->data, t->nbytes);
    return v;
}

void kt_golden_host_tensor(const struct ksm_st_tensor *t, ksm_tensor *x)
{
    void *copy = malloc(t->nbytes ? t->nbytes : 1);
    cr_assert_not_null(copy);
    memcpy(copy, t->data, t->nbytes);
    cr_assert_eq(ksm_tensor_init(x, NULL, copy, t->dtype, t->ndim, t->shape), 0, "%s", t->name);
}

struct kt_diff kt_diff_f32(const float *got, const float *ref, int64_t n)
{
    struct kt_diff d = {.worst = -1};
    for (int64_t i = 0; i < n; i++) {
        float o = got[i], r = ref[i];
        if (!isfinite(o) || !isfinite(r)) {
            bool same = (isnan(o) && isnan(r)) || o == r;
            if (!same && d.nonfinite++ == 0) {
                d.worst = i;
                d.got = o;
                d.ref = r;
            }
            continue;
        }
        double ad = fabs((double)o - (double)r);
        if (d.nonfinite == 0 && (d.worst < 0 || ad > d.max_d)) {
            d.worst = i;
            d.got = o;
            d.ref = r;
        }
        if (ad > d.max_d) d.max_d = ad;
        if (fabs((double)r) > d.max_ref) d.max_ref = fabs((double)r);
    }
    d.rel = d.max_d / (d.max_ref > 0 ? d.max_ref : 1);
    return d;
}

double kt_golden_expect_f32(const char *what, const float *got, const float *ref, int64_t n,
                            double tol)
{
    struct kt_diff d = kt_diff_f32(got, ref, n);
    cr_expect(d.nonfinite == 0 && d.rel <= tol,
              "%s: max|d|/max|ref| = %.3g (max|d| %.3g, max|ref| %.3g; tolerance %.1g), "
              "%lld NaN/Inf positions differ; worst element [%lld]: got %.9g, expected %.9g",
              what, d.rel, d.max_d, d.max_ref, tol, (long long)d.nonfinite, (long long)d.worst,
              d.got, d.ref);
    return d.nonfinite ? INFINITY : d.rel;
}

/* The value of key=... in a space-separated description, or "" (into buf). */
static void meta_word(const char *desc, const char *key, char *buf, size_t len)
{
    size_t kl = strlen(key);
    buf[0] = '\0';
    for (const char *p = desc; p && *p;) {
        if (strncmp(p, key, kl) == 0 && p[kl] == '=') {
            size_t n = strcspn(p + kl + 1, " ");
            snprintf(buf, len, "%.*s", (int)n, p + kl + 1);
            return;
        }
        p = strchr(p, ' ');
        if (p) p++;
    }
}

static void cases_free(struct criterion_test_params *p) { cr_free(p->params); }

/* Calls fn for every case of files; returns the count. */
static int each_case(const char *const *files, void (*fn)(void *, const struct kt_golden_case *),
                     void *ud)
{
    int n = 0;
    for (const char *const *file = files; *file; file++) {
        char path[1024], err[256];
        snprintf(path, sizeof path, "%s/%s", KSM_GOLDEN_DIR, *file);
        ksm_st_file *f;
        if (ksm_st_open(path, &f, err, sizeof err) != 0) continue;
        const char *cases = ksm_st_metadata(f, "cases");
        char *list = strdup(cases ? cases : ""), *save = NULL;
        for (char *c = strtok_r(list, ",", &save); c; c = strtok_r(NULL, ",", &save)) {
            struct kt_golden_case k = {0};
            snprintf(k.file, sizeof k.file, "%s", *file);
            snprintf(k.name, sizeof k.name, "%s", c);
            const char *desc = ksm_st_metadata(f, c);
            if (desc) meta_word(desc, "op", k.op, sizeof k.op);
            fn(ud, &k);
            n++;
        }
        free(list);
        ksm_st_close(f);
    }
    return n;
}

struct collect {
    struct kt_golden_case *out;
    int n;
    const char *op;
};

static void count_one(void *ud, const struct kt_golden_case *k)
{
    struct collect *c = ud;
    if (c->op == NULL || strcmp(c->op, k->op) == 0) c->n++;
}

static void store_one(void *ud, const struct kt_golden_case *k)
{
    struct collect *c = ud;
    c->out[c->n++] = *k;
}

struct criterion_test_params kt_golden_cases(const char *const *files)
{
    struct collect c = {0};
    int n = each_case(files, count_one, &c);
    c.n = 0;
    c.out = cr_malloc(sizeof *c.out * (size_t)(n > 0 ? n : 1));
    each_case(files, store_one, &c);
    return cr_make_param_array(struct kt_golden_case, c.out, (size_t)c.n, cases_free);
}

int kt_golden_count(const char *const *files, const char *op)
{
    struct collect c = {.op = op};
    each_case(files, count_one, &c);
    return c.n;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const struct kt_golden_case *)a)->name,
                  ((const struct kt_golden_case *)b)->name);
}

struct criterion_test_params kt_golden_dir_cases(const char *dir, const char *suffix)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", KSM_GOLDEN_DIR, dir);
    size_t cap = 0, n = 0, ls = strlen(suffix);
    struct kt_golden_case *out = NULL;
    DIR *d = opendir(path);
    for (struct dirent *de; d && (de = readdir(d)) != NULL;) {
        size_t l = strlen(de->d_name);
        if (l <= ls || strcmp(de->d_name + l - ls, suffix) != 0) continue;
        if (n == cap) {
            struct kt_golden_case *grown = cr_malloc(sizeof *grown * (cap = cap ? 2 * cap : 32));
            if (out) {
                memcpy(grown, out, sizeof *out * n);
                cr_free(out);
            }
            out = grown;
        }
        struct kt_golden_case k = {0};
        snprintf(k.file, sizeof k.file, "%s", dir);
        snprintf(k.name, sizeof k.name, "%.*s", (int)(l - ls), de->d_name);
        out[n++] = k;
    }
    if (d) closedir(d);
    if (out == NULL) out = cr_malloc(sizeof *out);
    qsort(out, n, sizeof *out, by_name);
    return cr_make_param_array(struct kt_golden_case, out, n, cases_free);
}

int kt_golden_dir_count(const char *dir, const char *suffix)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", KSM_GOLDEN_DIR, dir);
    int n = 0;
    size_t ls = strlen(suffix);
    DIR *d = opendir(path);
    for (struct dirent *de; d && (de = readdir(d)) != NULL;) {
        size_t l = strlen(de->d_name);
        if (l > ls && strcmp(de->d_name + l - ls, suffix) == 0) n++;
    }
    if (d) closedir(d);
    return n;
}

/* ---- files ---- */

char *kt_tmpdir(const char *tag)
{
    const char *base = getenv("TMPDIR");
    char *dir = NULL;
    cr_assert_gt(asprintf(&dir, "%s/ksm-%s-XXXXXX", base && *base ? base : "/tmp", tag), 0);
    cr_assert_not_null(mkdtemp(dir), "mkdtemp %s: %s", dir, strerror(errno));
    return dir;
}

static int rm_one(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    int rc = type == FTW_DP ? rmdir(path) : unlink(path);
    if (rc != 0) fprintf(stderr, "kt_rmtree: %s: %s\n", path, strerror(errno));
    return rc;
}

void kt_rmtree(const char *path)
{
    cr_assert_eq(nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS), 0, "removing %s", path);
}

void *kt_read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    cr_assert_not_null(fp, "cannot open %s: %s", path, strerror(errno));
    cr_assert_eq(fseek(fp, 0, SEEK_END), 0);
    long n = ftell(fp);
    cr_assert_geq(n, 0);
    rewind(fp);
    void *buf = malloc((size_t)n + 1);
    cr_assert_not_null(buf);
    cr_assert_eq(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return buf;
}
