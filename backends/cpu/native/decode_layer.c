/*
 * A whole plain (Llama-style) decoder layer of a decode step in one call, float32.
 *
 * At one token a layer's arithmetic takes ~0.7 ms and every call from Python
 * (argument checks, ctypes marshalling, views, cache-write ops) costs several
 * microseconds: at a few dozen such calls per layer that overhead was a tenth
 * of the step. pagedgen_decode_layer_f32 chains, for the step's M decode rows:
 *
 *   attn_in (decode_ops.c)     sum = x + delta, h = rms_norm(sum), qkv = h @ w_qkv.T (+ bias), RoPE on q, k
 *   attention (paged_decode_attention.c)  k, v rows of qkv written to their cache slots, then attended
 *   mlp_block (decode_ops.c)   sum += attn @ w_o.T, gate_up, SwiGLU, down -> out
 *
 * Everything fixed for the model's lifetime (weights, caches, shapes) is in a
 * pagedgen_layer, everything fixed for one step (rows, cache tables, buffers)
 * in a pagedgen_step; both are built once (backends/cpu/native/layer.py), so a
 * layer costs one ctypes call with six arguments. Integers are int64 and reals
 * double so the ctypes mirrors are plain. With step->timings set, the call
 * writes the seconds of its parts there: [0] attn_in, [1] attention (cache
 * write + attend), [2] mlp_block, for the benchmark's breakdown.
 */
#include <stdint.h>
#include <time.h>

int pagedgen_attn_in_f32(const float *x, const float *delta, const float *norm_w, float eps, float *sum, float *h,
                         const float *w_qkv, const float *bias, float *qkv, const float *cos_, const float *sin_,
                         int32_t M, int32_t hidden, int32_t n_qkv, int32_t rope_heads, int32_t head_dim,
                         int32_t half, int32_t num_threads);
int pagedgen_mlp_block_f32(const float *attn, const float *w_o, const float *x, const float *norm_w, float eps,
                           float *o, float *sum, float *h, const float *w_gate_up, float *gate_up, float *act,
                           const float *w_down, float *out, int32_t M, int32_t attn_dim, int32_t hidden,
                           int32_t inter, int32_t num_threads);
int pagedgen_decode_attention_f32(const float *q, float *k_cache, float *v_cache, int64_t num_blocks,
                                  const int32_t *block_tables, int32_t max_blocks, const int32_t *context_lens,
                                  int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                                  int32_t block_size, float scale, int32_t window, float softcap, float *out,
                                  int32_t num_threads, int64_t q_row_stride, const float *k_new,
                                  int64_t k_row_stride, const float *v_new, int64_t v_row_stride,
                                  const int64_t *slots, int32_t num_new);

typedef struct {
    const float *input_norm, *w_qkv, *qkv_bias, *w_o, *post_norm, *w_gate_up, *w_down;   /* bias may be NULL */
    float *k_cache, *v_cache;                   /* [num_blocks, block_size, num_kv_heads, head_dim] */
    int64_t num_blocks, block_size, hidden, num_heads, num_kv_heads, head_dim, inter, rope_half, window;
    double eps, scale, softcap;                 /* window <= 0: full attention; softcap <= 0: none */
} pagedgen_layer;

typedef struct {
    int64_t rows, max_blocks, num_threads;
    const int64_t *slots;                       /* [rows] cache slot of each row's new K/V */
    const int32_t *block_tables, *context_lens; /* [rows, max_blocks], [rows] */
    float *res, *h, *qkv, *attn, *o, *gate_up, *act, *out;   /* [rows, ...] scratch, see layer.py */
    double *timings;                            /* NULL, or [3] seconds of the last call's parts */
} pagedgen_step;

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* x [rows, hidden] (the residual stream before the previous layer's MLP output), delta [rows, hidden]
 * (that output, unadded) or NULL; cos / sin [rows, rope_half]. Afterwards step->res holds x + delta +
 * the attention output and step->out the MLP output (unadded). Returns 0, or the failing part's status
 * (-1 shapes, -2 a slot / block / length out of range: nothing of the attention was written). */
int pagedgen_decode_layer_f32(const pagedgen_layer *L, const pagedgen_step *S, const float *x, const float *delta,
                              const float *cos_, const float *sin_) {
    const int32_t m = (int32_t)S->rows, hidden = (int32_t)L->hidden, d = (int32_t)L->head_dim;
    const int32_t h_q = (int32_t)L->num_heads, h_kv = (int32_t)L->num_kv_heads, threads = (int32_t)S->num_threads;
    const int32_t n_qkv = (h_q + 2 * h_kv) * d;
    const float *base = delta ? S->res : x;             /* x + delta, the residual the layer adds to */
    double t0 = S->timings ? seconds() : 0.0;
    int status = pagedgen_attn_in_f32(x, delta, L->input_norm, (float)L->eps, S->res, S->h, L->w_qkv, L->qkv_bias,
                                      S->qkv, cos_, sin_, m, hidden, n_qkv, h_q + h_kv, d, (int32_t)L->rope_half,
                                      threads);
    if (status) return status;
    double t1 = S->timings ? seconds() : 0.0;
    status = pagedgen_decode_attention_f32(S->qkv, L->k_cache, L->v_cache, L->num_blocks, S->block_tables,
                                           (int32_t)S->max_blocks, S->context_lens, m, h_q, h_kv, d,
                                           (int32_t)L->block_size, (float)L->scale, (int32_t)L->window,
                                           (float)L->softcap, S->attn, threads, n_qkv, S->qkv + h_q * d, n_qkv,
                                           S->qkv + (h_q + h_kv) * d, n_qkv, S->slots, m);
    if (status) return status;
    double t2 = S->timings ? seconds() : 0.0;
    status = pagedgen_mlp_block_f32(S->attn, L->w_o, base, L->post_norm, (float)L->eps, S->o, S->res, S->h,
                                    L->w_gate_up, S->gate_up, S->act, L->w_down, S->out, m, h_q * d, hidden,
                                    (int32_t)L->inter, threads);
    if (S->timings) {
        const double t3 = seconds();
        S->timings[0] = t1 - t0;
        S->timings[1] = t2 - t1;
        S->timings[2] = t3 - t2;
    }
    return status;
}
