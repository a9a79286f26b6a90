/*
 * kasminactl top: a live terminal view of one kasminad: memory per device, cache hit rates,
 * models, and every slot's stage, alpha and generation. Each frame is a handful of unary calls
 * (GetServerInfo, health Check, GetMemoryStats, GetCacheStats, ListModels, GetSlotReports per
 * model), rendered into a buffer and written at once.
 *
 * Live mode on a terminal draws on the alternate screen and redraws in place every --interval
 * seconds with ANSI escape sequences (cursor home, clear to end of line/screen), cut to the
 * terminal's size; Ctrl-C (or SIGTERM) restores the screen. When stdout is not a terminal the
 * frames are written one after the other as plain text (no escape sequence at all). Between
 * frames the rate columns (cache hits/s, allocations/s) are the differences over the interval. A
 * failed call is shown in the frame and retried at the next one.
 *
 * --once prints a single frame and exits with the exit code of the first failed call, so scripts
 * and tests can read it. --model ID shows one model (its caches and slots; memory stays per
 * device). Empty slots are hidden unless --all-slots. --json writes each frame as one JSON
 * document instead (indented with --once; one line per frame in live mode, JSON Lines).
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "cmds.h"

#define TOP_MAX_PREV 4096

static volatile sig_atomic_t top_stop;

static void top_on_signal(int sig)
{
    (void)sig;
    top_stop = 1;
}

/* Counters of the previous frame, for the per-second rates. */
struct top_prev_cache {
    char key[KSM_ID_MAX + KSM_SLOT_ID_MAX + 24];
    uint64_t hits, misses;
};

struct top_prev_dev {
    char device[32];
    uint64_t allocs, ooms;
};

struct top_state {
    const char *model; /* --model: only this model's caches, model row and slots */
    bool all_slots;    /* --all-slots: empty slots too */
    json_t *doc;       /* --json: the frame being built (the text goes nowhere) */
    double interval;
    struct timespec last;
    bool have_last;
    struct top_prev_cache *cache;
    size_t n_cache;
    struct top_prev_dev dev[64];
    size_t n_dev;
};

static double top_now_diff(const struct timespec *a, const struct timespec *b)
{
    return (double)(b->tv_sec - a->tv_sec) + (double)(b->tv_nsec - a->tv_nsec) * 1e-9;
}

static const char *top_pct(uint64_t hits, uint64_t misses, char *buf, size_t len)
{
    if (hits + misses == 0)
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.1f%%", 100.0 * (double)hits / (double)(hits + misses));
    return buf;
}

/* A rate over dt seconds, or "-" on the first frame. */
static const char *top_rate(bool have, uint64_t now, uint64_t before, double dt, char *buf,
                            size_t len)
{
    if (!have || dt <= 0 || now < before)
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.1f", (double)(now - before) / dt);
    return buf;
}

/* One failed call: a line in the frame (an entry of "errors" in JSON); the first one's exit
 * code is kept. */
static void top_fail_msg(struct top_state *s, FILE *f, const char *what, const char *message,
                         int grpc_status, int *exit_code)
{
    const char *status = ksm_client_grpc_status_name(grpc_status);
    if (s->doc != NULL) {
        json_t *errs = json_object_get(s->doc, "errors");
        json_array_append_new(
            errs, json_pack("{s:s, s:s, s:s}", "call", what, "message", message, "status", status));
    } else {
        fprintf(f, "%s: %s (%s)\n", what, message, status);
    }
    if (*exit_code == 0) {
        int rc = ctl_exit_code(grpc_status);
        *exit_code = rc == CTL_EXIT_OK ? CTL_EXIT_OTHER : rc;
    }
}

static void top_fail(struct ctl *x, struct top_state *s, FILE *f, const char *what, int *exit_code)
{
    top_fail_msg(s, f, what, x->err.message, x->err.grpc_status, exit_code);
}

