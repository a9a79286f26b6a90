/*
 * kasminactl subcommands about the server: info, health, stats, empty-cache.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cmds.h"

// ---- info ----

static int run_info(struct ctl *x, void *args)
{
    (void)args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_client_server_info s;
    if (ksm_client_server_info(x->client, &s, &x->err) != 0) return ctl_call_failed(x);
    ctl_show_server_info(x->json, &s, x->target, stdout);
    ksm_client_server_info_free(&s);
    return 0;
}

const struct ctl_cmd ctl_cmd_info = {
    .name = "info",
    .summary = "server name, version, devices and blueprints (GetServerInfo)",
    .positionals = "",
    .args_size = sizeof(struct ctl_pos),
    .run = run_info,
};

// ---- health ----

struct health_args {
    struct ctl_pos pos;
    const char *service;
};

static const struct ctl_opt health_opts[] = {
    {"service", "NAME", CTL_ARG_STRING, offsetof(struct health_args, service), 0, NULL,
     "the service to check ('' = the server, kasmina.v1.Kasmina)"},
    {0},
};

static void init_health(void *args)
{
    struct health_args *a = args;
    a->service = "";
}

static int run_health(struct ctl *x, void *args)
{
    struct health_args *a = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    enum ksm_health_status st;
    if (ksm_client_health(x->client, a->service, &st, &x->err) != 0) return ctl_call_failed(x);
    if (x->json)
        ctl_json_print(
            json_pack("{s:s, s:s}", "service", a->service, "status", ksm_health_status_name(st)),
            stdout);
    else
        printf("%s\n", ksm_health_status_name(st));
    return st == KSM_HEALTH_SERVING ? 0 : CTL_EXIT_UNAVAILABLE;
}

const struct ctl_cmd ctl_cmd_health = {
    .name = "health",
    .summary = "grpc.health.v1 Check: SERVING or not (exit 6 when not)",
    .positionals = "",
    .opts = health_opts,
    .args_size = sizeof(struct health_args),
    .init = init_health,
    .run = run_health,
};

// ---- stats, empty-cache ----

struct device_args {
    struct ctl_pos pos;
    const char *device;
};

static const struct ctl_opt stats_opts[] = {
    {"device", "NAME", CTL_ARG_STRING, offsetof(struct device_args, device), 0, NULL,
     "stats memory: this device only (default: every device)"},
    {0},
};

static int run_stats(struct ctl *x, void *args)
{
    struct device_args *a = args;
    const struct ctl_pos *p = &a->pos;
    if (!strcmp(p->v[0], "memory")) {
        if (p->n > 1) return ctl_usage_error(x, "stats memory takes no MODEL (use --device)");
        int rc = ctl_connect(x);
        if (rc) return rc;
        struct ksm_client_memory_stats s;
        if (ksm_client_memory_stats(x->client, a->device, &s, &x->err) != 0)
            return ctl_call_failed(x);
        ctl_show_memory(x->json, &s, stdout);
        ksm_client_memory_stats_free(&s);
        return 0;
    }
    if (strcmp(p->v[0], "cache"))
        return ctl_usage_error(x, "expected memory or cache, got '%s'", p->v[0]);
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_client_cache_counters *v;
    size_t n;
    if (ksm_client_cache_stats(x->client, p->n > 1 ? p->v[1] : NULL, &v, &n, &x->err) != 0)
        return ctl_call_failed(x);
    ctl_show_caches(x->json, v, n, stdout);
    free(v);
    return 0;
}

const struct ctl_cmd ctl_cmd_stats = {
    .name = "stats",
    .summary = "allocator or cache statistics (GetMemoryStats, GetCacheStats)",
    .positionals = "memory|cache [MODEL]",
    .min_pos = 1,
    .max_pos = 2,
    .opts = stats_opts,
    .notes = "  stats memory [--device NAME]: the allocator of each device.\n"
             "  stats cache [MODEL]: the caches of every model, or of MODEL.",
    .args_size = sizeof(struct device_args),
    .run = run_stats,
};

static const struct ctl_opt empty_cache_opts[] = {
    {"device", "NAME", CTL_ARG_STRING, offsetof(struct device_args, device), 0, NULL,
     "this device only (default: every device)"},
    {0},
};

static int run_empty_cache(struct ctl *x, void *args)
{
    struct device_args *a = args;
    int rc = ctl_connect(x);
    if (rc) return rc;
    struct ksm_client_memory_stats s;
    if (ksm_client_empty_cache(x->client, a->device, &s, &x->err) != 0) return ctl_call_failed(x);
    ctl_show_memory(x->json, &s, stdout);
    ksm_client_memory_stats_free(&s);
    return 0;
}

const struct ctl_cmd ctl_cmd_empty_cache = {
    .name = "empty-cache",
    .summary = "release cached device blocks (EmptyCache)",
    .positionals = "",
    .opts = empty_cache_opts,
    .args_size = sizeof(struct device_args),
    .run = run_empty_cache,
};
