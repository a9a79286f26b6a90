/*
 * kasminad config: the option table and its three sources (see config.h).
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"

enum cfg_type { T_INT, T_SIZE, T_DOUBLE, T_BOOL, T_STRING, T_LIST, T_CHOICE };

struct cfg_option {
    const char *name;
    enum cfg_type type;
    double min, max; /* numbers */
    const char *def; /* default as text (NULL: none) */
    const char *choices;
    size_t offset;
    const char *doc;
};

#define OFF(f) offsetof(struct ksm_config, f)

/* clang-format off */
static const struct cfg_option options[] = {
    {"config", T_STRING, 0, 0, NULL, NULL, OFF(config_file),
     "read options from FILE (lines \"name value\"; see deploy/kasminad.conf)"},
    {"listen", T_LIST, 0, 0, NULL, NULL, OFF(listen),
     "listen on ADDR: unix:/path or host:port (repeatable; default: a Unix socket at "
     "$XDG_RUNTIME_DIR/kasmina/kasminad.sock, or /run/kasmina/kasminad.sock as root)"},
    {"allow-remote-tcp", T_BOOL, 0, 0, "false", NULL, OFF(allow_remote_tcp),
     "serve plaintext on a non-loopback TCP address (insecure: only behind a network policy, "
     "e.g. for kubelet gRPC probes); otherwise such a listener needs TLS"},
    {"state-dir", T_STRING, 0, 0, NULL, NULL, OFF(state_dir),
     "keep models (spec, snapshot, journal) in PATH and restore them at start (default "
     "$XDG_STATE_HOME/kasmina, ~/.local/state/kasmina, or /var/lib/kasmina as root)"},
    {"no-persist", T_BOOL, 0, 0, "false", NULL, OFF(no_persist),
     "keep no state on disk: models live only as long as the process"},
    {"journal-records", T_INT, 1, 100000000, "1000", NULL, OFF(journal_records),
     "journal records of a model before it is compacted into a new snapshot"},
    {"journal-bytes", T_SIZE, 4096, 1e12, "64M", NULL, OFF(journal_bytes),
     "journal bytes of a model before it is compacted into a new snapshot"},
    {"checkpoint-interval", T_INT, 0, 2147483647, "0", NULL, OFF(checkpoint_interval),
     "checkpoint a model (weights, momentum, train_step) after each TrainStep that makes its "
     "train_step a multiple of N, before that step answers (0 = only on Checkpoint calls)"},
    {"strict-restore", T_BOOL, 0, 0, "false", NULL, OFF(strict_restore),
     "refuse to start when a model's state is damaged (default: quarantine that model into "
     "STATE-DIR/quarantine and serve the others)"},
    {"metrics-listen", T_STRING, 0, 0, NULL, NULL, OFF(metrics_listen),
     "HTTP listener host:port for Prometheus /metrics, /status.json and the status page "
     "(default off)"},
    {"metrics-allow-remote", T_BOOL, 0, 0, "false", NULL, OFF(metrics_allow_remote),
     "let metrics-listen use a non-loopback address (it serves model ids and statistics to anyone "
     "who can reach it)"},
    {"cpu-devices", T_INT, 1, 16, "1", NULL, OFF(cpu_devices),
     "logical CPU devices cpu:0..cpu:N-1"},
    {"no-cuda", T_BOOL, 0, 0, "false", NULL, OFF(no_cuda),
     "do not load the CUDA backend plugin"},
    {"memory-cap", T_SIZE, 0, 1e18, "0", NULL, OFF(memory_cap),
     "per-device allocator cap in bytes (suffixes K, M, G; 0 = none)"},
    {"fault-injection", T_STRING, 0, 0, NULL, NULL, OFF(fault_injection),
     "TESTS ONLY (the test build kasminad_faults): wrap cpu:0 in a fault-injecting device fake:0 "
     "(mem-limit=BYTES,fail-malloc-nth=N,sticky-after-launches=N)"},
    {"log-level", T_CHOICE, 0, 0, "info", "error|warn|info|debug", OFF(log_level),
     "log threshold"},
    {"log-file", T_STRING, 0, 0, NULL, NULL, OFF(log_file),
     "append log lines to PATH instead of stderr (SIGHUP reopens it)"},
    {"log-format", T_CHOICE, 0, 0, "text", "text|json", OFF(log_format),
     "log line format: text, or json (one object per line, for log collectors)"},
    {"max-message-bytes", T_SIZE, 1024, 2147483647.0, "64M", NULL, OFF(max_message_bytes),
     "largest request message accepted (RESOURCE_EXHAUSTED above it)"},
    {"max-reply-bytes", T_SIZE, 1024, 2147483647.0, "64M", NULL, OFF(max_reply_bytes),
     "largest reply (logits, exported weights) built; checked before compute where the size is "
     "known (RESOURCE_EXHAUSTED above it)"},
    {"max-weights-bytes", T_SIZE, 1024, 1e12, "1G", NULL, OFF(max_weights_bytes),
     "largest safetensors blob a LoadWeightsStream or ExportWeightsStream moves, and what all "
     "weight streams in flight hold together (RESOURCE_EXHAUSTED above it)"},
    {"allow-compressed-requests", T_BOOL, 0, 0, "false", NULL, OFF(allow_compressed_requests),
     "accept gzip/deflate-compressed requests (inflated after authentication, at most "
     "max-message-bytes); otherwise they get UNIMPLEMENTED"},
    {"drain-timeout", T_DOUBLE, 0, 3600, "10", NULL, OFF(drain_timeout),
     "seconds to let calls in flight finish after SIGTERM/SIGINT before cancelling them"},
    {"workers", T_INT, 1, 64, "4", NULL, OFF(workers),
     "worker threads running unary calls"},
    {"max-concurrent-calls", T_INT, 1, 100000, "256", NULL, OFF(max_concurrent_calls),
     "unary calls queued or running before RESOURCE_EXHAUSTED"},
    {"event-ring", T_SIZE, 16, 1048576, "4096", NULL, OFF(event_ring),
     "lifecycle events kept for WatchEvents resume (after_sequence)"},
    {"subscriber-buffer", T_SIZE, 1, 1048576, "1024", NULL, OFF(subscriber_buffer),
     "events a WatchEvents subscriber may fall behind before it is ended (RESOURCE_EXHAUSTED)"},
    {"demo", T_BOOL, 0, 0, "false", NULL, OFF(demo),
     "create model \"demo\" (CNN host defaults, slots r0c0 r0c1 r0c2) at start-up"},
    {"socket-group", T_STRING, 0, 0, NULL, NULL, OFF(socket_group),
     "Unix sockets 0660 owned by this group (name or number), their directory 0750 (default: "
     "socket 0600, directory 0700)"},
    {"tls-cert", T_STRING, 0, 0, NULL, NULL, OFF(tls_cert),
     "server certificate chain (PEM): TCP listeners use TLS (required off loopback)"},
    {"tls-key", T_STRING, 0, 0, NULL, NULL, OFF(tls_key),
     "private key of tls-cert (PEM)"},
    {"tls-client-ca", T_STRING, 0, 0, NULL, NULL, OFF(tls_client_ca),
     "require TCP clients to present a certificate signed by this CA (PEM; mTLS)"},
    {"token-file", T_STRING, 0, 0, NULL, NULL, OFF(token_file),
     "require \"authorization: Bearer <token>\" on every call but grpc.health.v1 (mode 0600 "
     "file)"},
    {"max-batch-rows", T_INT, 1, 1048576, "4096", NULL, OFF(max_batch_rows),
     "input rows per Forward/FusedForward/Evaluate (RESOURCE_EXHAUSTED above)"},
    {"max-sequence-length", T_INT, 1, 1048576, "8192", NULL, OFF(max_sequence_length),
     "tokens per row of a transformer input (RESOURCE_EXHAUSTED above)"},
    {"max-models", T_INT, 1, 100000, "1024", NULL, OFF(max_models),
     "models held at once (CreateModel RESOURCE_EXHAUSTED above)"},
    {"max-seeds-per-model", T_INT, 1, 64, "64", NULL, OFF(max_seeds_per_model),
     "live seeds per model (Germinate RESOURCE_EXHAUSTED above)"},
    {"max-queued-per-stream", T_INT, 1, 100000, "16", NULL, OFF(max_queued_per_stream),
     "compute calls queued or running per model stream key (RESOURCE_EXHAUSTED above)"},
};
/* clang-format on */
#define N_OPTIONS (sizeof options / sizeof options[0])

