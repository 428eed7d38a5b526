/* The drain's batch write and the store's checksum: copy staged parity records into the slot table
 * and seal each with its CRC-32C (Castagnoli), in one call per batch, so that the Python thread
 * calling it (through ctypes) lets go of the GIL for the whole batch.
 *
 * CRC-32C: on x86-64 with SSE4.2 (checked at load time) the crc32 instruction, three interleaved
 * streams combined with zero-shift tables (the instruction's latency is three cycles, its throughput
 * one: three independent streams keep it busy), fused with the copy: each 8-byte word is loaded once,
 * fed to the CRC and stored with a non-temporal store (the table is written far more than it is read,
 * so its lines need not be fetched nor kept in the caches): on one core of a 2-core VM, 32 KiB records,
 * 8.4 GB/s against 5.2 GB/s for memcpy then the CRC of the copy, and 7.1 GB/s for memcpy alone.
 * Elsewhere a portable slicing-by-8 table and memcpy (1.8 GB/s there). Both give the same bits.
 *
 * Per record (the torn-write protocol of segment.py): step := 0, parity bytes, CRC-32C of (step,
 * slot, bytes), step := step with release ordering. On one thread records are written in batch
 * order, so a slot staged twice ends with its later record. A batch large enough is shared among
 * threads instead: every record superseded by a later one for the same slot in the same batch is
 * dropped first (the batch's steps are not durable until it is all written, so no reader can tell),
 * which leaves distinct slots that any thread may write in any order; threads take records one at a
 * time from a shared counter, so each gets an equal share of the bytes whatever the slot ids (a split
 * by slot id would leave threads idle when the slots of a batch share a stride). Slot 0 is the serving
 * engine's padding slot: its records are skipped, never stored. The helper threads are a small pool
 * started on first use and kept, blocked on a condition variable, between batches. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && !defined(GHOST_PORTABLE_ONLY) /* the macro: to build-check the rest */
#define GHOST_X86 1
#include <immintrin.h>
#endif

#define POLY 0x82f63b78u /* CRC-32C, reflected */
#define LONG_BLOCK 8192  /* bytes per stream in the long three-stream blocks */
#define SHORT_BLOCK 256  /* and in the short ones */
#define MAX_THREADS 64
/* A batch is shared among threads only when each gets at least this many bytes: below it, waking a
 * helper costs more than it saves (on a 16-core host, 64 KiB records: 2 records took 13 us on one
 * thread and 20 us on two; 8 records 58 us on one, 26 us on four). */
#ifndef MIN_BYTES_PER_THREAD
#define MIN_BYTES_PER_THREAD (128 * 1024)
#endif

static uint32_t table8[8][256];               /* slicing-by-8 */
static uint32_t zeros_long[4][256], zeros_short[4][256]; /* shift a CRC over LONG/SHORT zero bytes */
static int use_hardware;

