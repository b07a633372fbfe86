/*
 * Paged decode attention for the cpu backend, float32.
 *
 * One query token per sequence attends to its whole context (or, with a
 * sliding window W > 0, to its last W positions only: the blocks before the
 * window are never read), in place from the paged cache through its block
 * table (no gather copy). A soft-cap C > 0 turns each scaled score s into
 * C * tanh(s / C) before the softmax (Gemma 2). Work items
 * are (sequence, KV head) pairs; the G = num_heads / num_kv_heads query heads
 * of one KV head are processed together, so each cached K and V row is read
 * once (GQA). Softmax is online, block by block: per block, scores of all its
 * tokens, then one rescale of the running sum and accumulator.
 *
 * Layouts (all contiguous, row-major):
 *   q             [num_seqs, num_heads, head_dim] (rows q_row_stride floats apart)
 *   k_cache       [num_blocks, block_size, num_kv_heads, head_dim]  (v_cache the same)
 *   block_tables  [num_seqs, max_blocks] int32 (entries past a sequence's context are ignored)
 *   context_lens  [num_seqs] int32, each >= 1
 *   out           [num_seqs, num_heads, head_dim]
 *
 * The reference with the same meaning is paged_attention_ref in
 * backends/cpu/attention.py; tests compare the two.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 64      /* query heads per KV head */
#define MAX_HEAD_DIM 512
#define MAX_BLOCK_SIZE 256

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
static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

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

static inline void prefetch_block(const float *block, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)block + off, 0, 3);
}

/* One block of the G query heads of one KV head. q: [G, D] rows of this head
 * group; k_block, v_block: the block's first token at this head; acc: [G, D]
 * unnormalised outputs; running_max / running_sum: [G]; scores: [G, bs rounded up to 8]. */
static void attend_block(const float *q, const float *k_block, const float *v_block, int32_t n,
                         int32_t group, size_t token_stride, int32_t head_dim, int32_t padded_block,
                         float scale, float softcap, float *acc, float *running_max, float *running_sum,
                         float *scores) {
    {
        /* scores[g][t] = scale * q_g . k_t; each K row is read once for all G heads,
         * four independent partial sums hide the FMA latency */
        for (int32_t t = 0; t < n; t++) {
            const float *k = k_block + t * token_stride;
            for (int32_t g = 0; g < group; g++) {
                const float *qg = q + (size_t)g * head_dim;
                v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
                int32_t d = 0;
                for (; d + 32 <= head_dim; d += 32) {
                    s0 += load8(qg + d) * load8(k + d);
                    s1 += load8(qg + d + 8) * load8(k + d + 8);
                    s2 += load8(qg + d + 16) * load8(k + d + 16);
                    s3 += load8(qg + d + 24) * load8(k + d + 24);
                }
                for (; d < head_dim; d += 8) s0 += load8(qg + d) * load8(k + d);
                const float score = hsum8((s0 + s1) + (s2 + s3)) * scale;
                scores[g * padded_block + t] = softcap > 0.0f ? tanhf(score / softcap) * softcap : score;
            }
        }
        for (int32_t g = 0; g < group; g++) {
            float *s = scores + (size_t)g * padded_block;
            float block_max = s[0];
            for (int32_t t = 1; t < n; t++) block_max = s[t] > block_max ? s[t] : block_max;
            const float new_max = block_max > running_max[g] ? block_max : running_max[g];
            const float correction = expf(running_max[g] - new_max);   /* 0 on the first block */
            running_max[g] = new_max;
            for (int32_t t = 0; t < n; t += 8) store8(s + t, exp8_nonpositive(load8(s + t) - new_max));
            float sum = 0.0f;
            for (int32_t t = 0; t < n; t++) sum += s[t];
            running_sum[g] = running_sum[g] * correction + sum;
            /* acc_g = acc_g * correction + sum_t p_t v_t, 64 dims at a time in registers */
            for (int32_t d0 = 0; d0 < head_dim; d0 += 64) {
                const int32_t width = head_dim - d0 < 64 ? head_dim - d0 : 64;
                float *a = acc + (size_t)g * head_dim + d0;
                v8f r[8];
                for (int32_t c = 0; c < width / 8; c++) r[c] = load8(a + 8 * c) * correction;
                for (int32_t t = 0; t < n; t++) {
                    const float *v = v_block + t * token_stride + d0;
                    const float p = s[t];
                    for (int32_t c = 0; c < width / 8; c++) r[c] += p * load8(v + 8 * c);
                }
                for (int32_t c = 0; c < width / 8; c++) store8(a + 8 * c, r[c]);
            }
        }
    }
}