static const struct cfg_option *find(const char *name)
{
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (strcmp(options[i].name, name) == 0) return &options[i];
    return NULL;
}

static void describe_range(const struct cfg_option *o, char *buf, size_t len)
{
    switch (o->type) {
    case T_INT: snprintf(buf, len, "an integer in [%.0f, %.0f]", o->min, o->max); break;
    case T_SIZE:
        snprintf(buf, len, "a byte count in [%.0f, %.0f] (K, M, G suffixes)", o->min, o->max);
        break;
    case T_DOUBLE: snprintf(buf, len, "a number in [%g, %g]", o->min, o->max); break;
    case T_BOOL: snprintf(buf, len, "one of true|false|yes|no|1|0"); break;
    case T_CHOICE: snprintf(buf, len, "one of %s", o->choices); break;
    default: snprintf(buf, len, "a non-empty string"); break;
    }
}

/* Sets o from text; origin names the source in errors ("--cpu-devices", "cpu-devices
 * (FILE:3)", "--cpu-devices (KASMINA_CPU_DEVICES)"). */
static int set_option(struct ksm_config *c, const struct cfg_option *o, const char *v,
                      const char *origin)
{
    void *field = (char *)c + o->offset;
    char *end = NULL;
    bool ok = true;
    errno = 0;
    switch (o->type) {
    case T_INT: {
        long long x = strtoll(v, &end, 10);
        ok = errno == 0 && end != v && *end == '\0' && x >= o->min && x <= o->max;
        if (ok) *(int *)field = (int)x;
        break;
    }
    case T_SIZE: {
        unsigned long long x = strtoull(v, &end, 10);
        ok = errno == 0 && end != v && v[0] != '-';
        unsigned long long mul = 1;
        if (ok && *end != '\0') {
            switch (toupper((unsigned char)*end)) {
            case 'K': mul = 1ull << 10; break;
            case 'M': mul = 1ull << 20; break;
            case 'G': mul = 1ull << 30; break;
            default: ok = false;
            }
            if (ok) {
                end++;
                if (toupper((unsigned char)*end) == 'I') end++;
                if (toupper((unsigned char)*end) == 'B') end++;
                ok = *end == '\0';
            }
        }
        ok = ok && (x == 0 || mul <= UINT64_MAX / x);
        double d = (double)x * (double)mul;
        ok = ok && d >= o->min && d <= o->max;
        if (ok) *(size_t *)field = (size_t)(x * mul);
        break;
    }
    case T_DOUBLE: {
        double x = strtod(v, &end);
        ok = errno == 0 && end != v && *end == '\0' && isfinite(x) && x >= o->min && x <= o->max;
        if (ok) *(double *)field = x;
        break;
    }
    case T_BOOL:
        if (!strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "1") || !strcmp(v, "on"))
            *(bool *)field = true;
        else if (!strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "0") || !strcmp(v, "off"))
            *(bool *)field = false;
        else
            ok = false;
        break;
    case T_CHOICE: {
        ok = false;
        size_t n = strlen(v);
        for (const char *p = o->choices; n > 0 && *p;) {
            const char *bar = strchr(p, '|');
            size_t len = bar ? (size_t)(bar - p) : strlen(p);
            if (len == n && strncmp(p, v, n) == 0) ok = true;
            p += len + (bar ? 1 : 0);
        }
        if (ok) {
            char **s = field;
            free(*s);
            *s = strdup(v);
        }
        break;
    }
    case T_STRING: {
        ok = v[0] != '\0';
        if (ok) {
            char **s = field;
            free(*s);
            *s = strdup(v);
        }
        break;
    }
    case T_LIST: {
        ok = v[0] != '\0' && c->n_listen < KSM_CFG_MAX_LISTEN;
        if (ok) c->listen[c->n_listen++] = strdup(v);
        break;
    }
    }
    if (!ok) {
        char range[128];
        describe_range(o, range, sizeof range);
        if (o->type == T_LIST && v[0] != '\0')
            snprintf(range, sizeof range, "given at most %d times", KSM_CFG_MAX_LISTEN);
        fprintf(stderr, "kasminad: option %s must be %s, got '%s'\n", origin, range, v);
        return KSM_EINVAL;
    }
    return 0;
}

