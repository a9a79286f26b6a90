/*
 * wire/pbgather: unpacking a message from pieces with big bytes fields copied once. The reference
 * is protobuf-c's own protobuf_c_message_unpack of the concatenated bytes: every result must
 * pack to the same bytes as the reference's (or both fail), whatever the cut into pieces, and the
 * big fields must sit in 64-byte-aligned buffers of their own.
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/v1/kasmina.pb-c.h"
#include "wire/pbgather.h"

TestSuite(pbgather, .timeout = 60);

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t next(void)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1Dull;
}

static uint8_t *pack(const ProtobufCMessage *m, size_t *len)
{
    *len = protobuf_c_message_get_packed_size(m);
    uint8_t *b = malloc(*len ? *len : 1);
    cr_assert_not_null(b);
    protobuf_c_message_pack(m, b);
    return b;
}

static void fill(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)next();
}

/* Cuts buf into pieces at `cuts` random places (some pieces empty) and unpacks. */
static ProtobufCMessage *unpack_cut(const ProtobufCMessageDescriptor *d, const uint8_t *buf,
                                    size_t len, int cuts, size_t big, size_t *n_direct)
{
    enum { MAXP = 40 };
    size_t at[MAXP];
    int n = cuts < MAXP - 2 ? cuts : MAXP - 2;
    for (int i = 0; i < n; i++) at[i] = len ? (size_t)(next() % (len + 1)) : 0;
    /* sort the cut points */
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && at[j - 1] > at[j]; j--) {
            size_t t = at[j];
            at[j] = at[j - 1];
            at[j - 1] = t;
        }
    struct ksm_pb_piece p[MAXP];
    size_t prev = 0;
    int k = 0;
    for (int i = 0; i < n; i++) {
        p[k++] = (struct ksm_pb_piece){buf + prev, at[i] - prev};
        prev = at[i];
    }
    p[k++] = (struct ksm_pb_piece){buf + prev, len - prev};
    return ksm_pb_unpack_pieces(d, p, (size_t)k, big, n_direct);
}

/* Unpacks buf in several cuts with threshold big and compares with protobuf-c. Returns the
 * number of fields copied directly in the last cut (the same in every cut). */
static size_t check_same(const ProtobufCMessageDescriptor *d, const uint8_t *buf, size_t len,
                         size_t big)
{
    ProtobufCMessage *ref = protobuf_c_message_unpack(d, NULL, len, buf);
    size_t rlen = 0;
    uint8_t *rb = ref ? pack(ref, &rlen) : NULL;
    size_t direct = 0, first = SIZE_MAX;
    static const int cuts[] = {0, 1, 2, 5, 17, 38};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        ProtobufCMessage *got = unpack_cut(d, buf, len, cuts[c], big, &direct);
        if (ref == NULL) {
            cr_assert_null(got, "protobuf-c rejects the input but the piecewise unpack did not");
        } else {
            cr_assert_not_null(got, "the piecewise unpack failed where protobuf-c did not");
            size_t glen;
            uint8_t *gb = pack(got, &glen);
            cr_assert_eq(glen, rlen, "packed sizes differ (%zu vs %zu), %d cuts", glen, rlen,
                         cuts[c]);
            cr_assert_eq(memcmp(gb, rb, rlen), 0, "the unpacked messages differ, %d cuts", cuts[c]);
            free(gb);
            protobuf_c_message_free_unpacked(got, NULL);
        }
        if (first == SIZE_MAX) first = direct;
        cr_assert_eq(direct, first, "the cut changed what was copied directly");
    }
    free(rb);
    if (ref) protobuf_c_message_free_unpacked(ref, NULL);
    return direct;
}

static Kasmina__V1__Tensor tensor(uint8_t *data, size_t n, int64_t *shape)
{
    Kasmina__V1__Tensor t = KASMINA__V1__TENSOR__INIT;
    t.dtype = KASMINA__V1__DTYPE__DTYPE_F32;
    shape[0] = (int64_t)(n / 4);
    t.shape = shape;
    t.n_shape = 1;
    t.data.data = data;
    t.data.len = n;
    return t;
}

