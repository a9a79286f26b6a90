/* common/crc32c: CRC32C (Castagnoli), SSE4.2 when the CPU has it, else a table (crc32c.h). */
#include "common/crc32c.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>


static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[i] = c;
    }
}

uint32_t ksm_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = buf;
    uint32_t c = ~crc;
    while (len--) c = crc_table[(c ^ *p++) & 0xFFu] ^ (c >> 8);
    return ~c;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const void *buf,
                                                            size_t len)
{
    const uint8_t *p = buf;
    uint64_t c = ~crc;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return ~c32;
}

uint32_t ksm_crc32c(uint32_t crc, const void *buf, size_t len)
{
    static int have = -1; /* benign race: every thread computes the same answer */
    if (have < 0) {
        __builtin_cpu_init();
        have = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    return have ? crc32c_hw(crc, buf, len) : ksm_crc32c_sw(crc, buf, len);
}
#else
uint32_t ksm_crc32c(uint32_t crc, const void *buf, size_t len)
{
    return ksm_crc32c_sw(crc, buf, len);
}
#endif

