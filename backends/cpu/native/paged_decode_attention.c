/*
 * Paged decode attention for the cpu backend, float32, with the step's cache write.
 *
 * One query token per sequence attends to its whole context (or, with a
 * sliding window W > 0, to its last W positions only: the blocks before the
 * window are never read), in place from the paged cache through its block
 * table (no gather copy). A soft-cap C > 0 turns each scaled score s into
 * C * tanh(s / C) before the softmax (Gemma 2). Given the step's new K/V rows
 * and their slots, it first writes them into the cache (all of them, before
 * any sequence attends: one may read a block another just wrote).
 *
 * Work items are (sequence, KV head) pairs, spread over the threads when there
 * is enough of them; the G = num_heads / num_kv_heads query heads of one KV
 * head are processed together, so each cached K and V row is read once from
 * memory (GQA). The context is walked in chunks of up to CHUNK tokens: the
 * scores of a whole chunk (8 tokens at a time, their partial sums reduced
 * together), one softmax rescale, then P @ V over the chunk while its V rows
 * are still in cache. Online softmax between chunks.
 *
 * Layouts (row-major):
 *   q             [num_seqs, num_heads, head_dim] (rows q_row_stride floats apart)
 *   k_cache       [num_blocks, block_size, num_kv_heads, head_dim]  (v_cache the same)
 *   block_tables  [num_seqs, max_blocks] int32 (entries past a sequence's context are ignored)
 *   context_lens  [num_seqs] int32, each >= 1
 *   k_new, v_new  [num_new, num_kv_heads, head_dim] (rows k_/v_row_stride floats apart), slots [num_new] int64
 *   out           [num_seqs, num_heads, head_dim]
 *
 * The reference with the same meaning is paged_attention_ref (and
 * write_kv_cache_ref) in backends/cpu/attention.py; tests compare them.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 64      /* query heads per KV head */
#define MAX_HEAD_DIM 512
#define MAX_BLOCK_SIZE 256
#define CHUNK 64          /* context tokens scored before each softmax rescale */
#define PARALLEL_MIN_WORK 8192   /* context tokens x KV heads below which one thread does it all */

int pagedgen_decode_attention_limits(int32_t *max_group, int32_t *max_head_dim, int32_t *max_block_size) {
    *max_group = MAX_GROUP;
    *max_head_dim = MAX_HEAD_DIM;
    *max_block_size = MAX_BLOCK_SIZE;
    return 0;
}

/* Portable 8-wide float vectors (GCC/Clang vector extensions: AVX2 on x86-64
 * with -march=native, two NEON registers on arm64). */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

/* exp(x) for x <= 0 (scores minus their running max): x = n ln2 + r with
 * |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n through the exponent
 * bits; relative error ~2e-7, and 0 below -87. */
