/*
 * Small-batch decode operators for the cpu backend, float32.
 *
 * A decode step multiplies a few token rows (M = 1..8; more: gemm.c) by every weight of the
 * model: it is bound by how fast the weights stream from memory, and the BLAS
 * GEMV/GEMM paths reach only ~60% of the machine's read bandwidth there. The
 * GEMM below reads each weight row once for all M rows (a tile of NR weight
 * rows times MR token rows accumulates in registers), splits the output
 * columns over the threads in contiguous ranges, and within a range takes
 * the tile's NR rows from NR equal parts of it (NR sequential streams far
 * apart: ~1.8x the bandwidth of NR adjacent rows on one core, measured on an
 * AVX2 EPYC). Whether software prefetches (non-temporal, 1 KiB ahead) run
 * ahead of the streams is set per process (pagedgen_set_weight_prefetch):
 * they helped there, but cut the bandwidth of an AVX-512 Xeon from ~30 to
 * ~10 GB/s, so the cpu backend measures both on the model's weights at start
 * (ops.py, choose_weight_prefetch) and keeps the faster; the results are the
 * same either way. The elementwise operators (RMSNorm with the residual add,
 * rotary embedding, SwiGLU, the greedy argmax) replace several torch ops
 * each, whose per-op overhead dominates at a few rows and whose separate
 * passes over memory cost at a prefill chunk (threaded there); attn_in and mlp_block
 * chain them for a whole decoder layer in two calls from Python (one with
 * the attention in between: decode_layer.c).
 *
 * Layouts (row-major; a row stride is given where rows may be strided):
 *   x    [M, K] (row stride ldx)     w [N, K] contiguous     bias [N] or NULL
 *   out  [M, N] contiguous
 *
 * References with the same meaning: F.linear, F.rms_norm, apply_rope in
 * backends/torch_model/rope.py, F.silu(gate) * up; tests compare them.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

#define PREFETCH_FLOATS 256   /* how far ahead (1 KiB) of each weight row the loads run */

static int weight_prefetch = 0;   /* 1: prefetch each weight stream ahead (pagedgen_set_weight_prefetch) */

/* Switch the weight-stream prefetches on (1) or off (0) for later calls; returns the previous setting. */
int pagedgen_set_weight_prefetch(int32_t on) {
    const int previous = weight_prefetch;
    weight_prefetch = on != 0;
    return previous;
}

/* out[m, n0 + j * rs] = x[m] . w[n0 + j * rs] (+ bias) for m < MR, j < NR: NR weight rows rs rows apart. */
static inline __attribute__((always_inline)) void gemm_tile(const float *x, size_t ldx, const float *w, size_t K,
                                                            const float *bias, float *out, size_t ldo, int MR, int NR,
                                                            size_t rs, int prefetch) {
    v8f acc[4][4];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NR; j++) acc[m][j] = (v8f){0};
    const size_t k8 = K & ~(size_t)7, ws = rs * K;
    for (size_t k = 0; k < k8; k += 8) {
        v8f wv[4];
        for (int j = 0; j < NR; j++) {
            if (prefetch) __builtin_prefetch(w + j * ws + k + PREFETCH_FLOATS, 0, 0);
            wv[j] = load8(w + j * ws + k);
        }
        for (int m = 0; m < MR; m++) {
            const v8f xv = load8(x + m * ldx + k);
            for (int j = 0; j < NR; j++) acc[m][j] += xv * wv[j];
        }
    }
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < NR; j++) {
            float s = hsum8(acc[m][j]);
            for (size_t k = k8; k < K; k++) s += x[m * ldx + k] * w[j * ws + k];
            out[m * ldo + j * rs] = bias ? s + bias[j * rs] : s;
        }
}

#define TILE(MR, NR, RS) gemm_tile(x + m * ldx, ldx, w + n * K, K, bias ? bias + n : NULL, out + m * N + n, N, MR, NR, \
                                   RS, prefetch)

/* Columns [n_begin, n_end) of out for all M rows. The range is cut into NR equal parts, and a tile takes
 * one weight row of each (rows q apart): NR sequential streams far apart in memory, which the memory
 * system serves ~1.8x faster at one token than NR adjacent rows (measured, float32 576-wide rows:
 * 10-13 -> 18-21 GB/s on one core). Each tile is used for every row block of x. */
