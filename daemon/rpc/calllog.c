/*
 * rpc/calllog: the daemon's log lines about calls (docs/logging.md#calls).
 *
 * Every call whose status is sent passes here once (rpc_call_finish_bytes). At debug: one line
 * per call with its method, status and latency. At warn: a failed call's status, error name and
 * message, and the warnings a successful call carries back (service/advice.h). A client that
 * retries a failing call in a loop must not flood the log, so warn lines are rate-limited per
 * method (a token bucket: RPC_WARN_BURST at once, then RPC_WARN_PER_S a second); the next line
 * let through is preceded by one that says how many were suppressed. Refusals of a bad token are
 * logged by rpc/security (rate-limited there) and client cancellations are the client's doing:
 * both only get the debug line.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <grpc/support/alloc.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "rpc/server_impl.h"

static const char kasmina_prefix[] = "/kasmina.v1.Kasmina/";

/* The method as people name it: "AdvanceStage" for Kasmina's, "grpc.health.v1.Health/Check"
 * for others, the requested path for an unknown method. */
static void method_name(const struct rpc_call *c, char *out, size_t cap)
{
    const char *path = NULL;
    char *unknown = NULL;
    if (c->m != NULL) {
        path = c->m->path;
    } else {
        unknown = grpc_slice_to_c_string(c->details.method);
        path = unknown;
    }
    if (path == NULL || path[0] == '\0') path = "unknown";
    if (strncmp(path, kasmina_prefix, sizeof kasmina_prefix - 1) == 0)
        path += sizeof kasmina_prefix - 1;
    else if (path[0] == '/')
        path++;
    /* A client chooses an unknown method's path: only printable ASCII reaches the log. */
    size_t n = 0;
    for (; path[n] != '\0' && n + 1 < cap && n < 120; n++)
        out[n] = (path[n] >= 0x20 && path[n] < 0x7f) ? path[n] : '?';
    out[n] = '\0';
    if (unknown != NULL) gpr_free(unknown);
}

static double latency_ms(const struct rpc_call *c)
{
    if (c->start_ns == 0) return 0.0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec - c->start_ns;
    return ns > 0 ? (double)(ns / 1000) * 1e-3 : 0.0; /* whole microseconds */
}

/* Whether the method's warn budget lets one more line through; logs the "suppressed" line. */
static bool warn_allowed(struct rpc_call *c, const char *method)
{
    size_t row = c->m != NULL ? (size_t)(c->m - rpc_methods) : rpc_n_methods;
    if (row >= KSM_RPC_STATS_METHODS) row = KSM_RPC_STATS_METHODS - 1;
    uint64_t suppressed = 0;
    if (!ksm_log_ratelimit_allow(&c->srv->warn_log[row], RPC_WARN_PER_S, RPC_WARN_BURST,
                                 &suppressed))
        return false;
    if (suppressed > 0) {
        struct ksm_log_field f[] = {{"method", method, 0},
                                    {"suppressed", NULL, (double)suppressed}};
        ksm_log_write_fields(KSM_LOG_WARN, "rpc", f, 2,
                             "%s: suppressed %" PRIu64 " warn line(s) (at most %.0f at once, then "
                             "%.0f a second per method)",
                             method, suppressed, RPC_WARN_BURST, RPC_WARN_PER_S);
    }
    return true;
}

void rpc_log_call(struct rpc_call *c, grpc_status_code code, int err, const char *msg)
{
    enum ksm_log_level lv = ksm_log_get_level();
    bool failed = code != GRPC_STATUS_OK;
    bool warn_failed = failed && code != GRPC_STATUS_CANCELLED &&
                       code != GRPC_STATUS_UNAUTHENTICATED && lv >= KSM_LOG_WARN;
    bool advice = !failed && c->advice.n > 0 && lv >= KSM_LOG_INFO;
    if (lv < KSM_LOG_DEBUG && !warn_failed && !advice) return;

    char method[128];
    method_name(c, method, sizeof method);
    double ms = latency_ms(c);
    const char *status = ksm_rpc_code_name((int)code);

    if (lv >= KSM_LOG_DEBUG) {
        struct ksm_log_field f[] = {
            {"method", method, 0}, {"code", status, 0}, {"latency_ms", NULL, ms}};
        ksm_log_write_fields(KSM_LOG_DEBUG, "rpc", f, 3, "%s %s %.3f ms", method, status, ms);
    }
    if (warn_failed && warn_allowed(c, method)) {
        const char *name = err != 0 ? ksm_err_name(err) : status;
        struct ksm_log_field f[] = {{"method", method, 0},
                                    {"code", status, 0},
                                    {"error", name, 0},
                                    {"latency_ms", NULL, ms}};
        ksm_log_write_fields(KSM_LOG_WARN, "rpc", f, 4, "%s failed: %s (%s): %s", method, status,
                             name, msg != NULL && msg[0] ? msg : ksm_strerror(err));
    }
    for (int i = 0; advice && i < c->advice.n && i < KSM_ADVICE_MAX; i++) {
        enum ksm_log_level al = c->advice.item[i].level;
        if (al > lv || (al <= KSM_LOG_WARN && !warn_allowed(c, method))) continue;
        struct ksm_log_field f[] = {{"method", method, 0}, {"warning", c->advice.item[i].text, 0}};
        ksm_log_write_fields(al, "rpc", f, 2, "%s: %s", method, c->advice.item[i].text);
    }
}
