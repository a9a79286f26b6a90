/* keeps the helper library non-empty */
typedef int ksm_test_helpers_empty;
