/* Tensor views: contiguity, reshape, permute, narrow, expand, dtype table. */
#include <criterion/criterion.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/tensor.h"

TestSuite(tensor, .timeout = 10);

Test(tensor, dtype_table_matches_safetensors_spelling)
{
    cr_expect_eq(ksm_dtype_size(KSM_DTYPE_F32), 4);
    cr_expect_eq(ksm_dtype_size(KSM_DTYPE_F16), 2);
    cr_expect_eq(ksm_dtype_size(KSM_DTYPE_BF16), 2);
    cr_expect_eq(ksm_dtype_size(KSM_DTYPE_I64), 8);
    cr_expect_eq(ksm_dtype_size(KSM_DTYPE_I32), 4);
    cr_expect_eq(ksm_dtype_size((enum ksm_dtype)99), 0);
    enum ksm_dtype d;
    const char *names[] = {"F32", "F16", "BF16", "I64", "I32"};
    for (int i = 0; i < 5; i++) {
        cr_expect_eq(ksm_dtype_parse(names[i], &d), 0);
        cr_expect_str_eq(ksm_dtype_name(d), names[i]);
    }
    cr_expect_eq(ksm_dtype_parse("F64", &d), KSM_EDTYPE);
    cr_expect_eq(ksm_dtype_parse("f32", &d), KSM_EDTYPE);
}

Test(tensor, init_gives_row_major_strides_and_checks_shapes)
{
    ksm_tensor t;
    int64_t shape[] = {2, 3, 4};
    cr_assert_eq(ksm_tensor_init(&t, NULL, NULL, KSM_DTYPE_F32, 3, shape), 0);
    cr_expect_eq(t.stride[0], 12);
    cr_expect_eq(t.stride[1], 4);
    cr_expect_eq(t.stride[2], 1);
    cr_expect_eq(ksm_tensor_numel(&t), 24);
    cr_expect_eq(ksm_tensor_nbytes(&t), 96);
    cr_expect(ksm_tensor_is_contiguous(&t));
    int64_t neg[] = {2, -1};
    cr_expect_eq(ksm_tensor_init(&t, NULL, NULL, KSM_DTYPE_F32, 2, neg), KSM_EINVAL);
    int64_t huge[] = {1LL << 40, 1LL << 40};
    cr_expect_eq(ksm_tensor_init(&t, NULL, NULL, KSM_DTYPE_F32, 2, huge), KSM_EOVERFLOW);
    int64_t seven[7] = {1, 1, 1, 1, 1, 1, 1};
    cr_expect_eq(ksm_tensor_init(&t, NULL, NULL, KSM_DTYPE_F32, 7, seven), KSM_EINVAL);
    cr_expect_eq(ksm_tensor_init(&t, NULL, NULL, (enum ksm_dtype)9, 0, NULL), KSM_EINVAL);
    cr_expect_eq(ksm_tensor_init(&t, NULL, NULL, KSM_DTYPE_I64, 0, NULL), 0);
    cr_expect_eq(ksm_tensor_numel(&t), 1);
}

Test(tensor, permute_and_narrow_make_strided_views)
{
    float buf[2 * 3 * 4];
    ksm_tensor t, p, n;
    int64_t shape[] = {2, 3, 4};
    ksm_tensor_init(&t, NULL, buf, KSM_DTYPE_F32, 3, shape);
    int perm[] = {2, 0, 1};
    cr_assert_eq(ksm_tensor_permute(&p, &t, perm), 0);
    cr_expect_eq(p.shape[0], 4);
    cr_expect_eq(p.stride[0], 1);
    cr_expect_eq(p.stride[1], 12);
    cr_expect_not(ksm_tensor_is_contiguous(&p));
    int bad[] = {0, 0, 1};
    cr_expect_eq(ksm_tensor_permute(&p, &t, bad), KSM_EINVAL);

    cr_assert_eq(ksm_tensor_narrow(&n, &t, 1, 1, 2), 0);
    cr_expect_eq(n.shape[1], 2);
    cr_expect_eq((float *)n.data, buf + 4);
    cr_expect_not(ksm_tensor_is_contiguous(&n));
    cr_expect_eq(ksm_tensor_narrow(&n, &t, 1, 2, 2), KSM_EINVAL);
    cr_expect_eq(ksm_tensor_narrow(&n, &t, 3, 0, 1), KSM_EINVAL);
    /* Narrowing the leading dim keeps contiguity. */
    cr_assert_eq(ksm_tensor_narrow(&n, &t, 0, 1, 1), 0);
    cr_expect(ksm_tensor_is_contiguous(&n));
    cr_expect_eq((float *)n.data, buf + 12);
}

Test(tensor, reshape_requires_contiguity_and_equal_numel)
{
    ksm_tensor t, r, p;
    int64_t shape[] = {2, 3, 4};
    ksm_tensor_init(&t, NULL, NULL, KSM_DTYPE_F32, 3, shape);
    int64_t s2[] = {6, 4};
    cr_assert_eq(ksm_tensor_reshape(&r, &t, 2, s2), 0);
    cr_expect_eq(r.ndim, 2);
    cr_expect_eq(r.stride[0], 4);
    int64_t s3[] = {5, 5};
    cr_expect_eq(ksm_tensor_reshape(&r, &t, 2, s3), KSM_ESHAPE);
    int perm[] = {1, 0, 2};
    ksm_tensor_permute(&p, &t, perm);
    cr_expect_eq(ksm_tensor_reshape(&r, &p, 2, s2), KSM_EINVAL);
}

Test(tensor, expand_broadcasts_with_zero_strides)
{
    ksm_tensor t, e;
    int64_t shape[] = {3, 1};
    ksm_tensor_init(&t, NULL, NULL, KSM_DTYPE_F32, 2, shape);
    int64_t to[] = {2, 3, 5};
    cr_assert_eq(ksm_tensor_expand(&e, &t, 3, to), 0);
    cr_expect_eq(e.ndim, 3);
    cr_expect_eq(e.stride[0], 0);
    cr_expect_eq(e.stride[1], 1);
    cr_expect_eq(e.stride[2], 0);
    int64_t bad[] = {2, 4, 5};
    cr_expect_eq(ksm_tensor_expand(&e, &t, 3, bad), KSM_ESHAPE);
    cr_expect_eq(ksm_tensor_expand(&e, &t, 1, to), KSM_EINVAL);
    char desc[64];
    cr_expect_str_eq(ksm_tensor_describe(&t, desc, sizeof desc), "F32[3,1]");
}

Test(tensor, views_reject_a_hand_made_tensor_with_a_bad_ndim)
{
    ksm_tensor t, out;
    memset(&t, 0, sizeof t);
    t.ndim = 9;
    int64_t shape[] = {1};
    int perm[] = {0};
    cr_expect_eq(ksm_tensor_reshape(&out, &t, 1, shape), KSM_EINVAL);
    cr_expect_eq(ksm_tensor_permute(&out, &t, perm), KSM_EINVAL);
    cr_expect_eq(ksm_tensor_narrow(&out, &t, 0, 0, 1), KSM_EINVAL);
    cr_expect_eq(ksm_tensor_expand(&out, &t, 6, shape), KSM_EINVAL);
    char desc[32];
    cr_expect_str_eq(ksm_tensor_describe(&t, desc, sizeof desc), "(bad ndim)");
}
