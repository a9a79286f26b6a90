/*
 * libkasmina-client's weights calls against a real kasminad: the streams (LoadWeightsStream,
 * ExportWeightsStream) and the AUTO choice, with a client whose message limit (1 MiB) is below
 * the model's file (~1.6 MB); a cancelled stream changes nothing and frees what the daemon held
 * (the ASan build's daemon reports leaks at exit); partial exports; ConfigureSlot.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/client.h"
#include "kasmina/safetensors.h"
#include "rpc_daemon.h"

TestSuite(weights_client, .timeout = 240);

#define OK(call)                                                                                   \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        cr_assert_eq(rc_, 0, "%s: %s (%s)", #call, e.message, ksm_err_name(rc_));                  \
    } while (0)

/* base_channels 64, 3 blocks: ~0.4M parameters, a ~1.5 MB file. */
static struct ksm_model_spec cnn(uint64_t seed)
{
    struct ksm_model_spec s = {.topology = KSM_TOPOLOGY_CNN,
                               .cnn = {.num_classes = 10, .base_channels = 64, .pool_layers = -1},
                               .init_seed = seed,
                               .permissive_gates = true};
    return s;
}

static ksm_client *connect_small(const struct rpc_daemon *d)
{
    ksm_client *c;
    struct ksm_client_error e;
    struct ksm_client_options o = {.deadline_ms = 60000, .max_message_bytes = 1u << 20};
    cr_assert_eq(ksm_client_connect(d->target, &o, &c, &e), 0, "%s", e.message);
    return c;
}

struct progress {
    uint64_t last, total;
    int calls, cancel_after;
};

static int on_progress(void *ud, uint64_t done, uint64_t total)
{
    struct progress *p = ud;
    cr_expect(done > p->last || done == total, "progress went back: %llu after %llu",
              (unsigned long long)done, (unsigned long long)p->last);
    p->last = done;
    p->total = total;
    p->calls++;
    return p->cancel_after > 0 && p->calls >= p->cancel_after ? 42 : 0;
}

Test(weights_client, streams_past_the_client_limit)
{
    struct rpc_daemon d;
    rpc_daemon_start(&d);
    ksm_client *c = connect_small(&d);
    struct ksm_client_error e;
    struct ksm_model_info mi;
    struct ksm_model_spec a = cnn(1), b = cnn(2);
    OK(ksm_client_model_create(c, "a", &a, &mi, &e));
    OK(ksm_client_model_create(c, "b", &b, &mi, &e));

    /* The unary calls cannot: the sentences name the client's option and the stream. */
    struct ksm_client_weights_options never = {.stream = KSM_CLIENT_STREAM_NEVER};
    void *buf = NULL;
    size_t len = 0;
    int rc = ksm_client_export_weights_ex(c, "a", &never, &buf, &len, &e);
    cr_expect_eq(rc, KSM_ELIMIT, "%s (%s)", ksm_err_name(rc), e.message);
    cr_expect_not_null(strstr(e.message, "client's max message size 1048576"), "%s", e.message);
    cr_expect_not_null(strstr(e.message, "--max-message-bytes"), "%s", e.message);
    cr_expect_not_null(strstr(e.message, "export-weights --stream"), "%s", e.message);

    /* AUTO streams; the progress callback sees every chunk. */
    struct progress pa = {0};
    struct ksm_client_weights_options autoo = {.progress = on_progress, .progress_ud = &pa};
    OK(ksm_client_export_weights_ex(c, "a", &autoo, &buf, &len, &e));
    cr_assert_gt(len, (size_t)1 << 20, "the file is %zu bytes", len);
    cr_expect_eq(pa.last, len);
    cr_expect_eq(pa.total, len);
    void *bb = NULL;
    size_t blen = 0;
    OK(ksm_client_export_weights(c, "b", &bb, &blen, &e));
    cr_assert_eq(blen, len);
    cr_expect_neq(memcmp(bb, buf, len), 0, "a and b start different");
    free(bb);

    struct ksm_load_result r;
    rc = ksm_client_load_weights_ex(c, "b", buf, len, true, &never, &r, &e);
    cr_expect_eq(rc, KSM_ELIMIT, "%s (%s)", ksm_err_name(rc), e.message);
    cr_expect_not_null(strstr(e.message, "load-weights --stream"), "%s", e.message);

    /* A cancelled stream (the progress callback stops it after 3 chunks of 64 KiB) changes
     * nothing. */
    struct ksm_model_info before, mid, after;
    OK(ksm_client_model_get(c, "b", &before, &e));
    struct progress pc = {.cancel_after = 3};
    struct ksm_client_weights_options cancel = {.stream = KSM_CLIENT_STREAM_ALWAYS,
                                                .chunk_bytes = 64 << 10,
                                                .progress = on_progress,
                                                .progress_ud = &pc};
    rc = ksm_client_load_weights_ex(c, "b", buf, len, true, &cancel, &r, &e);
    cr_expect_eq(rc, 42, "the callback's value is returned: %d (%s)", rc, e.message);
    OK(ksm_client_model_get(c, "b", &mid, &e));
    cr_expect_eq(mid.generation, before.generation, "the cancelled stream changed b");

    /* Small chunks (many of them), then AUTO with the default chunk: both load it. */
    struct ksm_client_weights_options small = {.stream = KSM_CLIENT_STREAM_ALWAYS,
                                               .chunk_bytes = 100000};
    OK(ksm_client_load_weights_ex(c, "b", buf, len, true, &small, &r, &e));
    cr_expect_gt(r.n_loaded, 10);
    cr_expect_eq(r.n_missing + r.n_unexpected, 0);
    ksm_load_result_free(&r);
    OK(ksm_client_model_get(c, "b", &after, &e));
    cr_expect_eq(after.generation, before.generation + 1, "one load: %llu -> %llu",
                 (unsigned long long)before.generation, (unsigned long long)after.generation);
    OK(ksm_client_load_weights(c, "b", buf, len, true, &r, &e));
    ksm_load_result_free(&r);
    OK(ksm_client_export_weights(c, "b", &bb, &blen, &e));
    cr_assert_eq(blen, len);
    cr_expect_eq(memcmp(bb, buf, len), 0, "b exports a's file byte for byte");
    free(bb);

    /* A missing model: the stream's first chunk is refused. */
    rc = ksm_client_load_weights_ex(c, "nope", buf, len, false, &small, &r, &e);
    cr_expect_eq(rc, KSM_ENOMODEL, "%s (%s)", ksm_err_name(rc), e.message);
    free(buf);
    ksm_client_close(c);
    cr_expect_eq(rpc_daemon_stop(&d), 0, "kasminad did not exit cleanly");
}