static int load_file(struct ksm_config *c, const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "kasminad: option --config: cannot open '%s': %s\n", path, strerror(errno));
        return KSM_EINVAL;
    }
    char line[4096];
    int lineno = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f) != NULL) {
        lineno++;
        char *p = line;
        while (isspace((unsigned char)*p)) p++;
        char *hash = strchr(p, '#');
        if (hash) *hash = '\0';
        size_t n = strlen(p);
        while (n > 0 && isspace((unsigned char)p[n - 1])) p[--n] = '\0';
        if (n == 0) continue;
        char *name = p;
        while (*p && !isspace((unsigned char)*p)) p++;
        if (*p) *p++ = '\0';
        while (isspace((unsigned char)*p)) p++;
        const struct cfg_option *o = find(name);
        char origin[512];
        snprintf(origin, sizeof origin, "%.64s (%.400s:%d)", name, path, lineno);
        if (o == NULL || (o->type == T_STRING && o->offset == OFF(config_file))) {
            fprintf(stderr, "kasminad: %s:%d: unknown option '%s'\n", path, lineno, name);
            rc = KSM_EINVAL;
        } else if (o->type == T_BOOL && *p == '\0') {
            rc = set_option(c, o, "true", origin);
        } else {
            rc = set_option(c, o, p, origin);
        }
    }
    fclose(f);
    return rc;
}

