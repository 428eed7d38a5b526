/* The capture's gather on CPU: the written slots' K and V bytes of every layer, already cut into the
 * columns the exchange sends, in one call. The serving thread calls it through ctypes, which lets go of
 * the GIL for the call: one call in place of a few tensor operations per layer, each of which let
 * GhostServe's other threads take the GIL from the forward step.
 *
 * Layers are given as tables of their K and V buffers' addresses (rows of ``half`` bytes, one per
 * slot). Each slot-layer's K bytes then V bytes are cut into ``ranks`` columns of ``column`` bytes,
 * zero-padded at the end; the output is [ranks, n, layers, column], entry j the columns rank j
 * encodes (the layout of gather_triton.py). Offsets are 64-bit: a row may start past 2^31 bytes. */
#include <stdint.h>
#include <string.h>

/* Returns -1, or the index in ``slots`` of the first slot outside [0, total): nothing is read then. */
int64_t ghost_gather_columns(const int64_t *k_table, const int64_t *v_table, int64_t layers,
                             const int64_t *slots, int64_t n, int64_t total, int64_t half,
                             int64_t ranks, int64_t column, uint8_t *out) {
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= total)
            return i;
    const int64_t width = 2 * half;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t layer = 0; layer < layers; layer++) {
            const uint8_t *k = (const uint8_t *)(intptr_t)k_table[layer] + slots[i] * half;
            const uint8_t *v = (const uint8_t *)(intptr_t)v_table[layer] + slots[i] * half;
            for (int64_t j = 0; j < ranks; j++) {
                uint8_t *dst = out + ((j * n + i) * layers + layer) * column;
                int64_t at = j * column, end = at + column;
                if (at < half) {
                    int64_t stop = end < half ? end : half;
                    memcpy(dst, k + at, (size_t)(stop - at));
                    dst += stop - at;
                    at = stop;
                }
                if (at < end && at < width) {
                    int64_t stop = end < width ? end : width;
                    memcpy(dst, v + (at - half), (size_t)(stop - at));
                    dst += stop - at;
                    at = stop;
                }
                if (at < end)
                    memset(dst, 0, (size_t)(end - at));
            }
        }
    }
    return -1;
}