static inline v8f exp8_nonpositive(v8f x) {
    const v8f lo = x - x - 87.0f;
    const v8i below = x < lo;                                   /* lanes: -1 where below, 0 elsewhere */
    x = (v8f)((below & (v8i)lo) | (~below & (v8i)x));
    const v8f round_magic = x - x + 12582912.0f;                /* 1.5 * 2^23: round to nearest */
    const v8f n = (x * 1.44269504088896341f + round_magic) - round_magic;
    const v8f r = x - n * 0.693359375f - n * -2.12194440e-4f;
    v8f p = r * 1.3981999507e-3f + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8f scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The 8 horizontal sums of a[0..7], as one vector (lane j = sum of a[j]'s lanes). */
static inline v8f reduce8x8(const v8f a[8]) {
    v8f s[8];
    for (int j = 0; j < 8; j++) s[j] = a[j];
    /* pairwise: after each stage lane groups hold partial sums of more vectors */
    v8f t0 = __builtin_shufflevector(s[0], s[1], 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(s[0], s[1], 1, 9, 3, 11, 5, 13, 7, 15);   /* a0 a1 pairs */
    v8f t1 = __builtin_shufflevector(s[2], s[3], 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(s[2], s[3], 1, 9, 3, 11, 5, 13, 7, 15);
    v8f t2 = __builtin_shufflevector(s[4], s[5], 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(s[4], s[5], 1, 9, 3, 11, 5, 13, 7, 15);
    v8f t3 = __builtin_shufflevector(s[6], s[7], 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(s[6], s[7], 1, 9, 3, 11, 5, 13, 7, 15);
    /* t0 lanes: a0(01) a1(01) a0(23) a1(23) a0(45) a1(45) a0(67) a1(67) */
    v8f u0 = __builtin_shufflevector(t0, t1, 0, 1, 8, 9, 4, 5, 12, 13) +
             __builtin_shufflevector(t0, t1, 2, 3, 10, 11, 6, 7, 14, 15);
    v8f u1 = __builtin_shufflevector(t2, t3, 0, 1, 8, 9, 4, 5, 12, 13) +
             __builtin_shufflevector(t2, t3, 2, 3, 10, 11, 6, 7, 14, 15);
    /* u0 lanes: a0..a3 (sums of lanes 0-3), a0..a3 (lanes 4-7) */
    return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* scores[t] = q . k_t for the n <= 8 rows k[0..n-1] (head_dim a multiple of 8). */
static inline void dot8(const float *q, const float *const k[8], int n, int32_t head_dim, float *scores) {
    v8f acc[8];
    for (int j = 0; j < 8; j++) acc[j] = (v8f){0};
    for (int32_t d = 0; d < head_dim; d += 8) {
        const v8f qv = load8(q + d);
        for (int j = 0; j < 8; j++) acc[j] += qv * load8(k[j] + d);
    }
    const v8f s = reduce8x8(acc);
    if (n == 8) store8(scores, s);
    else for (int j = 0; j < n; j++) scores[j] = s[j];
}

/* a [8 * width] = a * correction + sum_t p[t] v[rows[t]] [8 * width]; inlined with width 8 (registers). */
static inline __attribute__((always_inline)) void pv_accumulate(float *a, const float *v, const size_t *rows,
                                                                const float *p, int32_t n, float correction,
                                                                int width) {
    v8f r[8];
    for (int c = 0; c < width; c++) r[c] = load8(a + 8 * c) * correction;
    for (int32_t t = 0; t < n; t++) {
        const float *vt = v + rows[t];
        const float pt = p[t];
        for (int c = 0; c < width; c++) r[c] += pt * load8(vt + 8 * c);
    }
    for (int c = 0; c < width; c++) store8(a + 8 * c, r[c]);
}

/* Running softmax state of one query head. */
typedef struct {
    float max, sum;
} softmax_state;

/* scores s [n] of one query head (unscaled) -> probabilities against the head's running max; returns
 * the correction of its earlier sums (0 on the first chunk) and updates st. */
static inline float softmax_chunk(float *s, int32_t n, float scale, float softcap, softmax_state *st) {
    v8f max8 = (v8f){0} - INFINITY;
    int32_t t = 0;
    if (softcap > 0.0f) {
        for (t = 0; t < n; t++) s[t] = tanhf(s[t] * scale / softcap) * softcap;
        scale = 1.0f;
    }
    for (t = 0; t + 8 <= n; t += 8) {
        const v8f v = load8(s + t) * scale;
        store8(s + t, v);
        const v8i greater = v > max8;
        max8 = (v8f)((greater & (v8i)v) | (~greater & (v8i)max8));
    }
    float chunk_max = -INFINITY;
    for (int j = 0; j < 8; j++) chunk_max = max8[j] > chunk_max ? max8[j] : chunk_max;
    for (; t < n; t++) {
        s[t] *= scale;
        chunk_max = s[t] > chunk_max ? s[t] : chunk_max;
    }
    const float new_max = chunk_max > st->max ? chunk_max : st->max;
    const float correction = expf(st->max - new_max);            /* 0 on the first chunk */
    st->max = new_max;
    v8f sum8 = {0};
    for (t = 0; t + 8 <= n; t += 8) {
        const v8f p = exp8_nonpositive(load8(s + t) - new_max);
        store8(s + t, p);
        sum8 += p;
    }
    float sum = ((sum8[0] + sum8[4]) + (sum8[1] + sum8[5])) + ((sum8[2] + sum8[6]) + (sum8[3] + sum8[7]));
    for (; t < n; t++) {
        s[t] = expf(s[t] - new_max);
        sum += s[t];
    }
    st->sum = st->sum * correction + sum;
    return correction;
}

/* One sequence's KV heads kv0 .. kv1 - 1 (their query heads q [.., G, D], out the same) over positions
 * first .. context_len - 1, read through table. The context is walked chunk by chunk, every head of the
 * range within a chunk (the chunk's cache rows are read together, the next chunk's prefetched).
 * Work buffers: scores [G, CHUNK], rows [CHUNK] token offsets, st [H] softmax states. */
static void attend_heads(const float *q, const float *k_cache, const float *v_cache, const int32_t *table,
                         int32_t first, int32_t context_len, int32_t kv0, int32_t kv1, int32_t group,
                         int32_t head_dim, int32_t block_size, size_t token_stride, float scale, float softcap,
                         float *out, float *scores, size_t *rows, softmax_state *st) {
    const size_t head_floats = (size_t)group * head_dim;
    for (int32_t g = 0; g < (kv1 - kv0) * group; g++) st[g] = (softmax_state){-INFINITY, 0.0f};
    memset(out, 0, sizeof(float) * (size_t)(kv1 - kv0) * head_floats);
    const size_t span = sizeof(float) * (size_t)(kv1 - kv0) * head_dim;     /* bytes of a row this item reads */
    for (int32_t c0 = first; c0 < context_len; c0 += CHUNK) {
        const int32_t n = context_len - c0 < CHUNK ? context_len - c0 : CHUNK;
        for (int32_t t = 0, b = c0 / block_size, off = c0 % block_size; t < n; t++) {
            rows[t] = ((size_t)table[b] * block_size + off) * token_stride + (size_t)kv0 * head_dim;
            if (++off == block_size) {
                off = 0;
                b++;
            }
        }
        /* the next chunk's rows, fetched while this one is computed */
        for (int32_t pos = c0 + CHUNK; pos < context_len && pos < c0 + 2 * CHUNK; pos++) {
            const size_t row = ((size_t)table[pos / block_size] * block_size + pos % block_size) * token_stride
                               + (size_t)kv0 * head_dim;
            for (size_t off = 0; off < span; off += 64) {
                __builtin_prefetch((const char *)(k_cache + row) + off, 0, 3);
                __builtin_prefetch((const char *)(v_cache + row) + off, 0, 3);
            }
        }
        for (int32_t kv = 0; kv < kv1 - kv0; kv++) {
            const float *kh = k_cache + (size_t)kv * head_dim, *vh = v_cache + (size_t)kv * head_dim;
            const float *qh = q + (size_t)kv * head_floats;
            float *oh = out + (size_t)kv * head_floats;
            /* scores of the chunk: 8 keys at a time, each K row read once for all G heads */
            for (int32_t t = 0; t < n; t += 8) {
                const int m = n - t < 8 ? n - t : 8;
                const float *k[8];
                for (int j = 0; j < 8; j++) k[j] = kh + rows[t + (j < m ? j : m - 1)];
                for (int32_t g = 0; g < group; g++)
                    dot8(qh + (size_t)g * head_dim, k, m, head_dim, scores + (size_t)g * CHUNK + t);
            }
            for (int32_t g = 0; g < group; g++) {
                float *s = scores + (size_t)g * CHUNK;
                const float correction = softmax_chunk(s, n, scale, softcap, &st[kv * group + g]);
                /* out_g = out_g * correction + sum_t p_t v_t, 64 dims at a time in registers */
                int32_t d0 = 0;
                for (; d0 + 64 <= head_dim; d0 += 64)
                    pv_accumulate(oh + (size_t)g * head_dim + d0, vh + d0, rows, s, n, correction, 8);
                for (; d0 < head_dim; d0 += 8)
                    pv_accumulate(oh + (size_t)g * head_dim + d0, vh + d0, rows, s, n, correction, 1);
            }
        }
    }
    for (int32_t g = 0; g < (kv1 - kv0) * group; g++) {
        const float inv = 1.0f / st[g].sum;
        for (int32_t d = 0; d < head_dim; d++) out[(size_t)g * head_dim + d] *= inv;
    }
}

/* Returns 0; -1 when a shape is outside the limits, -2 when a slot, block id or context length is
 * out of range (nothing written either way). Sequence s's query heads start at q + s * q_row_stride
 * (>= num_heads * head_dim: a row of a wider QKV buffer); out is dense. With k_new (and v_new, slots)
 * the num_new rows are written to their cache slots first. window <= 0: full attention; softcap <= 0:
 * no cap. */
int pagedgen_decode_attention_f32(const float *q, float *k_cache, float *v_cache, int64_t num_blocks,
                                  const int32_t *block_tables, int32_t max_blocks, const int32_t *context_lens,
                                  int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                                  int32_t block_size, float scale, int32_t window, float softcap, float *out,
                                  int32_t num_threads, int64_t q_row_stride, const float *k_new,
                                  int64_t k_row_stride, const float *v_new, int64_t v_row_stride,
                                  const int64_t *slots, int32_t num_new) {
    if (num_kv_heads < 1 || num_heads % num_kv_heads != 0 || q_row_stride < (int64_t)num_heads * head_dim) return -1;
    const int32_t group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || head_dim % 8 != 0 || block_size < 1
            || block_size > MAX_BLOCK_SIZE)
        return -1;
    const size_t token_stride = (size_t)num_kv_heads * head_dim;
    if (k_new && (k_row_stride < (int64_t)token_stride || v_row_stride < (int64_t)token_stride)) return -1;
    /* every index is checked before anything is written or read */
    int64_t work = 0;
    for (int32_t s = 0; s < num_seqs; s++) {
        const int32_t len = context_lens[s];
        if (len < 1 || (int64_t)(len + block_size - 1) / block_size > max_blocks) return -2;
        const int32_t first = (window > 0 && len > window) ? len - window : 0;
        for (int32_t b = first / block_size; b <= (len - 1) / block_size; b++)
            if (block_tables[(size_t)s * max_blocks + b] < 0 || block_tables[(size_t)s * max_blocks + b] >= num_blocks)
                return -2;
        work += len - first;
    }
    if (k_new)
        for (int32_t i = 0; i < num_new; i++)
            if (slots[i] < 0 || slots[i] >= num_blocks * block_size) return -2;
    for (int32_t i = 0; k_new && i < num_new; i++) {
        memcpy(k_cache + (size_t)slots[i] * token_stride, k_new + (size_t)i * k_row_stride, sizeof(float) * token_stride);
        memcpy(v_cache + (size_t)slots[i] * token_stride, v_new + (size_t)i * v_row_stride, sizeof(float) * token_stride);
    }
    /* work items: whole sequences when there are enough of them (or one thread), else (sequence, KV head)
     * pairs */
    const int parallel = num_threads > 1 && num_seqs * num_kv_heads > 1 && work * num_kv_heads >= PARALLEL_MIN_WORK;
    const int32_t heads_per_item = (num_seqs >= 2 * num_threads || !parallel) ? num_kv_heads : 1;
    const int32_t per_seq = num_kv_heads / heads_per_item, items = num_seqs * per_seq;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)group * CHUNK + sizeof(size_t) * CHUNK
                                        + sizeof(softmax_state) * (size_t)num_heads);
        size_t *rows = (size_t *)(scores + (size_t)group * CHUNK);
        softmax_state *st = (softmax_state *)(rows + CHUNK);
#pragma omp for schedule(dynamic, 1)
        for (int32_t item = 0; item < items; item++) {
            const int32_t seq = item / per_seq, kv0 = item % per_seq * heads_per_item;
            const int32_t len = context_lens[seq];
            const int32_t first = (window > 0 && len > window) ? len - window : 0;
            const size_t head = (size_t)kv0 * group * head_dim;
            attend_heads(q + (size_t)seq * (size_t)q_row_stride + head, k_cache, v_cache,
                         block_tables + (size_t)seq * max_blocks, first, len, kv0, kv0 + heads_per_item, group,
                         head_dim, block_size, token_stride, scale, softcap,
                         out + (size_t)seq * num_heads * head_dim + head, scores, rows, st);
        }
        free(scores);
    }
    return 0;
}