static void top_memory(struct ctl *x, struct top_state *s, double dt, FILE *f, int *exit_code)
{
    struct ksm_client_memory_stats ms = {0};
    if (s->doc == NULL) fprintf(f, "\nMEMORY\n");
    if (ksm_client_memory_stats(x->client, NULL, &ms, &x->err) != 0) {
        top_fail(x, s, f, "GetMemoryStats", exit_code);
        return;
    }
    json_t *jdev = s->doc != NULL ? json_object_get(s->doc, "memory") : NULL;
    static const char *const h[] = {"DEVICE", "ALLOCATED", "PEAK",      "RESERVED", "PEAK",
                                    "ACTIVE", "TOTAL",     "CAP",       "BLOCKS",   "ALLOCS/S",
                                    "OOMS",   "RETRIES",   "CACHE-HITS"};
    struct ctl_table *t = ctl_table_new(13, h);
    for (int c = 1; c < 13; c++) ctl_table_right(t, c);
    struct top_prev_dev next[64];
    size_t n_next = 0;
    for (size_t i = 0; i < ms.n; i++) {
        const struct ksm_client_device_memory *d = &ms.devices[i];
        const struct ksm_pool_stats *p = &d->stats.pool[KSM_POOL_ALL];
        char b[9][32];
        uint64_t allocs = (uint64_t)p->allocation.allocated;
        const struct top_prev_dev *prev = NULL;
        for (size_t k = 0; k < s->n_dev; k++)
            if (!strcmp(s->dev[k].device, d->device)) prev = &s->dev[k];
        ctl_table_row(t);
        ctl_table_cell(t, "%s", d->device);
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)p->allocated_bytes.current, b[0], 32));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)p->allocated_bytes.peak, b[1], 32));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)p->reserved_bytes.current, b[2], 32));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)p->reserved_bytes.peak, b[3], 32));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)p->active_bytes.current, b[4], 32));
        ctl_table_cell(t, "%s", ctl_bytes(d->stats.total_bytes, b[5], 32));
        if (d->stats.memory_cap_bytes)
            ctl_table_cell(t, "%s", ctl_bytes(d->stats.memory_cap_bytes, b[6], 32));
        else
            ctl_table_cell(t, "none");
        ctl_table_cell(t, "%" PRId64, p->allocation.current);
        ctl_table_cell(t, "%s",
                       top_rate(prev != NULL, allocs, prev ? prev->allocs : 0, dt, b[7], 32));
        ctl_table_cell(t, "%" PRIu64, d->stats.num_ooms);
        ctl_table_cell(t, "%" PRIu64, d->stats.num_alloc_retries);
        ctl_table_cell(t, "%" PRIu64, d->stats.cache_hits);
        if (jdev != NULL) {
            json_t *jd = ctl_json_mem_stats(&d->stats);
            json_object_set_new(jd, "device", json_string(d->device));
            if (prev != NULL && dt > 0 && allocs >= prev->allocs)
                json_object_set_new(jd, "allocations_per_s",
                                    json_real((double)(allocs - prev->allocs) / dt));
            json_array_append_new(jdev, jd);
        }
        if (n_next < 64) {
            snprintf(next[n_next].device, sizeof next[n_next].device, "%s", d->device);
            next[n_next].allocs = allocs;
            next[n_next].ooms = d->stats.num_ooms;
            n_next++;
        }
    }
    if (s->doc == NULL) ctl_table_print(t, f);
    ctl_table_free(t);
    memcpy(s->dev, next, n_next * sizeof next[0]);
    s->n_dev = n_next;
    ksm_client_memory_stats_free(&ms);
}