Test(weights_client, partial_export_and_slot_settings)
{
    struct rpc_daemon d;
    rpc_daemon_start(&d);
    ksm_client *c = rpc_connect(&d);
    struct ksm_client_error e;
    struct ksm_model_info mi;
    struct ksm_model_spec a = cnn(1);
    a.cnn.base_channels = 8;
    OK(ksm_client_model_create(c, "a", &a, &mi, &e));
    struct ksm_germinate_args g = {.blueprint_id = "norm"};
    struct ksm_slot_report rep;
    OK(ksm_client_germinate(c, "a", "r0c1", &g, &rep, &e));

    const char *slots[] = {"r0c1"};
    for (int host = 0; host < 2; host++)
        for (int mode = KSM_CLIENT_STREAM_NEVER; mode <= KSM_CLIENT_STREAM_ALWAYS; mode++) {
            struct ksm_client_weights_options o = {.stream = (enum ksm_client_stream_mode)mode,
                                                   .slots = slots,
                                                   .n_slots = 1,
                                                   .include_host = host};
            void *buf = NULL;
            size_t len = 0;
            OK(ksm_client_export_weights_ex(c, "a", &o, &buf, &len, &e));
            ksm_st_file *f;
            char why[128];
            cr_assert_eq(ksm_st_parse(buf, len, &f, why, sizeof why), 0, "%s", why);
            bool any_host = false, other = false;
            for (size_t i = 0; i < ksm_st_count(f); i++) {
                const char *n = ksm_st_get(f, i)->name;
                any_host |= strncmp(n, "host.", 5) == 0;
                other |= strncmp(n, "host.", 5) != 0 && strncmp(n, "seed_slots.r0c1.", 16) != 0;
            }
            cr_expect_eq(any_host, host == 1, "include_host %d, mode %d", host, mode);
            cr_expect(!other, "a tensor of another slot (mode %d)", mode);
            cr_expect_not_null(ksm_st_metadata(f, "seed_slots.r0c1._extra_state"));
            cr_expect_null(ksm_st_metadata(f, "seed_slots.r0c0._extra_state"));
            ksm_st_close(f);
            free(buf);
        }

    struct ksm_slot_settings s = {.set_isolate_gradients = true,
                                  .isolate_gradients = true,
                                  .set_auto_forward_gates = true,
                                  .auto_forward_gates = 1u << KSM_GATE_G2};
    struct ksm_slot_report reps[KSM_MAX_SLOTS];
    size_t n = 0;
    OK(ksm_client_configure_slot(c, "a", NULL, &s, reps, KSM_MAX_SLOTS, &n, &e));
    cr_assert_eq(n, (size_t)mi.n_slots);
    for (size_t i = 0; i < n; i++) {
        cr_expect(reps[i].isolate_gradients, "%s", reps[i].slot_id);
        cr_expect_eq(reps[i].auto_forward_gates, 1u << KSM_GATE_G2, "%s", reps[i].slot_id);
    }
    struct ksm_slot_settings only = {.set_auto_forward_gates = true, .auto_forward_gates = 0};
    OK(ksm_client_configure_slot(c, "a", "r0c1", &only, reps, KSM_MAX_SLOTS, &n, &e));
    cr_assert_eq(n, 1);
    cr_expect(reps[0].isolate_gradients && reps[0].auto_forward_gates == 0);
    struct ksm_slot_settings bad = {.set_auto_forward_gates = true, .auto_forward_gates = 1u};
    int rc = ksm_client_configure_slot(c, "a", "r0c1", &bad, NULL, 0, NULL, &e);
    cr_expect_eq(rc, KSM_EINVAL, "%s (%s)", ksm_err_name(rc), e.message);
    ksm_client_close(c);
    cr_expect_eq(rpc_daemon_stop(&d), 0, "kasminad did not exit cleanly");
}