static void gemm_columns(const float *x, size_t ldx, const float *w, const float *bias, float *out, int M, int N,
                         size_t K, int n_begin, int n_end) {
    const int prefetch = weight_prefetch;
    const int nr = M <= 2 ? 4 : 2;                 /* MR * NR accumulators <= 8 registers */
    const int q = (n_end - n_begin) / nr;
    for (int i = 0; i < q; i++) {
        const int n = n_begin + i;
        int m = 0;
        if (nr == 4) {
            for (; m + 2 <= M; m += 2) TILE(2, 4, q);
            if (m < M) TILE(1, 4, q);
        } else {
            for (; m + 4 <= M; m += 4) TILE(4, 2, q);
            for (; m < M; m++) TILE(1, 2, q);
        }
    }
    for (int n = n_begin + nr * q; n < n_end; n++)
        for (int m = 0; m < M; m++) TILE(1, 1, 1);
}

int pagedgen_gemm_f32(const float *x, int64_t ldx, const float *w, const float *bias, float *out, int32_t M,
                      int32_t N, int32_t K, int32_t num_threads);   /* gemm.c */

#define SMALL_MAX_ROWS 8   /* rows this GEMM takes; more go to gemm.c's (ops.py MAX_ROWS) */

/* out = x @ w.T (+ bias). Threads take contiguous ranges of columns (multiples of 4) from a shared
 * counter, ~8 per thread: each range is one sequential stream, and a thread that the OS
 * deschedules (a busy machine) holds up the others by one range, not by half the product.
 * More than SMALL_MAX_ROWS rows: the batched GEMM (gemm.c), so the layer calls below take any M. */
int pagedgen_linear_f32(const float *x, int64_t ldx, const float *w, const float *bias, float *out, int32_t M,
                        int32_t N, int32_t K, int32_t num_threads) {
    if (M > SMALL_MAX_ROWS) return pagedgen_gemm_f32(x, ldx, w, bias, out, M, N, K, num_threads);
    if (M < 1 || N < 1 || K < 1 || ldx < K) return -1;
    const int threads = (int64_t)N * K < (1 << 16) ? 1 : num_threads;   /* tiny products: no fork */
    int chunk = (N / (8 * threads) + 3) & ~3;
    chunk = chunk < 16 ? 16 : chunk > 1024 ? 1024 : chunk;
    const int num_chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
    for (int c = 0; c < num_chunks; c++) {
        const int begin = c * chunk;
        const int end = begin + chunk < N ? begin + chunk : N;
        gemm_columns(x, (size_t)ldx, w, bias, out, M, N, (size_t)K, begin, end);
    }
    return 0;
}

/* One row: out = x * rsqrt(mean(x^2) + eps) * weight. */
static void rms_norm_row(const float *x, const float *weight, float *out, int32_t n, float eps) {
    v8f s0 = {0}, s1 = {0};
    int32_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const v8f a = load8(x + i), b = load8(x + i + 8);
        s0 += a * a;
        s1 += b * b;
    }
    float ss = hsum8(s0 + s1);
    for (; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    i = 0;
    for (; i + 8 <= n; i += 8) store8(out + i, load8(x + i) * inv * load8(weight + i));
    for (; i < n; i++) out[i] = x[i] * inv * weight[i];
}

/* x, delta [M, n]: sum = x + delta, out = rms_norm(sum) * weight; without delta (NULL) out = rms_norm(x) * weight
 * and sum is not written. */
int pagedgen_add_rms_norm_f32(const float *x, const float *delta, const float *weight, float *sum, float *out,
                              int32_t M, int32_t n, float eps) {
    if (M < 1 || n < 1) return -1;
#pragma omp parallel for if ((int64_t)M * n >= (1 << 16))
    for (int32_t m = 0; m < M; m++) {
        const float *r = x + (size_t)m * n;
        if (delta) {
            const float *d = delta + (size_t)m * n;
            float *s = sum + (size_t)m * n;
            int32_t i = 0;
            for (; i + 8 <= n; i += 8) store8(s + i, load8(r + i) + load8(d + i));
            for (; i < n; i++) s[i] = r[i] + d[i];
            r = s;
        }
        rms_norm_row(r, weight, out + (size_t)m * n, n, eps);
    }
    return 0;
}

