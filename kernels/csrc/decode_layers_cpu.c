/* A decode step's decoder layers in one call, for Llama-family models whose projections are
 * block-quantized (block_quant_cpu.c), in fp32, over a KV cache of fp32, bf16 or fp16.
 *
 * At one or a few tokens a step, the work of a layer is small and the host's share of it large:
 * from Python each layer is a dozen calls (two norms, four or five products, each quantizing its
 * input, the rotary write, the attention, the activation), each with its checks and allocations.
 * decode_layers_q runs every layer of the step here, calling the same kernels in the same order
 * as the model's per-operation path (backend/model/llama.py), so its results are bit for bit
 * those of that path:
 *
 *   x = add_rms_norm(h += delta)                      input norm (no delta before layer 0)
 *   qkv = x W_qkv^T (+ b_qkv); rotary_write_kv(qkv)   q and k rotated in place, k and v stored
 *   attn = paged_decode_attention(q)                  one query token per sequence
 *   out = attn W_o^T (+ b_o); x = add_rms_norm(h += out)
 *   act = silu_mul(x W_gate_up^T, b_gate, b_up)       gate and up rows fused in one weight
 *   delta = act W_down^T (+ b_down)
 *
 * h [rows, hidden] is the residual stream, updated in place; the last layer's delta is written
 * to `delta` (the caller adds it with the final norm). Returns 0, 1 when scratch memory could not
 * be allocated, 2 when a slot, length or block table lies outside the cache (as the kernels it
 * calls; the residual stream is then partly updated and the step must fail).
 *
 * silu_mul (activation_cpu.c) is also what the per-operation path calls, so that both paths
 * compute the activation alike.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32
#define Q8_BLOCK_BYTES 44 /* block_q8 of block_quant_cpu.c: fp32 d and s, int32 sum, 32 int8 codes */

enum { KIND_Q4_1 = 0, KIND_Q8_0 = 1, KIND_Q4_1X8 = 2, KIND_Q8_0X8 = 3 };

/* The kernels of the other sources this one calls (their fp32 versions). */
void quantize_rows_q8(const float *x, int64_t x_stride, void *y, int64_t rows, int64_t k,
                      int num_threads);
void matmul_q4_1(const void *x, int64_t rows, const void *w, int64_t n, int64_t k, float *y,
                 int64_t y_stride, int num_threads);
void matmul_q8_0(const void *x, int64_t rows, const void *w, int64_t n, int64_t k, float *y,
                 int64_t y_stride, int num_threads);
void matmul_q4_1x8(const void *x, int64_t rows, const void *w, int64_t n, int64_t k, float *y,
                   int64_t y_stride, int num_threads);
void matmul_q8_0x8(const void *x, int64_t rows, const void *w, int64_t n, int64_t k, float *y,
                   int64_t y_stride, int num_threads);
void silu_mul(const float *gate_up, int64_t rows, int64_t width, const float *gate_bias,
              const float *up_bias, float *out, int num_threads);
void add_rms_norm_f32(float *x, int64_t x_stride, const float *residual, int64_t residual_stride,
                      const float *weight, float *out, int64_t out_stride, int64_t rows,
                      int64_t dim, float eps, int num_threads);
/* The rotary write and the attention for each cache element type (cache_type below): the cache
 * travels as void * so that one call site serves all three. */
