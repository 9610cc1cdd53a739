/* Fused row-wise kernels for CPUs, in fp32, bf16 or fp16: each reads a token's row once and
 * writes it once where torch ops would make four to eight passes over the step's activations.
 *
 *   add_rms_norm_T   RMSNorm of each row of x, after adding `residual` into x when it is given
 *                    (x is updated in place: it is the residual stream):
 *                    out = weight * (x * 1 / sqrt(mean(x^2) + eps)).
 *   add_layer_norm_T the same with LayerNorm: out = (x - mean) / sqrt(var + eps) * weight + bias
 *                    (bias may be NULL).
 *   rotary_write_kv_T_C rotary embedding of the query and key heads of each token's fused q|k|v
 *                    row, in place, then the token's key and value heads stored at its cache
 *                    slot, in the cache's element type C; with q_norm / k_norm, each q / k head is first RMS-normalised with
 *                    those weights (Qwen3). Returns 0, or 2 without touching anything when a
 *                    slot lies outside the cache.
 *       qkv     [tokens, (num_heads + 2 * num_kv_heads) * head_dim], rows qkv_stride apart
 *       cos/sin [tokens, head_dim] (the tables at each token's position), rows contiguous
 *       k/v cache: slot s starts at s * num_kv_heads * head_dim
 *     Rotation (the "rotate half" convention): with h = head_dim / 2,
 *       x'[i] = x[i] * cos[i] - x[i+h] * sin[i],  x'[i+h] = x[i+h] * cos[i+h] + x[i] * sin[i+h].
 *
 * Compiled without fast math and without FMA contraction, computing in fp32 and rounding to the
 * element type wherever torch's reference holds a result in it (kernels/norm.py,
 * kernels/rotary.py): the results are the same up to the order of the reductions (the sums of
 * the norms). Rows are split over OpenMP threads (the same libgomp torch runs on). The bodies are
 * elementwise_impl.h, compiled once per element type, and rotary_kv_impl.h, once per pair of
 * activation and cache types.
 */
#include <math.h>
#include <stdint.h>

#include "dtypes.h"
#include "parallel.h"

#define T f32
#include "elementwise_impl.h"
#undef T
#define T bf16
#include "elementwise_impl.h"
#undef T
#define T f16
#include "elementwise_impl.h"
#undef T

/* The cache holds the activations' type, or (an fp32 model with a 16-bit cache) half its bytes. */
#define T f32
#define C f32
#include "rotary_kv_impl.h"
#undef C
#define C bf16
#include "rotary_kv_impl.h"
#undef C
#define C f16
#include "rotary_kv_impl.h"
#undef C
#undef T
#define T bf16
#define C bf16
#include "rotary_kv_impl.h"
#undef C
#undef T
#define T f16
#define C f16
#include "rotary_kv_impl.h"
#undef C
#undef T
