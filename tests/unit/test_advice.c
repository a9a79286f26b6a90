/* service/advice: the sentences about accepted requests (docs/logging.md#warnings). */
#include <criterion/criterion.h>
#include <string.h>

#include "service/advice.h"

TestSuite(advice, .timeout = 10);

Test(advice, val_accuracy_in_zero_to_one_reads_as_a_fraction)
{
    struct ksm_advice a = {0};
    ksm_advise_metrics(&(struct ksm_metrics_update){.has_val_accuracy = true, .val_accuracy = 0.87},
                       &a);
    cr_assert_eq(a.n, 1);
    cr_expect_eq(a.item[0].level, KSM_LOG_WARN);
    cr_expect(strstr(a.item[0].text, "val_accuracy 0.87 looks like a fraction"), "%s",
              a.item[0].text);
    cr_expect(strstr(a.item[0].text, "send 87 for a fraction of 0.87"), "%s", a.item[0].text);
    /* 1 is 1 % or 100 %: still suspicious */
    ksm_advise_metrics(&(struct ksm_metrics_update){.has_val_accuracy = true, .val_accuracy = 1.0},
                       &a);
    cr_expect_eq(a.n, 2);
}

Test(advice, percentages_zero_and_absent_accuracies_say_nothing)
{
    struct ksm_advice a = {0};
    double quiet[] = {0.0, 1.5, 50.0, 100.0};
    for (size_t i = 0; i < sizeof quiet / sizeof quiet[0]; i++)
        ksm_advise_metrics(
            &(struct ksm_metrics_update){.has_val_accuracy = true, .val_accuracy = quiet[i]}, &a);
    /* a fraction-looking value that was not sent */
    ksm_advise_metrics(&(struct ksm_metrics_update){.val_accuracy = 0.5}, &a);
    cr_expect_eq(a.n, 0);
}

Test(advice, zero_host_fields_name_the_defaults_the_model_took)
{
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN};
    spec.cnn.num_classes = 100;
    spec.cnn.base_channels = 16;
    struct ksm_model_info info = {.topology = KSM_TOPOLOGY_CNN};
    strcpy(info.model_id, "m1");
    info.cnn = (struct ksm_cnn_spec){100, 3, 16, 3, 3, 3};
    struct ksm_advice a = {0};
    ksm_advise_model_created(&spec, &info, &a);
    cr_assert_eq(a.n, 1);
    cr_expect_eq(a.item[0].level, KSM_LOG_INFO);
    cr_expect_str_eq(a.item[0].text, "host.cnn fields sent as 0 mean \"default\"; model 'm1' took "
                                     "n_blocks=3, kernel_size=3, in_channels=3.");
    /* an empty host spec asks for every default */
    struct ksm_model_spec empty = {.topology = KSM_TOPOLOGY_CNN};
    ksm_advise_model_created(&empty, &info, &a);
    cr_expect_eq(a.n, 1);
    /* every field given: nothing to say */
    spec.cnn = info.cnn;
    ksm_advise_model_created(&spec, &info, &a);
    cr_expect_eq(a.n, 1);
    /* a transformer names its own fields */
    struct ksm_model_spec ts = {.topology = KSM_TOPOLOGY_TRANSFORMER};
    ts.transformer.vocab_size = 256;
    struct ksm_model_info ti = {.topology = KSM_TOPOLOGY_TRANSFORMER};
    strcpy(ti.model_id, "t");
    ti.transformer = (struct ksm_transformer_spec){.vocab_size = 256,
                                                   .n_embd = 384,
                                                   .n_head = 6,
                                                   .n_layer = 6,
                                                   .block_size = 256,
                                                   .num_segments = 3};
    ksm_advise_model_created(&ts, &ti, &a);
    cr_assert_eq(a.n, 2);
    cr_expect(strstr(a.item[1].text, "host.transformer") &&
                  strstr(a.item[1].text, "took n_embd=384, n_head=6, n_layer=6, block_size=256, "
                                         "num_segments=3."),
              "%s", a.item[1].text);
}

Test(advice, sentences_are_printable_ascii_and_the_list_is_bounded)
{
    struct ksm_advice a = {0};
    for (int i = 0; i < KSM_ADVICE_MAX + 3; i++)
        ksm_advice_add(&a, KSM_LOG_WARN, "line %d caf\xc3\xa9\ttab", i);
    cr_expect_eq(a.n, KSM_ADVICE_MAX);
    cr_expect_str_eq(a.item[0].text, "line 0 caf???tab");
}