static int apply_defaults(struct ksm_config *c)
{
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (options[i].def != NULL && set_option(c, &options[i], options[i].def, options[i].name))
            return KSM_EINVAL;
    return 0;
}

static void env_name(const char *opt, char *buf, size_t len)
{
    size_t k = (size_t)snprintf(buf, len, "KASMINA_");
    for (const char *p = opt; *p && k + 1 < len; p++)
        buf[k++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
    buf[k] = '\0';
}

void ksm_config_usage(FILE *f)
{
    fprintf(f, "usage: kasminad [options]\n");
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const struct cfg_option *o = &options[i];
        char lhs[64];
        const char *arg = o->type == T_BOOL     ? ""
                          : o->type == T_LIST   ? " ADDR"
                          : o->type == T_STRING ? (strstr(o->name, "listen") ? " ADDR" : " PATH")
                          : o->type == T_CHOICE ? " LEVEL"
                                                : " N";
        snprintf(lhs, sizeof lhs, "--%s%s", o->name, arg);
        fprintf(f, "  %-26s %s", lhs, o->doc);
        if (o->def != NULL && o->type != T_BOOL) fprintf(f, " (default %s)", o->def);
        fprintf(f, "\n");
    }
    fprintf(f, "  %-26s %s\n  %-26s %s\n", "--version", "print the version and exit", "--help",
            "this text");
    fprintf(f, "Every option can also be set in the config file (\"name value\") or as "
               "KASMINA_<NAME> in the environment\n(e.g. KASMINA_CPU_DEVICES=2); the command line "
               "wins over the environment, which wins over the file.\n");
}

static int config_load(struct ksm_config *c, int argc, char **argv, const char *version);

int ksm_config_load(struct ksm_config *c, int argc, char **argv, const char *version)
{
    int rc = config_load(c, argc, argv, version);
    if (rc != 0) ksm_config_fini(c); /* --help, --version or an error: nothing left to free */
    return rc;
}