static void top_caches(struct ctl *x, struct top_state *s, double dt, FILE *f, int *exit_code)
{
    struct ksm_client_cache_counters *cc = NULL;
    size_t n = 0;
    if (s->doc == NULL) fprintf(f, "\nCACHES\n");
    if (ksm_client_cache_stats(x->client, s->model, &cc, &n, &x->err) != 0) {
        /* --model of a model that does not exist: said once, by the models section */
        if (!(s->model != NULL && x->err.code == KSM_ENOMODEL))
            top_fail(x, s, f, "GetCacheStats", exit_code);
        return;
    }
    if (n == 0) {
        if (s->doc == NULL) fprintf(f, "(no model)\n");
        free(cc);
        return;
    }
    json_t *jc = s->doc != NULL ? json_object_get(s->doc, "caches") : NULL;
    static const char *const h[] = {"MODEL",  "SLOT",    "CACHE", "HITS",    "MISSES",    "HIT%",
                                    "HITS/S", "ENTRIES", "BYTES", "EVICTED", "RECOMPILES"};
    struct ctl_table *t = ctl_table_new(11, h);
    for (int c = 3; c < 11; c++) ctl_table_right(t, c);
    size_t cap = n < TOP_MAX_PREV ? n : TOP_MAX_PREV;
    struct top_prev_cache *next = calloc(cap, sizeof *next);
    for (size_t i = 0; i < n; i++) {
        const struct ksm_cache_counters *c = &cc[i].c;
        char key[sizeof next[0].key], b[3][32];
        snprintf(key, sizeof key, "%s/%s/%s", cc[i].model_id, c->slot_id, c->cache);
        const struct top_prev_cache *prev = NULL;
        for (size_t k = 0; k < s->n_cache; k++)
            if (!strcmp(s->cache[k].key, key)) prev = &s->cache[k];
        ctl_table_row(t);
        ctl_table_cell(t, "%s", cc[i].model_id);
        ctl_table_cell(t, "%s", c->slot_id[0] ? c->slot_id : "-");
        ctl_table_cell(t, "%s", c->cache);
        ctl_table_cell(t, "%" PRIu64, c->hits);
        ctl_table_cell(t, "%" PRIu64, c->misses);
        ctl_table_cell(t, "%s", top_pct(c->hits, c->misses, b[0], 32));
        ctl_table_cell(t, "%s",
                       top_rate(prev != NULL, c->hits, prev ? prev->hits : 0, dt, b[1], 32));
        ctl_table_cell(t, "%" PRIu64 "/%" PRIu64, c->entries, c->capacity);
        ctl_table_cell(t, "%s", ctl_bytes(c->bytes, b[2], 32));
        ctl_table_cell(t, "%" PRIu64, c->evictions);
        ctl_table_cell(t, "%" PRIu64, c->recompiles);
        if (jc != NULL) {
            json_t *o = ctl_json_cache_counters(cc[i].model_id, c);
            if (prev != NULL && dt > 0 && c->hits >= prev->hits)
                json_object_set_new(o, "hits_per_s",
                                    json_real((double)(c->hits - prev->hits) / dt));
            json_array_append_new(jc, o);
        }
        if (next != NULL && i < cap) {
            snprintf(next[i].key, sizeof next[i].key, "%s", key);
            next[i].hits = c->hits;
            next[i].misses = c->misses;
        }
    }
    if (s->doc == NULL) ctl_table_print(t, f);
    ctl_table_free(t);
    free(s->cache);
    s->cache = next;
    s->n_cache = next != NULL ? cap : 0;
    free(cc);
}

