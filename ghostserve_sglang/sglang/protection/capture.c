/* The capture path's native part on CPU, called through ctypes, which lets go of the GIL for each call:
 *
 * - the gather: the written slots' K and V bytes of every layer, already cut into the columns the
 *   exchange sends, in one call, in place of a few tensor operations per layer (each of which let
 *   GhostServe's other threads take the GIL from the forward step);
 * - the same-host exchange's signalling: a rank posts an exchange round in its mailbox (a counter in
 *   shared memory, a futex word) and waits for its peers' posts, spinning briefly, then sleeping on the
 *   futex, where gloo's all-to-all took about 0.3 ms a round over loopback TCP (exchange.py); and its
 *   copies in and out of the mailboxes, which for xor parity XOR the peers' columns straight into the
 *   records (a reduce-scatter).
 *
 * Gather: layers are given as tables of their K and V buffers' addresses (rows of ``half`` bytes, one
 * per slot). Each slot-layer's K bytes then V bytes are cut into ``ranks`` columns of ``column`` bytes,
 * zero-padded at the end; the output is [ranks, n, layers, column], entry j the columns rank j encodes
 * (the layout of gather_triton.py). Offsets are 64-bit: a row may start past 2^31 bytes. */
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

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

/* -- the same-host exchange's mailboxes ------------------------------------------------------------ */
/* A mailbox header (in shared memory): the epoch (int64: which start or rejoin the mailbox belongs to)
 * and the round posted last (uint32, the futex word). A round's data is written before its post
 * (release); a reader checks the epoch, then the round (acquire), then reads the data. A restart
 * stores round 0 before the new epoch, so a reader that sees the new epoch never sees an old round. */
#define SPIN_NS 20000 /* spin this long before sleeping: the peer usually posts within microseconds */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int posted(const int64_t *epoch_word, const uint32_t *round_word, int64_t epoch, uint32_t round) {
    if (__atomic_load_n(epoch_word, __ATOMIC_ACQUIRE) != epoch)
        return 0;
    return (int32_t)(__atomic_load_n(round_word, __ATOMIC_ACQUIRE) - round) >= 0;
}

void ghost_mailbox_reset(int64_t *epoch_word, uint32_t *round_word, int64_t epoch) {
    __atomic_store_n(round_word, 0, __ATOMIC_RELEASE);
    __atomic_store_n(epoch_word, epoch, __ATOMIC_RELEASE);
}

void ghost_mailbox_post(uint32_t *round_word, uint32_t round) {
    __atomic_store_n(round_word, round, __ATOMIC_RELEASE);
    syscall(SYS_futex, round_word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Copies ``rows`` rows of ``width`` bytes, ``stride`` bytes apart in ``src``, back to back into ``dst``
 * (this rank's buffer of the round), then posts ``round``. */
void ghost_mailbox_send(uint8_t *dst, const uint8_t *src, int64_t rows, int64_t width, int64_t stride,
                        uint32_t *round_word, uint32_t round) {
    for (int64_t r = 0; r < rows; r++)
        memcpy(dst + r * width, src + r * stride, (size_t)width);
    ghost_mailbox_post(round_word, round);
}

/* ``n`` bytes of a posted round into ``out``: copied (``xor`` 0) or XORed into what ``out`` holds. */
void ghost_mailbox_take(uint8_t *out, const uint8_t *src, int64_t n, int xor) {
    if (!xor) {
        memcpy(out, src, (size_t)n);
        return;
    }
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t a, b;
        memcpy(&a, out + i, 8);
        memcpy(&b, src + i, 8);
        a ^= b;
        memcpy(out + i, &a, 8);
    }
    for (; i < n; i++)
        out[i] ^= src[i];
}

/* 0 once the peer's mailbox holds ``round`` of ``epoch`` (or a later round); 1 after ``timeout_ns``. */
int ghost_mailbox_wait(const int64_t *epoch_word, uint32_t *round_word, int64_t epoch, uint32_t round,
                       int64_t timeout_ns) {
    int64_t start = now_ns(), now = start;
    while (now - start < SPIN_NS && now - start < timeout_ns) {
        if (posted(epoch_word, round_word, epoch, round))
            return 0;
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
        now = now_ns();
    }
    while (!posted(epoch_word, round_word, epoch, round)) {
        int64_t left = start + timeout_ns - now_ns();
        if (left <= 0)
            return 1;
        struct timespec wait = {left / 1000000000, left % 1000000000};
        uint32_t seen = __atomic_load_n(round_word, __ATOMIC_ACQUIRE);
        if (!posted(epoch_word, round_word, epoch, round))
            syscall(SYS_futex, round_word, FUTEX_WAIT, seen, &wait, NULL, 0);
    }
    return 0;
}