static int config_load(struct ksm_config *c, int argc, char **argv, const char *version)
{
    memset(c, 0, sizeof *c);
    if (apply_defaults(c) != 0) return KSM_EINVAL;
    enum { OPT_VERSION = 1000, OPT_HELP = 1001 };
    struct option longopts[N_OPTIONS + 3];
    for (size_t i = 0; i < N_OPTIONS; i++) {
        longopts[i].name = options[i].name;
        longopts[i].has_arg = options[i].type == T_BOOL ? no_argument : required_argument;
        longopts[i].flag = NULL;
        longopts[i].val = 2000 + (int)i;
    }
    longopts[N_OPTIONS] = (struct option){"version", no_argument, NULL, OPT_VERSION};
    longopts[N_OPTIONS + 1] = (struct option){"help", no_argument, NULL, OPT_HELP};
    longopts[N_OPTIONS + 2] = (struct option){NULL, 0, NULL, 0};

    /* Pass 1: --help, --version, --config (the file loads before everything else). */
    const char *file = getenv("KASMINA_CONFIG");
    int ch;
    opterr = 0;
    optind = 0; /* 0, not 1: GNU getopt then also forgets a cluster a previous parse left */
    while ((ch = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        if (ch == OPT_VERSION) {
            printf("kasminad %s\n", version);
            return 1;
        }
        if (ch == OPT_HELP || ch == 'h') {
            ksm_config_usage(stdout);
            return 1;
        }
        if (ch >= 2000 && options[ch - 2000].offset == OFF(config_file)) file = optarg;
    }
    if (file != NULL) {
        if (load_file(c, file) != 0) return KSM_EINVAL;
        free(c->config_file);
        c->config_file = strdup(file);
    }
    /* The environment. A listen list from the environment replaces the file's. */
    for (size_t i = 0; i < N_OPTIONS; i++) {
        char name[64];
        env_name(options[i].name, name, sizeof name);
        const char *v = getenv(name);
        if (v == NULL || options[i].offset == OFF(config_file)) continue;
        char origin[128];
        snprintf(origin, sizeof origin, "--%s (%s)", options[i].name, name);
        if (options[i].type == T_LIST) {
            for (size_t k = 0; k < c->n_listen; k++) free(c->listen[k]);
            c->n_listen = 0;
            char *copy = strdup(v), *save = NULL;
            int rc = 0;
            for (char *tok = strtok_r(copy, ",", &save); tok && rc == 0;
                 tok = strtok_r(NULL, ",", &save))
                rc = set_option(c, &options[i], tok, origin);
            free(copy);
            if (rc != 0) return KSM_EINVAL;
        } else if (set_option(c, &options[i], v, origin) != 0) {
            return KSM_EINVAL;
        }
    }
    /* Pass 2: the command line. Listen addresses given there replace the others. */
    bool cli_listen = false;
    opterr = 1;
    optind = 0; /* 0, not 1: GNU getopt then also forgets a cluster a previous parse left */
    while ((ch = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        if (ch == '?' || ch == ':') {
            fprintf(stderr, "kasminad: try --help\n");
            return KSM_EINVAL;
        }
        if (ch < 2000) continue;
        const struct cfg_option *o = &options[ch - 2000];
        if (o->offset == OFF(config_file)) continue;
        if (o->type == T_LIST && !cli_listen) {
            for (size_t k = 0; k < c->n_listen; k++) free(c->listen[k]);
            c->n_listen = 0;
            cli_listen = true;
        }
        char origin[64];
        snprintf(origin, sizeof origin, "--%s", o->name);
        if (set_option(c, o, o->type == T_BOOL ? "true" : optarg, origin) != 0) return KSM_EINVAL;
    }
    if (optind < argc) {
        fprintf(stderr, "kasminad: unexpected argument '%s'\n", argv[optind]);
        return KSM_EINVAL;
    }
    if (c->state_dir != NULL && c->no_persist) {
        fprintf(stderr, "kasminad: options --state-dir and --no-persist exclude each other\n");
        return KSM_EINVAL;
    }
    if (c->checkpoint_interval != 0 && c->no_persist) {
        fprintf(stderr, "kasminad: options --checkpoint-interval and --no-persist exclude each "
                        "other (there is no state directory to checkpoint to)\n");
        return KSM_EINVAL;
    }
    return 0;
}

void ksm_config_fini(struct ksm_config *c)
{
    for (size_t i = 0; i < c->n_listen; i++) free(c->listen[i]);
    free(c->config_file);
    free(c->state_dir);
    free(c->metrics_listen);
    free(c->fault_injection);
    free(c->log_level);
    free(c->log_file);
    free(c->log_format);
    free(c->socket_group);
    free(c->tls_cert);
    free(c->tls_key);
    free(c->tls_client_ca);
    free(c->token_file);
    memset(c, 0, sizeof *c);
}
