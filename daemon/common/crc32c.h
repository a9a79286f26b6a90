/* common/crc32c: the checksum of journal records and sealed state blobs. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CRC32C (Castagnoli, reflected, as in iSCSI/RFC 3720): crc is the previous result (0 to start),
 * ksm_crc32c(0, "123456789", 9) == 0xE3069283. SSE4.2 when the CPU has it, else a table. */
uint32_t ksm_crc32c(uint32_t crc, const void *buf, size_t len);
/* The table implementation alone (tests compare both). */
uint32_t ksm_crc32c_sw(uint32_t crc, const void *buf, size_t len);

#ifdef __cplusplus
}
#endif
