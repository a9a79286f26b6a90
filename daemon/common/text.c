/* common/text: strict UTF-8 and the id grammar (kasmina/text.h). */
#include "kasmina/text.h"

#include <string.h>

bool ksm_utf8_feed(struct ksm_utf8_state *st, unsigned char b)
{
    if (st->need > 0) {
        if (b < st->lo || b > st->hi) return false;
        st->need--;
        st->lo = 0x80;
        st->hi = 0xBF;
        return true;
    }
    if (b < 0x80) return b != 0;
    /* Lead bytes (RFC 3629 table 3-7): the first continuation's range excludes overlong forms
     * (E0, F0), surrogates (ED) and code points above U+10FFFF (F4). */
    st->lo = 0x80;
    st->hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
        st->need = 1;
    } else if (b >= 0xE0 && b <= 0xEF) {
        st->need = 2;
        if (b == 0xE0) st->lo = 0xA0;
        if (b == 0xED) st->hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        st->need = 3;
        if (b == 0xF0) st->lo = 0x90;
        if (b == 0xF4) st->hi = 0x8F;
    } else {
        return false; /* continuation byte first, C0/C1 (overlong), F5..FF */
    }
    return true;
}

bool ksm_utf8_valid(const char *s, size_t n, size_t *bad_at)
{
    struct ksm_utf8_state st = {0};
    size_t lead = 0;
    for (size_t i = 0; i < n; i++) {
        if (st.need == 0) lead = i;
        if (!ksm_utf8_feed(&st, (unsigned char)s[i])) {
            if (bad_at != NULL) *bad_at = i;
            return false;
        }
    }
    if (!ksm_utf8_done(&st)) {
        if (bad_at != NULL) *bad_at = lead;
        return false;
    }
    return true;
}

static bool id_byte(unsigned char c, bool first)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')
        return true;
    return !first && (c == '.' || c == '-');
}

bool ksm_id_valid(const char *s, size_t max, size_t *bad_at)
{
    size_t at = 0;
    bool ok = s != NULL && s[0] != '\0';
    if (ok) {
        size_t n = strnlen(s, max + 1);
        if (n > max) {
            ok = false;
            at = max;
        }
        for (size_t i = 0; ok && i < n; i++)
            if (!id_byte((unsigned char)s[i], i == 0)) {
                ok = false;
                at = i;
            }
    }
    if (!ok && bad_at != NULL) *bad_at = at;
    return ok;
}

size_t ksm_utf8_copy(char *dst, size_t cap, const char *src)
{
    if (src == NULL) src = "";
    size_t n = strnlen(src, cap - 1);
    if (src[n] != '\0')
        while (n > 0 && ((unsigned char)src[n] & 0xC0) == 0x80) n--; /* back to a lead byte */
    memcpy(dst, src, n);
    dst[n] = '\0';
    return n;
}