static void top_models(struct ctl *x, struct top_state *s, FILE *f, int *exit_code)
{
    struct ksm_model_info *m = NULL;
    size_t n = 0;
    if (s->doc == NULL) fprintf(f, "\nMODELS\n");
    if (ksm_client_model_list(x->client, &m, &n, &x->err) != 0) {
        top_fail(x, s, f, "ListModels", exit_code);
        return;
    }
    if (s->model != NULL) { /* keep the one asked for */
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (!strcmp(m[i].model_id, s->model)) m[k++] = m[i];
        n = k;
        if (n == 0) {
            char msg[KSM_ID_MAX + 64];
            snprintf(msg, sizeof msg, "model '%s' not found", s->model);
            top_fail_msg(s, f, "ListModels", msg, 5 /* NOT_FOUND */, exit_code);
            free(m);
            return;
        }
    }
    if (n == 0) {
        if (s->doc == NULL) fprintf(f, "(no model)\n");
        free(m);
        return;
    }
    json_t *jm = s->doc != NULL ? json_object_get(s->doc, "models") : NULL;
    json_t *js = s->doc != NULL ? json_object_get(s->doc, "slots") : NULL;
    if (jm != NULL)
        for (size_t i = 0; i < n; i++) json_array_append_new(jm, ctl_json_model(&m[i]));
    else
        ctl_print_models(m, n, f);

    if (s->doc == NULL) fprintf(f, "\nSLOTS\n");
    struct ksm_slot_report *r = calloc(KSM_MAX_SLOTS, sizeof *r);
    if (r == NULL) {
        free(m);
        return;
    }
    static const char *const h[] = {"MODEL", "SLOT",       "STAGE",     "ALPHA", "TARGET", "MODE",
                                    "EPOCH", "GENERATION", "BLUEPRINT", "SEED",  "ACC"};
    struct ctl_table *t = ctl_table_new(11, h);
    for (int c = 3; c < 8; c++) ctl_table_right(t, c);
    ctl_table_right(t, 10);
    size_t hidden = 0;
    for (size_t i = 0; i < n; i++) {
        size_t nr = 0;
        if (ksm_client_slot_reports(x->client, m[i].model_id, NULL, r, KSM_MAX_SLOTS, &nr,
                                    &x->err) != 0) {
            /* A model deleted between ListModels and here is not an error worth a line. */
            if (x->err.code != KSM_ENOMODEL) top_fail(x, s, f, "GetSlotReports", exit_code);
            continue;
        }
        if (nr > KSM_MAX_SLOTS) nr = KSM_MAX_SLOTS;
        for (size_t k = 0; k < nr; k++) {
            if (!r[k].occupied && !s->all_slots) {
                hidden++;
                continue;
            }
            if (js != NULL) {
                json_t *o = ctl_json_slot_report(&r[k]);
                json_object_set_new(o, "model_id", json_string(m[i].model_id));
                json_array_append_new(js, o);
            }
            ctl_table_row(t);
            ctl_table_cell(t, "%s", m[i].model_id);
            ctl_table_cell(t, "%s", r[k].slot_id);
            if (!r[k].occupied) {
                ctl_table_cell(t, "(empty)");
                continue;
            }
            ctl_table_cell(t, "%s", ksm_stage_name(r[k].stage));
            ctl_table_cell(t, "%.4f", r[k].controller.alpha);
            ctl_table_cell(t, "%.4f", r[k].controller.alpha_target);
            ctl_table_cell(t, "%s", ksm_alpha_mode_name(r[k].controller.mode));
            ctl_table_cell(t, "%" PRIu32, r[k].metrics.epochs_in_current_stage);
            ctl_table_cell(t, "%" PRIu64, r[k].model_generation);
            ctl_table_cell(t, "%s", r[k].blueprint_id);
            ctl_table_cell(t, "%s", r[k].seed_id);
            ctl_table_cell(t, "%.2f", r[k].metrics.current_val_accuracy);
        }
    }
    if (s->doc != NULL)
        json_object_set_new(s->doc, "empty_slots_hidden", json_integer((json_int_t)hidden));
    else {
        ctl_table_print(t, f);
        if (hidden > 0)
            fprintf(f, "(%zu empty slot%s hidden; --all-slots shows them)\n", hidden,
                    hidden == 1 ? "" : "s");
    }
    ctl_table_free(t);
    free(r);
    free(m);
}