/* All heads of one sequence, block by block: a block's K and V rows (every KV
 * head) are contiguous, consumed while in cache, and the next block is
 * prefetched meanwhile. With window > 0 only positions context_len - window
 * .. context_len - 1 are read. acc: [H, D]; scores: [G, bs rounded up to 8]. */
static void attend_sequence(const float *q, const float *k_cache, const float *v_cache, const int32_t *table,
                            int32_t context_len, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                            int32_t block_size, float scale, int32_t window, float softcap, float *out,
                            float *acc, float *scores, float *running_max, float *running_sum) {
    const int32_t group = num_heads / num_kv_heads;
    const size_t token_stride = (size_t)num_kv_heads * head_dim;
    const size_t block_bytes = sizeof(float) * block_size * token_stride;
    const int32_t padded_block = (block_size + 7) / 8 * 8;
    for (int32_t h = 0; h < num_heads; h++) {
        running_max[h] = -INFINITY;
        running_sum[h] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)num_heads * head_dim);
    const int32_t num_blocks = (context_len + block_size - 1) / block_size;
    const int32_t first_pos = (window > 0 && context_len > window) ? context_len - window : 0;
    for (int32_t b = first_pos / block_size; b < num_blocks; b++) {
        const int32_t skip = (b == first_pos / block_size) ? first_pos - b * block_size : 0;  /* before the window */
        const int32_t n = ((b == num_blocks - 1) ? context_len - b * block_size : block_size) - skip;
        const size_t base = ((size_t)table[b] * block_size + skip) * token_stride;
        if (b + 1 < num_blocks) {
            const size_t next = (size_t)table[b + 1] * block_size * token_stride;
            prefetch_block(k_cache + next, block_bytes);
            prefetch_block(v_cache + next, block_bytes);
        }
        for (int32_t kv_head = 0; kv_head < num_kv_heads; kv_head++) {
            const int32_t h0 = kv_head * group;
            attend_block(q + (size_t)h0 * head_dim, k_cache + base + (size_t)kv_head * head_dim,
                         v_cache + base + (size_t)kv_head * head_dim, n, group, token_stride, head_dim,
                         padded_block, scale, softcap, acc + (size_t)h0 * head_dim, running_max + h0,
                         running_sum + h0, scores);
        }
    }
    for (int32_t h = 0; h < num_heads; h++) {
        const float inv = 1.0f / running_sum[h];
        for (int32_t d = 0; d < head_dim; d++) out[(size_t)h * head_dim + d] = acc[(size_t)h * head_dim + d] * inv;
    }
}

/* Returns 0, or -1 when a shape is outside the limits (nothing written). Sequence s's query heads
 * start at q + s * q_row_stride (>= num_heads * head_dim: a row of a wider QKV buffer); out is dense.
 * window <= 0: full attention; softcap <= 0: no cap. */
int pagedgen_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                                  const int32_t *block_tables, int32_t max_blocks, const int32_t *context_lens,
                                  int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                                  int32_t block_size, float scale, int32_t window, float softcap, float *out,
                                  int32_t num_threads, int64_t q_row_stride) {
    if (num_kv_heads < 1 || num_heads % num_kv_heads != 0 || q_row_stride < (int64_t)num_heads * head_dim) return -1;
    const int32_t group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || head_dim % 8 != 0 || block_size > MAX_BLOCK_SIZE)
        return -1;
    /* one sequence (single-stream decode) runs on the calling thread: forking costs more than its work */
#pragma omp parallel num_threads(num_threads) if (num_seqs > 1)
    {
        float *work = (float *)malloc(sizeof(float) * ((size_t)num_heads * head_dim + (size_t)group * ((block_size + 7) / 8 * 8)
                                                       + 2 * (size_t)num_heads));
        float *acc = work;
        float *scores = acc + (size_t)num_heads * head_dim;
        float *running_max = scores + (size_t)group * ((block_size + 7) / 8 * 8);
        float *running_sum = running_max + num_heads;
#pragma omp for schedule(dynamic, 1)
        for (int32_t seq = 0; seq < num_seqs; seq++) {
            const size_t row = (size_t)seq * num_heads * head_dim;
            attend_sequence(q + (size_t)seq * (size_t)q_row_stride, k_cache, v_cache,
                            block_tables + (size_t)seq * max_blocks, context_lens[seq],
                            num_heads, num_kv_heads, head_dim, block_size, scale, window, softcap, out + row,
                            acc, scores, running_max, running_sum);
        }
        free(work);
    }
    return 0;
}