Test(pbgather, a_forward_request_tensor_is_copied_once_into_an_aligned_buffer)
{
    size_t n = 1536 * 1024;
    uint8_t *data = malloc(n);
    fill(data, n);
    int64_t shape[1];
    Kasmina__V1__Tensor t = tensor(data, n, shape);
    Kasmina__V1__ForwardRequest r = KASMINA__V1__FORWARD_REQUEST__INIT;
    r.model_id = "cnn";
    r.input = &t;
    r.stream = "s1";
    r.output_dtype = KASMINA__V1__DTYPE__DTYPE_F16;
    size_t len;
    uint8_t *buf = pack(&r.base, &len);
    cr_expect_eq(check_same(&kasmina__v1__forward_request__descriptor, buf, len, KSM_PB_GATHER_MIN),
                 1);
    /* Below the threshold: the plain way, same result. */
    cr_expect_eq(check_same(&kasmina__v1__forward_request__descriptor, buf, len, n + 1), 0);
    cr_expect_eq(check_same(&kasmina__v1__forward_request__descriptor, buf, len, 0), 0);

    size_t direct;
    Kasmina__V1__ForwardRequest *got = (Kasmina__V1__ForwardRequest *)unpack_cut(
        &kasmina__v1__forward_request__descriptor, buf, len, 30, KSM_PB_GATHER_MIN, &direct);
    cr_assert_not_null(got);
    cr_expect_eq(direct, 1);
    cr_expect_eq((uintptr_t)got->input->data.data % 64, 0);
    cr_expect_eq(got->input->data.len, n);
    cr_expect_eq(memcmp(got->input->data.data, data, n), 0);
    cr_expect_str_eq(got->model_id, "cnn");
    cr_expect_str_eq(got->stream, "s1");
    cr_expect_eq(got->input->n_shape, 1);
    cr_expect_eq(got->input->shape[0], (int64_t)(n / 4));
    protobuf_c_message_free_unpacked(&got->base, NULL);
    free(buf);
    free(data);
}

Test(pbgather, every_big_field_along_repeated_and_nested_messages)
{
    /* An EvaluateResponse: three results, two with logits (one small), then scalars. */
    enum { R = 3 };
    size_t sizes[R] = {70000, 100, 200000};
    uint8_t *d[R];
    int64_t shape[R][1];
    Kasmina__V1__Tensor t[R];
    Kasmina__V1__ConfigResult cr[R], *pcr[R];
    for (int i = 0; i < R; i++) {
        d[i] = malloc(sizes[i]);
        fill(d[i], sizes[i]);
        t[i] = tensor(d[i], sizes[i], shape[i]);
        kasmina__v1__config_result__init(&cr[i]);
        cr[i].name = i == 0 ? "main" : "other";
        cr[i].loss = 1.5 + i;
        cr[i].logits = &t[i];
        pcr[i] = &cr[i];
    }
    Kasmina__V1__EvaluateResponse e = KASMINA__V1__EVALUATE_RESPONSE__INIT;
    e.results = pcr;
    e.n_results = R;
    e.model_generation = 42;
    size_t len;
    uint8_t *buf = pack(&e.base, &len);
    cr_expect_eq(check_same(&kasmina__v1__evaluate_response__descriptor, buf, len, 65536), 2);
    cr_expect_eq(check_same(&kasmina__v1__evaluate_response__descriptor, buf, len, 1), 3);
    Kasmina__V1__EvaluateResponse *got = (Kasmina__V1__EvaluateResponse *)unpack_cut(
        &kasmina__v1__evaluate_response__descriptor, buf, len, 9, 65536, NULL);
    cr_assert_not_null(got);
    cr_assert_eq(got->n_results, R);
    for (int i = 0; i < R; i++) {
        cr_expect_eq(got->results[i]->logits->data.len, sizes[i]);
        cr_expect_eq(memcmp(got->results[i]->logits->data.data, d[i], sizes[i]), 0);
    }
    cr_expect_eq((uintptr_t)got->results[0]->logits->data.data % 64, 0);
    cr_expect_eq((uintptr_t)got->results[2]->logits->data.data % 64, 0);
    protobuf_c_message_free_unpacked(&got->base, NULL);
    free(buf);
    for (int i = 0; i < R; i++) free(d[i]);
}

Test(pbgather, a_top_level_bytes_field_and_unknown_fields)
{
    /* LoadWeights: the safetensors blob is a top-level bytes field. */
    size_t n = 300000;
    uint8_t *data = malloc(n);
    fill(data, n);
    Kasmina__V1__LoadWeightsRequest r = KASMINA__V1__LOAD_WEIGHTS_REQUEST__INIT;
    r.model_id = "m";
    r.safetensors.data = data;
    r.safetensors.len = n;
    r.strict = true;
    size_t len;
    uint8_t *buf = pack(&r.base, &len);
    cr_expect_eq(check_same(&kasmina__v1__load_weights_request__descriptor, buf, len, 4096), 1);
    /* An unknown length-delimited field (number 1000) of 100 kB after it: kept as unknown. */
    size_t ulen = 100000;
    uint8_t *big = malloc(len + 8 + ulen);
    memcpy(big, buf, len);
    size_t k = len;
    big[k++] = (uint8_t)((1000 << 3 | 2) & 0x7f) | 0x80;
    big[k++] = (uint8_t)(1000 >> 4);
    for (size_t v = ulen; v >= 0x80; v >>= 7) big[k++] = (uint8_t)(v & 0x7f) | 0x80;
    big[k++] = (uint8_t)(ulen >> 14);
    fill(big + k, ulen);
    k += ulen;
    cr_expect_eq(check_same(&kasmina__v1__load_weights_request__descriptor, big, k, 4096), 1);
    free(big);
    free(buf);
    free(data);
}