/* Renders one frame into f; returns 0 or the exit code of the first failed call. */
static int top_frame(struct ctl *x, struct top_state *s, FILE *f)
{
    int exit_code = 0;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double dt = s->have_last ? top_now_diff(&s->last, &now) : 0;

    char when[32] = "";
    time_t wall = time(NULL);
    struct tm tm;
    if (localtime_r(&wall, &tm) != NULL) strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);

    struct ksm_client_server_info info = {0};
    enum ksm_health_status hs = KSM_HEALTH_UNKNOWN;
    bool have_info = ksm_client_server_info(x->client, &info, &x->err) == 0;
    if (s->doc != NULL) {
        json_object_set_new(s->doc, "target", json_string(x->target));
        json_object_set_new(s->doc, "time", json_integer((json_int_t)wall));
        if (s->model != NULL) json_object_set_new(s->doc, "model", json_string(s->model));
        json_object_set_new(s->doc, "errors", json_array());
    }
    if (!have_info) {
        if (s->doc == NULL) fprintf(f, "kasminactl top  %s  %s\n", x->target, when);
        top_fail(x, s, f, "GetServerInfo", &exit_code);
        s->have_last = false; /* rates restart after an outage */
        return exit_code;
    }
    if (ksm_client_health(x->client, "", &hs, &x->err) != 0) hs = KSM_HEALTH_UNKNOWN;
    if (s->doc != NULL) {
        json_object_set_new(s->doc, "server", json_string(info.name));
        json_object_set_new(s->doc, "version", json_string(info.version));
        json_object_set_new(s->doc, "health", json_string(ksm_health_status_name(hs)));
        if (s->interval > 0) json_object_set_new(s->doc, "interval_s", json_real(s->interval));
        json_object_set_new(s->doc, "memory", json_array());
        json_object_set_new(s->doc, "caches", json_array());
        json_object_set_new(s->doc, "models", json_array());
        json_object_set_new(s->doc, "slots", json_array());
    } else {
        fprintf(f, "%s %s  %s  %s  %s", info.name, info.version, x->target,
                ksm_health_status_name(hs), when);
        if (s->model != NULL) fprintf(f, "  model %s", s->model);
        if (s->interval > 0) fprintf(f, "  every %.1f s", s->interval);
        fputc('\n', f);
    }
    ksm_client_server_info_free(&info);

    top_memory(x, s, dt, f, &exit_code);
    top_caches(x, s, dt, f, &exit_code);
    top_models(x, s, f, &exit_code);
    s->last = now;
    s->have_last = true;
    return exit_code;
}

/* Writes a frame in place: cursor home, each line cut to cols and ended by clear-to-EOL, at most
 * rows lines, then clear to the end of the screen. */
static void top_draw(const char *buf, size_t len, int rows, int cols)
{
    FILE *o = stdout;
    fputs("\x1b[H", o);
    int line = 0;
    size_t i = 0;
    while (i < len && line < rows) {
        size_t e = i;
        while (e < len && buf[e] != '\n') e++;
        size_t w = e - i;
        if (cols > 0 && w > (size_t)cols) w = (size_t)cols;
        fwrite(buf + i, 1, w, o);
        fputs("\x1b[K", o);
        line++;
        if (line < rows) fputs("\r\n", o);
        i = e < len ? e + 1 : e;
    }
    fputs("\x1b[J", o);
    fflush(o);
}