#define DECLARE_CACHE_KERNELS(C, CELEM)                                                       \
    int rotary_write_kv_f32_##C(float *qkv, int64_t qkv_stride, const float *cos_t,          \
                                const float *sin_t, CELEM *k_cache, CELEM *v_cache,          \
                                int64_t num_slots, const int64_t *slots, int64_t tokens,     \
                                int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,   \
                                const float *q_norm, const float *k_norm, float norm_eps,    \
                                int num_threads);                                            \
    int paged_decode_attention_f32_##C(                                                      \
        const float *q, int64_t q_stride, const CELEM *k_cache, const CELEM *v_cache,        \
        int64_t num_blocks, const int64_t *block_tables, int64_t table_width,                \
        int64_t table_stride, const int64_t *seq_lens, float *out, int64_t out_stride,       \
        int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,         \
        int64_t block_size, float scale, int64_t window, const float *alibi,                 \
        int num_threads);                                                                    \
    static int rotary_##C(float *qkv, int64_t qkv_stride, const float *cos_t,                \
                          const float *sin_t, void *k_cache, void *v_cache,                  \
                          int64_t num_slots, const int64_t *slots, int64_t tokens,           \
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,         \
                          const float *q_norm, const float *k_norm, float norm_eps,          \
                          int num_threads)                                                   \
    {                                                                                        \
        return rotary_write_kv_f32_##C(qkv, qkv_stride, cos_t, sin_t, k_cache, v_cache,      \
                                       num_slots, slots, tokens, num_heads, num_kv_heads,    \
                                       head_dim, q_norm, k_norm, norm_eps, num_threads);     \
    }                                                                                        \
    static int attention_##C(const float *q, int64_t q_stride, const void *k_cache,          \
                             const void *v_cache, int64_t num_blocks,                        \
                             const int64_t *block_tables, int64_t table_width,               \
                             int64_t table_stride, const int64_t *seq_lens, float *out,      \
                             int64_t out_stride, int64_t num_seqs, int64_t num_heads,        \
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size,     \
                             float scale, int64_t window, const float *alibi,                \
                             int num_threads)                                                \
    {                                                                                        \
        return paged_decode_attention_f32_##C(q, q_stride, k_cache, v_cache, num_blocks,     \
                                              block_tables, table_width, table_stride,       \
                                              seq_lens, out, out_stride, num_seqs,           \
                                              num_heads, num_kv_heads, head_dim, block_size, \
                                              scale, window, alibi, num_threads);            \
    }

DECLARE_CACHE_KERNELS(f32, float)
DECLARE_CACHE_KERNELS(bf16, uint16_t)
DECLARE_CACHE_KERNELS(f16, _Float16)
#undef DECLARE_CACHE_KERNELS

typedef int (*rotary_fn)(float *, int64_t, const float *, const float *, void *, void *, int64_t,
                         const int64_t *, int64_t, int64_t, int64_t, int64_t, const float *,
                         const float *, float, int);
typedef int (*attention_fn)(const float *, int64_t, const void *, const void *, int64_t,
                            const int64_t *, int64_t, int64_t, const int64_t *, float *, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t,
                            const float *, int);

/* The cache element types' codes (kernels/cpu.py's CACHE_TYPES). */
enum { CACHE_F32 = 0, CACHE_BF16 = 1, CACHE_F16 = 2 };

/* One layer's weights and cache. Blocks are [out, in / 32 * block bytes] of their kind; a NULL
 * bias or norm is absent. Mirrored by kernels/cpu.py's DecodeLayer. */
typedef struct {
    const float *input_norm, *post_norm;
    const void *qkv, *o, *gate_up, *down;
    int64_t qkv_kind, o_kind, gate_up_kind, down_kind;
    const float *qkv_bias, *o_bias, *gate_bias, *up_bias, *down_bias;
    const float *q_norm, *k_norm;
    void *k_cache, *v_cache; /* of the call's cache_type */
    int64_t window; /* 0: attends over the whole context */
} decode_layer;

/* y = x w^T (+ bias) for fp32 rows x [rows, k] (contiguous); q8 is scratch for x's blocks. */
static void product(const float *x, int64_t rows, int64_t k, const void *w, int64_t kind,
                    int64_t n, const float *bias, float *y, void *q8, int num_threads)
{
    quantize_rows_q8(x, k, q8, rows, k, num_threads);
    if (kind == KIND_Q4_1)
        matmul_q4_1(q8, rows, w, n, k, y, n, num_threads);
    else if (kind == KIND_Q4_1X8)
        matmul_q4_1x8(q8, rows, w, n, k, y, n, num_threads);
    else if (kind == KIND_Q8_0X8)
        matmul_q8_0x8(q8, rows, w, n, k, y, n, num_threads);
    else
        matmul_q8_0(q8, rows, w, n, k, y, n, num_threads);
    if (bias != NULL)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < n; ++i)
                y[r * n + i] += bias[i];
}