Test(pbgather, ambiguous_messages_take_the_plain_way)
{
    /* Two ForwardRequests concatenated are one message whose input fields merge (and whose data
     * is the second's): protobuf-c's semantics, not a single place to put a buffer. */
    size_t n = 100000;
    uint8_t *d1 = malloc(n), *d2 = malloc(n / 2);
    fill(d1, n);
    fill(d2, n / 2);
    int64_t s1[1], s2[1];
    Kasmina__V1__Tensor t1 = tensor(d1, n, s1), t2 = tensor(d2, n / 2, s2);
    Kasmina__V1__ForwardRequest a = KASMINA__V1__FORWARD_REQUEST__INIT,
                                b = KASMINA__V1__FORWARD_REQUEST__INIT;
    a.model_id = "a";
    a.input = &t1;
    b.model_id = "b";
    b.input = &t2;
    size_t la, lb;
    uint8_t *ba = pack(&a.base, &la), *bb = pack(&b.base, &lb);
    uint8_t *both = malloc(la + lb);
    memcpy(both, ba, la);
    memcpy(both + la, bb, lb);
    cr_expect_eq(check_same(&kasmina__v1__forward_request__descriptor, both, la + lb, 1024), 0);
    /* A Tensor whose data field appears twice: the last wins. */
    Kasmina__V1__Tensor t3 = KASMINA__V1__TENSOR__INIT;
    t3.data.data = d2;
    t3.data.len = 5000;
    size_t l1, l3;
    uint8_t *p1 = pack(&t1.base, &l1), *p3 = pack(&t3.base, &l3);
    uint8_t *tt = malloc(l1 + l3);
    memcpy(tt, p1, l1);
    memcpy(tt + l1, p3, l3);
    cr_expect_eq(check_same(&kasmina__v1__tensor__descriptor, tt, l1 + l3, 1024), 0);
    free(tt);
    free(p1);
    free(p3);
    free(both);
    free(ba);
    free(bb);
    free(d1);
    free(d2);
}

Test(pbgather, malformed_and_mutated_input_fails_or_agrees_with_protobuf_c)
{
    size_t n = 9000;
    uint8_t *data = malloc(n);
    fill(data, n);
    int64_t shape[1];
    Kasmina__V1__Tensor t = tensor(data, n, shape);
    Kasmina__V1__AlphaOverride ov = KASMINA__V1__ALPHA_OVERRIDE__INIT, *pov = &ov;
    float alphas[4] = {0.25f, 0.5f, 0.75f, 1};
    ov.slot_id = "r0c1";
    ov.alpha = alphas;
    ov.n_alpha = 4;
    Kasmina__V1__FusedForwardRequest r = KASMINA__V1__FUSED_FORWARD_REQUEST__INIT;
    r.model_id = "cnn";
    r.input = &t;
    r.overrides = &pov;
    r.n_overrides = 1;
    size_t len;
    uint8_t *buf = pack(&r.base, &len);
    const ProtobufCMessageDescriptor *d = &kasmina__v1__fused_forward_request__descriptor;
    cr_expect_eq(check_same(d, buf, len, 512), 1);
    /* Every truncation. */
    for (size_t cut = 0; cut < len; cut += (cut < 64 || len - cut < 64) ? 1 : 997)
        check_same(d, buf, cut, 512);
    /* Random byte mutations in the header and the tail (the payload is opaque). */
    uint8_t *m = malloc(len);
    for (int it = 0; it < 3000; it++) {
        memcpy(m, buf, len);
        int flips = 1 + (int)(next() % 3);
        for (int f = 0; f < flips; f++) {
            size_t at = (size_t)(next() % 48);
            if (next() % 2) at = len - 1 - (size_t)(next() % 48);
            m[at] = (uint8_t)next();
        }
        check_same(d, m, len, 512);
    }
    free(m);
    free(buf);
    free(data);
}

Test(pbgather, empty_input_and_no_pieces)
{
    cr_expect_eq(check_same(&kasmina__v1__forward_request__descriptor, (const uint8_t *)"", 0, 1),
                 0);
    ProtobufCMessage *m =
        ksm_pb_unpack_pieces(&kasmina__v1__forward_request__descriptor, NULL, 0, 1, NULL);
    cr_assert_not_null(m);
    protobuf_c_message_free_unpacked(m, NULL);
}
