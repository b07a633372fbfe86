/*
 * The batched GEMM of the cpu backend, float32: out = x @ w.T (+ bias) for
 * more rows than a decode step of a few requests (decode_ops.c takes those).
 *
 * At batched-decode sizes (tens to a few hundred rows against a 576-1536 wide
 * model) BLAS spends much of each call packing the weight into its panel
 * layout and splitting a small product over threads: MKL reaches 190-300
 * GFLOP/s at 64 rows where it reaches ~400 at 2048 on a 2-core AVX-512 Xeon.
 * This kernel packs the small operand instead: x is transposed once per call
 * into xt [K, Mp] (Mp: M rounded up to the vector width, zero padded), and a
 * register tile of NR weight rows times MC vectors of token rows accumulates
 * over the whole K, each weight element broadcast from its own row (NR
 * sequential streams) and multiplied by MC vectors of xt. The weight is read
 * in place, once per TILE_ROWS token rows, so a batch of up to TILE_ROWS rows
 * streams each weight once; the tile's weight rows stay in L1 for the other
 * token tiles. No reduction across lanes: every output is one FMA chain in
 * k order, so a row's result does not depend on the other rows or on M.
 *
 * Threads take contiguous ranges of weight rows (multiples of NR) from a
 * shared counter, as pagedgen_linear_f32 does.
 *
 * Layouts (row-major): x [M, K] (row stride ldx), w [N, K] contiguous,
 * bias [N] or NULL, out [M, N] contiguous. Reference: F.linear (tests
 * compare).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16   /* floats per vector */
#define NR 6    /* weight rows per tile: NR * MC accumulators of the 32 registers */
#define MC 4    /* vectors of token rows per tile */
#elif defined(__AVX__)
#define VW 8
#define NR 4    /* 16 registers: 12 accumulators, 3 of xt, 1 broadcast */
#define MC 3
#else
#define VW 4
#define NR 6
#define MC 4
#endif
#define TILE_ROWS (VW * MC)

typedef float vf __attribute__((vector_size(VW * 4)));

static inline vf loadv(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void storev(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* out[m0 + i, n0 + r] for r < nr and i < min(mc * VW, M - m0): weight rows w[n0 ..), token rows from xt. */
static inline __attribute__((always_inline)) void tile(const float *xt, size_t mp, const float *w, size_t K,
                                                       const float *bias, float *out, size_t ldo, int m0, int M,
                                                       int n0, int nr, int mc, const float *next) {
    vf acc[NR][MC];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < mc; c++) acc[r][c] = (vf){0};
    /* row r of the tile at a[r * K] (r < 3) or b[(r - 3) * K]: two pointers and K, 2K as index registers */
    const float *a = w + (size_t)n0 * K, *b = a + 3 * K;
    const size_t K2 = 2 * K;
    const float *xk = xt + m0;
    for (size_t k = 0; k < K; k++, xk += mp, a++, b++) {
        if ((k & 15) == 0)                        /* the next tile's rows in the order it reads them */
            for (int r = 0; r < NR; r++) __builtin_prefetch(next + r * K + k, 0, 3);
        vf xv[MC];
        for (int c = 0; c < mc; c++) xv[c] = loadv(xk + c * VW);
        for (int r = 0; r < nr; r++) {
            const float s = r == 0 ? a[0] : r == 1 ? a[K] : r == 2 ? a[K2] : r == 3 ? b[0] : r == 4 ? b[K] : b[K2];
            for (int c = 0; c < mc; c++) acc[r][c] += xv[c] * s;
        }
    }
    float buf[NR][TILE_ROWS];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < mc; c++) storev(&buf[r][c * VW], acc[r][c]);
    const int rows = M - m0 < mc * VW ? M - m0 : mc * VW;
    for (int i = 0; i < rows; i++) {
        float *o = out + (size_t)(m0 + i) * ldo + n0;
        for (int r = 0; r < nr; r++) o[r] = bias ? buf[r][i] + bias[n0 + r] : buf[r][i];
    }
}

/* The tile for nr weight rows at every token tile; mc is a constant in each branch, so the loops unroll.
 * Each pass prefetches the NR weight rows after the tile's, a cache line of each every 16 k, in the order
 * the next tile reads them: the rows of one tile are short streams (K floats each) that the hardware
 * prefetchers hardly pick up. A prefetch past the end of w does not fault. */