int decode_layers_q(const decode_layer *layers, int64_t num_layers, float *h, float *delta,
                    int64_t rows, int64_t hidden, int64_t intermediate, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, const float *cos_t,
                    const float *sin_t, const int64_t *slots, int64_t num_cache_blocks,
                    int64_t block_size, const int64_t *block_tables, int64_t table_width,
                    int64_t table_stride, const int64_t *seq_lens, int64_t cache_type,
                    float eps, float scale, int num_threads)
{
    const rotary_fn rotary = cache_type == CACHE_BF16  ? rotary_bf16
                             : cache_type == CACHE_F16 ? rotary_f16
                                                       : rotary_f32;
    const attention_fn attention = cache_type == CACHE_BF16  ? attention_bf16
                                   : cache_type == CACHE_F16 ? attention_f16
                                                             : attention_f32;
    const int64_t q_width = num_heads * head_dim;
    const int64_t qkv_width = (num_heads + 2 * num_kv_heads) * head_dim;
    int64_t widest = hidden > intermediate ? hidden : intermediate;
    widest = widest > q_width ? widest : q_width;
    const size_t floats = (size_t)rows * (size_t)(hidden + qkv_width + q_width + hidden +
                                                  2 * intermediate + intermediate);
    float *scratch = malloc(sizeof(float) * floats);
    void *q8 = malloc((size_t)rows * (size_t)(widest / QK) * Q8_BLOCK_BYTES);
    if (scratch == NULL || q8 == NULL) {
        free(scratch);
        free(q8);
        return 1;
    }
    float *x = scratch, *qkv = x + rows * hidden, *attn = qkv + rows * qkv_width;
    float *out = attn + rows * q_width, *gate_up = out + rows * hidden;
    float *act = gate_up + rows * 2 * intermediate;
    int status = 0;
    for (int64_t l = 0; l < num_layers && status == 0; ++l) {
        const decode_layer *L = &layers[l];
        add_rms_norm_f32(h, hidden, l == 0 ? NULL : delta, hidden, L->input_norm, x, hidden,
                         rows, hidden, eps, num_threads);
        product(x, rows, hidden, L->qkv, L->qkv_kind, qkv_width, L->qkv_bias, qkv, q8,
                num_threads);
        status = rotary(qkv, qkv_width, cos_t, sin_t, L->k_cache, L->v_cache,
                        num_cache_blocks * block_size, slots, rows, num_heads, num_kv_heads,
                        head_dim, L->q_norm, L->k_norm, eps, num_threads);
        if (status != 0)
            break;
        status = attention(qkv, qkv_width, L->k_cache, L->v_cache, num_cache_blocks,
                           block_tables, table_width, table_stride, seq_lens, attn, q_width,
                           rows, num_heads, num_kv_heads, head_dim, block_size, scale,
                           L->window, NULL, num_threads);
        if (status != 0)
            break;
        product(attn, rows, q_width, L->o, L->o_kind, hidden, L->o_bias, out, q8, num_threads);
        add_rms_norm_f32(h, hidden, out, hidden, L->post_norm, x, hidden, rows, hidden, eps,
                         num_threads);
        product(x, rows, hidden, L->gate_up, L->gate_up_kind, 2 * intermediate, NULL, gate_up,
                q8, num_threads);
        silu_mul(gate_up, rows, intermediate, L->gate_bias, L->up_bias, act, num_threads);
        product(act, rows, intermediate, L->down, L->down_kind, hidden, L->down_bias, delta, q8,
                num_threads);
    }
    free(scratch);
    free(q8);
    return status;
}
