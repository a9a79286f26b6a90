/* kasmina/text: strict UTF-8 against an independent definition (decode, re-encode, compare:
 * valid iff the bytes are the shortest encoding of a scalar value), exhaustively over every 1-, 2-
 * and 3-byte sequence and every 4-byte sequence of the lead bytes F0..F7; the streaming form on
 * split input; cut-at-boundary copies; the id grammar. */
#include <criterion/criterion.h>
#include <stdint.h>
#include <string.h>

#include "kasmina/text.h"

TestSuite(text, .timeout = 60);

/* The reference: decode the whole sequence as one character by its lead byte's length, encode the
 * code point again, and accept only an exact round trip of a non-surrogate <= U+10FFFF. */
static size_t encode(uint32_t cp, unsigned char *o)
{
    if (cp < 0x80) return o[0] = (unsigned char)cp, 1;
    if (cp < 0x800) return o[0] = (unsigned char)(0xC0 | cp >> 6), o[1] = 0x80 | (cp & 0x3F), 2;
    if (cp < 0x10000)
        return o[0] = (unsigned char)(0xE0 | cp >> 12), o[1] = 0x80 | ((cp >> 6) & 0x3F),
               o[2] = 0x80 | (cp & 0x3F), 3;
    return o[0] = (unsigned char)(0xF0 | cp >> 18), o[1] = 0x80 | ((cp >> 12) & 0x3F),
           o[2] = 0x80 | ((cp >> 6) & 0x3F), o[3] = 0x80 | (cp & 0x3F), 4;
}

static bool ref_one_char(const unsigned char *s, size_t n)
{
    size_t len = s[0] < 0x80 ? 1 : s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC0 ? 2 : 0;
    if (len != n || (n == 1 && s[0] == 0)) return false;
    uint32_t cp = n == 1 ? s[0] : s[0] & (0x7F >> n);
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) return false;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    unsigned char e[4];
    return encode(cp, e) == n && memcmp(e, s, n) == 0;
}

/* Sequences of n bytes that are one character per the reference agree with ksm_utf8_valid. */
static void sweep(size_t n, uint32_t lo, uint32_t hi)
{
    unsigned char b[4];
    size_t disagree = 0, valid = 0;
    for (uint64_t v = lo; v <= hi; v++) {
        for (size_t i = 0; i < n; i++) b[i] = (unsigned char)(v >> (8 * (n - 1 - i)));
        bool ref = ref_one_char(b, n);
        /* A multi-character sequence (e.g. two ASCII bytes) is valid iff each part is: split by
         * the reference's lengths. */
        if (!ref) {
            size_t i = 0;
            ref = true;
            while (i < n && ref) {
                size_t l = b[i] < 0x80    ? 1
                           : b[i] >= 0xF0 ? 4
                           : b[i] >= 0xE0 ? 3
                           : b[i] >= 0xC0 ? 2
                                          : 0;
                if (l == 0 || i + l > n || !ref_one_char(b + i, l)) ref = false;
                i += l ? l : 1;
            }
        }
        valid += ref;
        if (ksm_utf8_valid((const char *)b, n, NULL) != ref && disagree++ < 5)
            cr_log_error("%zu bytes %02x %02x %02x %02x: reference %d", n, b[0], b[1],
                         n > 2 ? b[2] : 0, n > 3 ? b[3] : 0, ref);
    }
    cr_expect_eq(disagree, 0, "%zu of the %zu-byte sequences disagree", disagree, n);
    cr_expect_gt(valid, 0);
}

Test(text, utf8_agrees_with_the_definition_on_every_short_sequence)
{
    sweep(1, 0, 0xFF);
    sweep(2, 0, 0xFFFF);
    sweep(3, 0, 0xFFFFFF);
    sweep(4, 0xF0000000u, 0xF7FFFFFFu);
}

Test(text, utf8_known_cases)
{
    cr_expect(ksm_utf8_valid("", 0, NULL));
    cr_expect(ksm_utf8_valid("ünïcödé €𝄞", strlen("ünïcödé €𝄞"), NULL));
    size_t at = 99;
    cr_expect_not(ksm_utf8_valid("x\xff\xfe", 3, &at));
    cr_expect_eq(at, 1);
    cr_expect_not(ksm_utf8_valid("a\0b", 3, &at));
    cr_expect_eq(at, 1);
    cr_expect_not(ksm_utf8_valid("ab\xe2\x82", 4, &at)); /* cut inside a character */
    cr_expect_eq(at, 2);
    cr_expect_not(ksm_utf8_valid("\xed\xa0\x80", 3, NULL));     /* U+D800 */
    cr_expect_not(ksm_utf8_valid("\xc0\xaf", 2, NULL));         /* overlong '/' */
    cr_expect_not(ksm_utf8_valid("\xf4\x90\x80\x80", 4, NULL)); /* U+110000 */
}

Test(text, streaming_form_equals_the_whole_check_at_every_split)
{
    const char *s = "a€𝄞\xc3\xa9z";
    size_t n = strlen(s);
    for (size_t cut = 0; cut <= n; cut++) {
        struct ksm_utf8_state st = {0};
        bool ok = true;
        for (size_t i = 0; i < cut; i++) ok = ok && ksm_utf8_feed(&st, (unsigned char)s[i]);
        for (size_t i = cut; i < n; i++) ok = ok && ksm_utf8_feed(&st, (unsigned char)s[i]);
        cr_expect(ok && ksm_utf8_done(&st));
        struct ksm_utf8_state half = {0};
        ok = true;
        for (size_t i = 0; i < cut; i++) ok = ok && ksm_utf8_feed(&half, (unsigned char)s[i]);
        cr_expect_eq(ok && ksm_utf8_done(&half), ksm_utf8_valid(s, cut, NULL), "prefix %zu", cut);
    }
}

Test(text, copy_cuts_at_a_character_boundary)
{
    char d[8];
    /* "aé€" = 61 | c3 a9 | e2 82 ac: 6 bytes. */
    for (size_t cap = 1; cap <= 8; cap++) {
        size_t n = ksm_utf8_copy(d, cap, "a\xc3\xa9\xe2\x82\xac");
        cr_expect_eq(n, strlen(d));
        cr_expect(ksm_utf8_valid(d, n, NULL), "cap %zu", cap);
        size_t want = cap - 1 >= 6 ? 6 : cap - 1 >= 3 ? 3 : cap - 1 >= 1 ? 1 : 0;
        cr_expect_eq(n, want, "cap %zu: %zu bytes, expected %zu", cap, n, want);
    }
}

Test(text, id_grammar)
{
    const char *good[] = {"a", "Z9", "_x", "a.b-c_d", "model-1", "r0c1"};
    const char *bad[] = {"", ".", "..", ".hidden", "-rf", "a/b", "a b", "é", "a\\b", "x\n"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++)
        cr_expect(ksm_id_valid(good[i], 64, NULL), "%s", good[i]);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        cr_expect_not(ksm_id_valid(bad[i], 64, NULL), "%s", bad[i]);
    char long_id[70];
    memset(long_id, 'a', 65);
    long_id[65] = '\0';
    size_t at = 0;
    cr_expect_not(ksm_id_valid(long_id, 64, &at));
    cr_expect_eq(at, 64);
    long_id[64] = '\0';
    cr_expect(ksm_id_valid(long_id, 64, NULL));
    cr_expect_not(ksm_id_valid("r0c1x", 4, NULL));
}
