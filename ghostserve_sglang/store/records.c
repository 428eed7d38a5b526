/* The drain's batch write: copy staged parity records into the slot table and seal each with its
 * CRC-32, in one call per batch, so that the Python thread calling it (through ctypes) lets go of
 * the GIL for the whole batch. The CRC function is passed in: ISA-L's crc32_gzip_refl or zlib's crc32
 * (the same polynomial), whichever the caller loaded.
 *
 * Per record, in this order (the torn-write protocol of segment.py): step := 0, parity bytes,
 * CRC-32 of (step, slot, bytes), step := step. Records are applied in batch order, so a slot staged
 * twice ends with its later record. */
#include <stdint.h>
#include <string.h>

typedef unsigned long (*zlib_crc32_t)(unsigned long crc, const unsigned char *buf, unsigned int len);
typedef uint32_t (*isal_crc32_t)(uint32_t crc, const unsigned char *buf, uint64_t len);

static uint32_t crc32_of(void *fn, int isal, uint32_t crc, const unsigned char *buf, uint64_t len) {
    if (isal)
        return ((isal_crc32_t)fn)(crc, buf, len);
    while (len > 0) {
        unsigned int part = len > (1u << 30) ? (1u << 30) : (unsigned int)len;
        crc = (uint32_t)((zlib_crc32_t)fn)(crc, buf, part);
        buf += part;
        len -= part;
    }
    return crc;
}

/* slot_words: per slot (durable step, CRC) as int64; meta: n pairs (step, slot) as int64; rows: n
 * records of record_bytes. Returns how many entries named a slot outside [0, slots) (not written). */
int64_t ghost_write_records(unsigned char *table, int64_t *slot_words, int64_t slots,
                            const int64_t *meta, const unsigned char *rows, int64_t n,
                            int64_t record_bytes, void *crc_fn, int isal) {
    int64_t refused = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t step = meta[2 * i], slot = meta[2 * i + 1];
        if (slot < 0 || slot >= slots) {
            refused++;
            continue;
        }
        unsigned char key[16];
        unsigned char *dst = table + slot * record_bytes;
        int64_t *slot_step = &slot_words[2 * slot], *slot_crc = &slot_words[2 * slot + 1];
        __atomic_store_n(slot_step, 0, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy(dst, rows + i * record_bytes, (size_t)record_bytes);
        memcpy(key, &step, 8);
        memcpy(key + 8, &slot, 8);
        uint32_t crc = crc32_of(crc_fn, isal, 0, key, 16);
        *slot_crc = crc32_of(crc_fn, isal, crc, dst, (uint64_t)record_bytes);
        __atomic_store_n(slot_step, step, __ATOMIC_RELEASE);
    }
    return refused;
}