static inline __attribute__((always_inline)) void tiles(const float *xt, size_t mp, const float *w, size_t K,
                                                        const float *bias, float *out, size_t ldo, int M, int n0,
                                                        int nr) {
    const float *next = w + (size_t)(n0 + nr) * K;
    int m0 = 0;
    for (; m0 + TILE_ROWS <= M; m0 += TILE_ROWS) tile(xt, mp, w, K, bias, out, ldo, m0, M, n0, nr, MC, next);
    switch ((M - m0 + VW - 1) / VW) {           /* vectors left: 0 .. MC (a last tile short of TILE_ROWS) */
    case 1: tile(xt, mp, w, K, bias, out, ldo, m0, M, n0, nr, 1, next); break;
    case 2: tile(xt, mp, w, K, bias, out, ldo, m0, M, n0, nr, 2, next); break;
    case 3: tile(xt, mp, w, K, bias, out, ldo, m0, M, n0, nr, 3, next); break;   /* MC is 3 or 4 */
#if MC > 3
    case 4: tile(xt, mp, w, K, bias, out, ldo, m0, M, n0, nr, 4, next); break;
#endif
    }
}

static void gemm_rows(const float *xt, size_t mp, const float *w, size_t K, const float *bias, float *out, int M,
                      int N, int n_begin, int n_end) {
    int n = n_begin;
    for (; n + NR <= n_end; n += NR) tiles(xt, mp, w, K, bias, out, (size_t)N, M, n, NR);
    for (; n < n_end; n++) tiles(xt, mp, w, K, bias, out, (size_t)N, M, n, 1);
}

/* The calling thread's xt buffer of at least `bytes`, kept between calls: a fresh one of this size is a
 * new mapping whose page faults cost as much as a small product. Each calling thread keeps its own (the
 * largest it needed), until it exits. */
static __thread float *xt_buffer;
static __thread size_t xt_bytes;

static float *xt_for(size_t bytes) {
    if (bytes > xt_bytes) {
        free(xt_buffer);
        xt_bytes = 0;
        xt_buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (xt_buffer != NULL) xt_bytes = bytes;
    }
    return xt_buffer;
}

/* out = x @ w.T (+ bias), any M >= 1; see the top of the file. Returns 0, or -1 on bad sizes or no memory. */
int pagedgen_gemm_f32(const float *x, int64_t ldx, const float *w, const float *bias, float *out, int32_t M,
                      int32_t N, int32_t K, int32_t num_threads) {
    if (M < 1 || N < 1 || K < 1 || ldx < K) return -1;
    const size_t mp = ((size_t)M + VW - 1) / VW * VW;
    float *xt = xt_for((size_t)K * mp * sizeof(float));
    if (xt == NULL) return -1;
    const int threads = (int64_t)M * N * K < (1 << 20) ? 1 : num_threads;
    int chunk = (N / (8 * threads) + NR - 1) / NR * NR;
    chunk = chunk < 4 * NR ? 4 * NR : chunk > 1020 ? 1020 : chunk;
    const int num_chunks = (N + chunk - 1) / chunk;
    const int k_blocks = (K + 15) / 16;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        /* xt = x.T in blocks of 16 k: each x row's 64 bytes are read once, each xt row written in order */
#pragma omp for schedule(static)
        for (int kb = 0; kb < k_blocks; kb++) {
            const int k0 = kb * 16, k1 = k0 + 16 < K ? k0 + 16 : K;
            for (int m = 0; m < M; m++) {
                const float *xr = x + (size_t)m * ldx;
                for (int k = k0; k < k1; k++) xt[(size_t)k * mp + m] = xr[k];
            }
            for (int k = k0; k < k1; k++)
                for (size_t m = M; m < mp; m++) xt[(size_t)k * mp + m] = 0.0f;
        }
#pragma omp for schedule(dynamic, 1)
        for (int c = 0; c < num_chunks; c++) {
            const int begin = c * chunk;
            const int end = begin + chunk < N ? begin + chunk : N;
            gemm_rows(xt, mp, w, (size_t)K, bias, out, M, N, begin, end);
        }
    }
    return 0;
}