static void top_sleep(double seconds)
{
    struct timespec ts = {.tv_sec = (time_t)seconds,
                          .tv_nsec = (long)((seconds - floor(seconds)) * 1e9)};
    while (!top_stop && nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

struct top_args {
    struct ctl_pos pos;
    bool once;
    double interval;
    uint64_t count;
    const char *model;
    bool all_slots;
};

static int set_interval(void *args, const char *opt, const char *arg, char *err, size_t errlen)
{
    double *interval = &((struct top_args *)args)->interval;
    if (ctl_parse_double(opt, arg, interval, err, errlen) != 0) return KSM_EINVAL;
    if (*interval < 0.1 || *interval > 3600) {
        snprintf(err, errlen, "%s must be in [0.1, 3600] seconds, got '%s'", opt, arg);
        return KSM_EINVAL;
    }
    return 0;
}

static const struct ctl_opt top_opts[] = {
    {"interval", "SECONDS", CTL_ARG_SETTER, 0, 0, set_interval,
     "seconds between frames (default 2, 0.1..3600)"},
    {"once", NULL, CTL_ARG_FLAG, offsetof(struct top_args, once), 0, NULL,
     "print one plain-text frame and exit (for scripts)"},
    {"count", "N", CTL_ARG_U64, offsetof(struct top_args, count), 0, NULL,
     "stop after N frames (default: until Ctrl-C)"},
    {"model", "ID", CTL_ARG_STRING, offsetof(struct top_args, model), 0, NULL,
     "show only this model's caches and slots (memory stays per device)"},
    {"all-slots", NULL, CTL_ARG_FLAG, offsetof(struct top_args, all_slots), 0, NULL,
     "show empty slots too (hidden by default)"},
    {0},
};

static void init_top(void *args) { ((struct top_args *)args)->interval = 2.0; }

static int run_top(struct ctl *x, void *args)
{
    const struct top_args *a = args;
    bool once = a->once;
    double interval = a->interval;
    uint64_t count = a->count;
    int rc;
    if (a->model != NULL && a->model[0] == '\0')
        return ctl_usage_error(x, "--model needs a model id");
    rc = ctl_connect(x);
    if (rc) return rc;

    struct top_state s = {
        .interval = once ? 0 : interval, .model = a->model, .all_slots = a->all_slots};
    if (once) {
        if (x->json) s.doc = json_object();
        rc = top_frame(x, &s, stdout);
        if (s.doc != NULL) ctl_json_print(s.doc, stdout);
        free(s.cache);
        return rc;
    }

    /* Live: the alternate screen, cursor hidden, restored on Ctrl-C/SIGTERM. */
    struct sigaction sa = {.sa_handler = top_on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    bool tty = isatty(STDOUT_FILENO) && !x->json;
    if (tty) fputs("\x1b[?1049h\x1b[?25l\x1b[2J", stdout);
    for (uint64_t frame = 0; !top_stop && (count == 0 || frame < count); frame++) {
        char *buf = NULL;
        size_t len = 0;
        FILE *m = open_memstream(&buf, &len);
        if (m == NULL) break;
        /* Each frame's calls get a deadline of their own: a hung daemon shows up as an error
         * line, not as a frozen screen. */
        ksm_client_set_deadline(x->client,
                                (uint32_t)(interval * 1000 > 2000 ? interval * 1000 : 2000));
        if (x->json) s.doc = json_object();
        top_frame(x, &s, m);
        fclose(m);
        if (s.doc != NULL) { /* JSON Lines: one compact document per frame */
            json_dumpf(s.doc, stdout, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(10));
            fputc('\n', stdout);
            fflush(stdout);
            json_decref(s.doc);
            s.doc = NULL;
        } else if (tty) {
            int rows = 10000, cols = 0;
            struct winsize ws;
            if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 0) {
                rows = ws.ws_row;
                cols = ws.ws_col;
            }
            top_draw(buf, len, rows, cols);
        } else { /* piped: plain frames, a blank line between them, no escape sequence */
            if (frame > 0) fputc('\n', stdout);
            fwrite(buf, 1, len, stdout);
            fflush(stdout);
        }
        free(buf);
        if (count == 0 || frame + 1 < count) top_sleep(interval);
    }
    if (tty) fputs("\x1b[?25h\x1b[?1049l", stdout);
    fflush(stdout);
    free(s.cache);
    return 0;
}

const struct ctl_cmd ctl_cmd_top = {
    .name = "top",
    .summary = "live view: memory, caches, models and slots, refreshed in place",
    .positionals = "",
    .opts = top_opts,
    .args_size = sizeof(struct top_args),
    .init = init_top,
    .run = run_top,
};