/* -- CRC-32C, portable ------------------------------------------------------------------------- */
/* All internal functions carry the raw register (no pre/post inversion). */
static uint32_t crc_portable(uint32_t crc, const unsigned char *p, uint64_t len) {
    while (len && ((uintptr_t)p & 7)) {
        crc = table8[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                             (uint32_t)p[3] << 24);
        crc = table8[7][lo & 0xff] ^ table8[6][(lo >> 8) & 0xff] ^ table8[5][(lo >> 16) & 0xff] ^
              table8[4][lo >> 24] ^ table8[3][p[4]] ^ table8[2][p[5]] ^ table8[1][p[6]] ^ table8[0][p[7]];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = table8[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

/* GF(2) 32x32 matrices as 32 column words: the operator that feeds zero bytes through a register. */
static uint32_t gf2_times(const uint32_t *mat, uint32_t vec) {
    uint32_t sum = 0;
    for (; vec; vec >>= 1, mat++)
        if (vec & 1)
            sum ^= *mat;
    return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat) {
    for (int n = 0; n < 32; n++)
        square[n] = gf2_times(mat, mat[n]);
}

/* zeros[k][b]: the register (b << 8k) after `len` zero bytes (len a power of two). */
static void zeros_tables(uint32_t zeros[4][256], uint64_t len) {
    uint32_t op[32], next[32];
    op[0] = POLY; /* one zero bit */
    for (int n = 1; n < 32; n++)
        op[n] = 1u << (n - 1);
    for (uint64_t bits = 1; bits < 8 * len; bits <<= 1) {
        gf2_square(next, op);
        memcpy(op, next, sizeof op);
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int k = 0; k < 4; k++)
            zeros[k][b] = gf2_times(op, b << (8 * k));
}

static inline uint32_t shift(uint32_t zeros[4][256], uint32_t crc) {
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^ zeros[2][(crc >> 16) & 0xff] ^
           zeros[3][crc >> 24];
}

/* -- CRC-32C, SSE4.2 ----------------------------------------------------------------------------- */
#if defined(GHOST_X86)
/* Three streams of `block` bytes each from p (and copied to dst when dst is not NULL); returns the
 * register after all 3 * block bytes. */
__attribute__((target("sse4.2"))) static inline uint32_t
three_streams(uint32_t crc, const unsigned char *p, unsigned char *dst, uint64_t block,
              uint32_t zeros[4][256]) {
    uint64_t c0 = crc, c1 = 0, c2 = 0;
    const unsigned char *end = p + block;
    if (dst) {
        for (; p < end; p += 8, dst += 8) {
            uint64_t a, b, c;
            memcpy(&a, p, 8);
            memcpy(&b, p + block, 8);
            memcpy(&c, p + 2 * block, 8);
            c0 = _mm_crc32_u64(c0, a);
            c1 = _mm_crc32_u64(c1, b);
            c2 = _mm_crc32_u64(c2, c);
            _mm_stream_si64((long long *)dst, (long long)a);
            _mm_stream_si64((long long *)(dst + block), (long long)b);
            _mm_stream_si64((long long *)(dst + 2 * block), (long long)c);
        }
    } else {
        for (; p < end; p += 8) {
            uint64_t a, b, c;
            memcpy(&a, p, 8);
            memcpy(&b, p + block, 8);
            memcpy(&c, p + 2 * block, 8);
            c0 = _mm_crc32_u64(c0, a);
            c1 = _mm_crc32_u64(c1, b);
            c2 = _mm_crc32_u64(c2, c);
        }
    }
    return shift(zeros, shift(zeros, (uint32_t)c0) ^ (uint32_t)c1) ^ (uint32_t)c2;
}

/* CRC of len bytes at src; when dst is not NULL they are also copied there (non-temporal stores for
 * the aligned words: the caller fences before publishing). */
__attribute__((target("sse4.2"))) static uint32_t
crc_hardware(uint32_t crc, const unsigned char *src, unsigned char *dst, uint64_t len) {
    const unsigned char *aligned = dst ? (const unsigned char *)dst : src;
    while (len && ((uintptr_t)aligned & 7)) {
        if (dst)
            *dst++ = *src;
        crc = _mm_crc32_u8(crc, *src++);
        aligned++;
        len--;
    }
    while (len >= 3 * LONG_BLOCK) {
        crc = three_streams(crc, src, dst, LONG_BLOCK, zeros_long);
        src += 3 * LONG_BLOCK;
        dst = dst ? dst + 3 * LONG_BLOCK : NULL;
        len -= 3 * LONG_BLOCK;
    }
    while (len >= 3 * SHORT_BLOCK) {
        crc = three_streams(crc, src, dst, SHORT_BLOCK, zeros_short);
        src += 3 * SHORT_BLOCK;
        dst = dst ? dst + 3 * SHORT_BLOCK : NULL;
        len -= 3 * SHORT_BLOCK;
    }
    uint64_t c = crc;
    for (; len >= 8; len -= 8, src += 8) {
        uint64_t w;
        memcpy(&w, src, 8);
        c = _mm_crc32_u64(c, w);
        if (dst) {
            _mm_stream_si64((long long *)dst, (long long)w);
            dst += 8;
        }
    }
    crc = (uint32_t)c;
    while (len--) {
        if (dst)
            *dst++ = *src;
        crc = _mm_crc32_u8(crc, *src++);
    }
    return crc;
}
#endif

__attribute__((constructor)) static void init_tables(void) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        table8[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int k = 1; k < 8; k++)
            table8[k][b] = (table8[k - 1][b] >> 8) ^ table8[0][table8[k - 1][b] & 0xff];
    zeros_tables(zeros_long, LONG_BLOCK);
    zeros_tables(zeros_short, SHORT_BLOCK);
#if defined(GHOST_X86)
    __builtin_cpu_init();
    use_hardware = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

static uint32_t crc_raw(uint32_t crc, const unsigned char *p, uint64_t len) {
#if defined(GHOST_X86)
    if (use_hardware)
        return crc_hardware(crc, p, NULL, len);
#endif
    return crc_portable(crc, p, len);
}

/* CRC-32C of len bytes, continuing from `seed` (the CRC of what came before, 0 to start), as zlib's
 * crc32 continues: ghost_crc32c(ghost_crc32c(0, a), b) is the CRC of a followed by b. */
uint32_t ghost_crc32c(uint32_t seed, const void *buf, uint64_t len) {
    return ~crc_raw(~seed, (const unsigned char *)buf, len);
}

/* The same through the portable tables whatever the processor (tests compare the two). */
uint32_t ghost_crc32c_portable(uint32_t seed, const void *buf, uint64_t len) {
    return ~crc_portable(~seed, (const unsigned char *)buf, len);
}

/* Whether the SSE4.2 path is used; `set` 0 or 1 switches it (1 only where the processor has it),
 * any other value leaves it. For tests and benchmarks. */
int ghost_crc32c_hardware(int set) {
#if defined(GHOST_X86)
    if (set == 0 || set == 1)
        use_hardware = set && __builtin_cpu_supports("sse4.2") != 0;
#else
    (void)set;
#endif
    return use_hardware;
}

static uint32_t key_crc(int64_t step, int64_t slot) {
    unsigned char key[16];
    for (int k = 0; k < 8; k++) { /* little-endian, whatever the processor */
        key[k] = (unsigned char)((uint64_t)step >> (8 * k));
        key[8 + k] = (unsigned char)((uint64_t)slot >> (8 * k));
    }
    return crc_raw(~0u, key, 16);
}

/* out[i] := CRC-32C of record i: (steps[i], slots[i], row i of record_bytes), for records read back,
 * in one call. */
void ghost_record_crcs(const int64_t *steps, const int64_t *slots, const unsigned char *rows, int64_t n,
                       int64_t record_bytes, int64_t *out) {
    for (int64_t i = 0; i < n; i++)
        out[i] = ~crc_raw(key_crc(steps[i], slots[i]), rows + i * record_bytes, (uint64_t)record_bytes);
}

/* -- the batch write ------------------------------------------------------------------------------ */
typedef struct {
    unsigned char *table;
    int64_t *slot_words; /* per slot: durable step, CRC */
    const int64_t *steps, *slot_ids;
    const unsigned char *rows;
    int64_t record_bytes;
    const int64_t *work; /* indices of the records to write, distinct slots */
    int64_t count;
    int64_t next; /* shared: the next position of `work` to take */
    int helpers;  /* pool threads taking part (1..helpers) */
} job_t;

static void write_record(const job_t *job, int64_t i) {
    int64_t step = job->steps[i], slot = job->slot_ids[i], bytes = job->record_bytes;
    unsigned char *dst = job->table + slot * bytes;
    const unsigned char *src = job->rows + i * bytes;
    int64_t *slot_step = &job->slot_words[2 * slot], *slot_crc = &job->slot_words[2 * slot + 1];
    uint32_t crc = key_crc(step, slot);
    __atomic_store_n(slot_step, 0, __ATOMIC_RELAXED);
#if defined(GHOST_X86)
    if (use_hardware) {
        _mm_sfence(); /* non-temporal stores are not ordered after the step := 0 otherwise */
        crc = crc_hardware(crc, src, dst, (uint64_t)bytes);
        _mm_sfence(); /* ... nor before the step := step */
    } else
#endif
    {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy(dst, src, (size_t)bytes);
        crc = crc_portable(crc, dst, (uint64_t)bytes);
    }
    __atomic_store_n(slot_crc, (int64_t)(uint32_t)~crc, __ATOMIC_RELAXED);
    __atomic_store_n(slot_step, step, __ATOMIC_RELEASE);
}

static void run_job(job_t *job) {
    for (;;) {
        int64_t k = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (k >= job->count)
            return;
        write_record(job, job->work[k]);
    }
}

/* The pool: helper threads wait for a new generation; the calling thread works too, then waits until
 * every helper of the job is done. One job at a time (`batch` serialises callers). */
static struct {
    pthread_mutex_t batch, lock;
    pthread_cond_t wake, done;
    int started;
    uint64_t generation;
    job_t *job;
    int running;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, 0, NULL, 0};
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void *helper(void *arg) {
    int id = (int)(intptr_t)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.generation == seen)
            pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        job_t *job = pool.job;
        if (job == NULL || id > job->helpers)
            continue; /* not needed for this one, or it ended while this thread woke */
        pthread_mutex_unlock(&pool.lock);
        run_job(job);
        pthread_mutex_lock(&pool.lock);
        if (--pool.running == 0)
            pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* A forked child has none of the parent's helper threads: it starts its own pool when it needs one. */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.batch, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.started = 0;
    pool.generation = 0;
    pool.job = NULL;
    pool.running = 0;
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* Start helpers up to `want` (signals blocked in them: they belong to the Python process's main
 * thread); returns how many there are. Called with pool.batch held. */
static int grow_pool(int want) {
    pthread_once(&atfork_once, register_atfork);
    if (pool.started >= want)
        return pool.started;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    while (pool.started < want) {
        pthread_t thread;
        if (pthread_create(&thread, &attr, helper, (void *)(intptr_t)(pool.started + 1)) != 0)
            break;
        pool.started++;
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.started;
}

/* Helper threads started in this process so far (observability and tests). */
int ghost_pool_size(void) {
    pthread_mutex_lock(&pool.batch);
    int started = pool.started;
    pthread_mutex_unlock(&pool.batch);
    return started;
}

/* Hash table of slot -> last index in the batch, for n entries (open addressing, size a power of two
 * at least 2n). */
static int64_t *last_of_slots(const int64_t *slot_ids, const int64_t *candidates, int64_t count,
                              uint64_t *mask_out) {
    uint64_t size = 16;
    while (size < 2 * (uint64_t)count)
        size <<= 1;
    int64_t *keys = malloc(2 * size * sizeof(int64_t));
    if (!keys)
        return NULL;
    for (uint64_t h = 0; h < size; h++)
        keys[2 * h] = -1;
    for (int64_t k = 0; k < count; k++) {
        int64_t i = candidates[k], slot = slot_ids[i];
        uint64_t h = ((uint64_t)slot * 0x9E3779B97F4A7C15ull >> 20) & (size - 1);
        while (keys[2 * h] != -1 && keys[2 * h] != slot)
            h = (h + 1) & (size - 1);
        keys[2 * h] = slot;
        keys[2 * h + 1] = i;
    }
    *mask_out = size - 1;
    return keys;
}

static int64_t last_index(const int64_t *keys, uint64_t mask, int64_t slot) {
    uint64_t h = ((uint64_t)slot * 0x9E3779B97F4A7C15ull >> 20) & mask;
    while (keys[2 * h] != slot)
        h = (h + 1) & mask;
    return keys[2 * h + 1];
}

/* Write records [0, n) (per record: steps[i], slot_ids[i], and record_bytes at rows + i * record_bytes)
 * into the table, a slot staged twice ending with its later record, on up to `threads` threads (the
 * caller's included). slot_words: per slot (durable step, CRC) as int64. Records for slot 0 are skipped;
 * those naming a slot outside [0, slots) are not written and counted in *refused. Returns how many
 * records were stored (superseded ones included: each was made durable, then replaced), or -1 when
 * memory for the batch's bookkeeping could not be had (nothing was written). */
int64_t ghost_write_records(unsigned char *table, int64_t *slot_words, int64_t slots, const int64_t *steps,
                            const int64_t *slot_ids, const unsigned char *rows, int64_t n,
                            int64_t record_bytes, int threads, int64_t *refused) {
    *refused = 0;
    int64_t *work = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (!work)
        return -1;
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t slot = slot_ids[i];
        if (slot == 0)
            continue;
        if (slot < 0 || slot >= slots)
            (*refused)++;
        else
            work[count++] = i;
    }
    int64_t stored = count;
    job_t job = {table, slot_words, steps, slot_ids, rows, record_bytes, work, count, 0, 0};
    int64_t parts = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    int64_t shares = count * record_bytes / MIN_BYTES_PER_THREAD;
    if (shares < parts)
        parts = shares > 1 ? shares : 1;
    if (count < parts)
        parts = count > 1 ? count : 1;
    if (parts == 1) { /* in batch order: a later record for a slot overwrites an earlier one */
        for (int64_t k = 0; k < count; k++)
            write_record(&job, work[k]);
        free(work);
        return stored;
    }
    uint64_t mask;
    int64_t *keys = last_of_slots(slot_ids, work, count, &mask);
    if (!keys) {
        free(work);
        return -1;
    }
    int64_t kept = 0;
    for (int64_t k = 0; k < count; k++)
        if (last_index(keys, mask, slot_ids[work[k]]) == work[k])
            work[kept++] = work[k];
    free(keys);
    job.count = kept;
    pthread_mutex_lock(&pool.batch);
    int started = grow_pool((int)parts - 1);
    job.helpers = started < parts - 1 ? started : (int)parts - 1;
    if (job.helpers > 0) {
        pthread_mutex_lock(&pool.lock);
        pool.job = &job;
        pool.running = job.helpers;
        pool.generation++;
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    run_job(&job);
    if (job.helpers > 0) {
        pthread_mutex_lock(&pool.lock);
        while (pool.running > 0)
            pthread_cond_wait(&pool.done, &pool.lock);
        pool.job = NULL;
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.batch);
    free(work);
    return stored;
}