/* In place, for each of M tokens: the first num_heads heads of head_dim floats at x + m * ldx rotate
 * their first 2 * half dims by cos / sin [M, half]: [x1 c - x2 s, x2 c + x1 s]. */
int pagedgen_rope_f32(float *x, int64_t ldx, const float *cos_, const float *sin_, int32_t M, int32_t num_heads,
                      int32_t head_dim, int32_t half) {
    if (M < 1 || 2 * half > head_dim || ldx < (int64_t)num_heads * head_dim) return -1;
#pragma omp parallel for if ((int64_t)M * num_heads * head_dim >= (1 << 16))
    for (int32_t m = 0; m < M; m++) {
        const float *c = cos_ + (size_t)m * half, *s = sin_ + (size_t)m * half;
        for (int32_t h = 0; h < num_heads; h++) {
            float *x1 = x + (size_t)m * ldx + (size_t)h * head_dim, *x2 = x1 + half;
            int32_t i = 0;
            for (; i + 8 <= half; i += 8) {
                const v8f a = load8(x1 + i), b = load8(x2 + i), cv = load8(c + i), sv = load8(s + i);
                store8(x1 + i, a * cv - b * sv);
                store8(x2 + i, b * cv + a * sv);
            }
            for (; i < half; i++) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
    return 0;
}

/* exp of 8 floats, within 2 ulp of expf: e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two
 * parts, so r is exact), e^r by its degree-6 minimax polynomial on |r| <= ln 2 / 2 (Cephes' coefficients), 2^n
 * put into the exponent bits: the method of paged_decode_attention.c's exp8_nonpositive (a translation unit
 * of its own, without a shared header), over the whole range. x is clamped to [-87.3, 88.7]: e^x stays a finite normal float (>= 1.2e-38), where
 * expf would give 0 below or inf above; silu's x / (1 + e^-x) takes the same value to float precision either way. */
typedef int32_t v8i __attribute__((vector_size(32)));

/* Lanes of a where mask (all ones), else b (C has no ?: on vectors). */
static inline v8f select8(v8i mask, v8f a, v8f b) {
    v8i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const v8i r = (ai & mask) | (bi & ~mask);
    v8f out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline v8f exp8(v8f x) {
    const v8f hi = {88.7f, 88.7f, 88.7f, 88.7f, 88.7f, 88.7f, 88.7f, 88.7f};
    const v8f lo = {-87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f};
    x = select8(x > hi, hi, x);
    x = select8(x < lo, lo, x);
    const v8f round_magic = x - x + 12582912.0f;                  /* 1.5 * 2^23: adding it rounds to nearest */
    const v8f nf = (x * 1.44269504088896341f + round_magic) - round_magic;   /* round(x / ln 2) */
    const v8i n = __builtin_convertvector(nf, v8i);
    const v8f r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;  /* x - n ln 2, ln 2 = 0.693359375 - 2.12e-4 */
    v8f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;                                     /* e^r */
    const v8i scale = (n + 127) << 23;                            /* 2^n, n in [-126, 128) */
    v8f two_n;
    memcpy(&two_n, &scale, sizeof two_n);
    return p * two_n;
}

/* gate_up [M, 2 * n] (gate columns, then up) -> out [M, n] = silu(gate) * up. */
int pagedgen_silu_mul_f32(const float *gate_up, float *out, int32_t M, int32_t n) {
    if (M < 1 || n < 1) return -1;
#pragma omp parallel for if ((int64_t)M * n >= (1 << 16))
    for (int32_t m = 0; m < M; m++) {
        const float *g = gate_up + (size_t)m * 2 * n, *u = g + n;
        float *o = out + (size_t)m * n;
        int32_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const v8f gv = load8(g + i);
            store8(o + i, gv / (1.0f + exp8(-gv)) * load8(u + i));
        }
        for (; i < n; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    return 0;
}

/* out[m] = the index of the largest of the n floats at x + m * ldx, the first one on ties and the first NaN
 * where there is one (torch.argmax's answers), for M rows, threaded over rows for a large product. */
int pagedgen_argmax_f32(const float *x, int64_t ldx, int32_t M, int32_t n, int64_t *out) {
    if (M < 1 || n < 1 || ldx < n) return -1;
#pragma omp parallel for if ((int64_t)M * n >= (1 << 18))
    for (int32_t m = 0; m < M; m++) {
        const float *r = x + (size_t)m * ldx;
        const int32_t n8 = n & ~7;
        float top = r[0];
        int64_t index = 0;
        int any_nan = 0;
        if (n8) {                                  /* per lane: its best value and where it was first seen */
            v8f best = load8(r);
            v8i at = {0, 1, 2, 3, 4, 5, 6, 7}, nan = best != best;
            for (int32_t i = 8; i < n8; i += 8) {
                const v8f v = load8(r + i);
                const v8i greater = v > best;      /* strict: a lane keeps its first maximum (NaN never wins) */
                best = select8(greater, v, best);
                at = (greater & (i + (v8i){0, 1, 2, 3, 4, 5, 6, 7})) | (~greater & at);
                nan |= v != v;
            }
            top = best[0];
            index = at[0];
            for (int j = 1; j < 8; j++)
                if (best[j] > top || (best[j] == top && at[j] < index)) {
                    top = best[j];
                    index = at[j];
                }
            for (int j = 0; j < 8; j++) any_nan |= nan[j] != 0;
        }
        for (int32_t i = n8; i < n; i++) {
            if (r[i] > top) {
                top = r[i];
                index = i;
            }
            any_nan |= r[i] != r[i];
        }
        if (any_nan)                               /* torch: NaN is the largest; the first one */
            for (int32_t i = 0; i < n; i++)
                if (r[i] != r[i]) {
                    index = i;
                    break;
                }
        out[m] = index;
    }
    return 0;
}

/* The attention input of a decoder layer in one call, M rows: sum = x + delta (no delta: x, sum not written;
 * sum may alias x), h = rms_norm(sum) * norm_w, qkv [M, n_qkv] = h @ w_qkv.T (+ bias), then the first
 * rope_heads heads of head_dim floats of each qkv row rotated by cos / sin [M, half]. */
int pagedgen_attn_in_f32(const float *x, const float *delta, const float *norm_w, float eps, float *sum, float *h,
                         const float *w_qkv, const float *bias, float *qkv, const float *cos_, const float *sin_,
                         int32_t M, int32_t hidden, int32_t n_qkv, int32_t rope_heads, int32_t head_dim,
                         int32_t half, int32_t num_threads) {
    if (pagedgen_add_rms_norm_f32(x, delta, norm_w, sum, h, M, hidden, eps)) return -1;
    if (pagedgen_linear_f32(h, hidden, w_qkv, bias, qkv, M, n_qkv, hidden, num_threads)) return -1;
    return pagedgen_rope_f32(qkv, n_qkv, cos_, sin_, M, rope_heads, head_dim, half);
}

/* The rest of a plain (Llama-style) layer in one call, M rows, every buffer contiguous:
 * o = attn [M, attn_dim] @ w_o.T, sum = x + o (sum may alias x), h = rms_norm(sum) * norm_w,
 * gate_up [M, 2 * inter] = h @ w_gate_up.T, act [M, inter] = silu(gate) * up, out [M, hidden] = act @ w_down.T. */
int pagedgen_mlp_block_f32(const float *attn, const float *w_o, const float *x, const float *norm_w, float eps,
                           float *o, float *sum, float *h, const float *w_gate_up, float *gate_up, float *act,
                           const float *w_down, float *out, int32_t M, int32_t attn_dim, int32_t hidden,
                           int32_t inter, int32_t num_threads) {
    if (pagedgen_linear_f32(attn, attn_dim, w_o, NULL, o, M, hidden, attn_dim, num_threads)) return -1;
    if (pagedgen_add_rms_norm_f32(x, o, norm_w, sum, h, M, hidden, eps)) return -1;
    if (pagedgen_linear_f32(h, hidden, w_gate_up, NULL, gate_up, M, 2 * inter, hidden, num_threads)) return -1;
    if (pagedgen_silu_mul_f32(gate_up, act, M, inter)) return -1;
    return pagedgen_linear_f32(act, inter, w_down, NULL, out, M, hidden, inter, num_threads);
}
