/* Fused row-wise kernels for CPUs, fp32: each reads a token's row once and writes it once where
 * torch ops would make four to eight passes over the step's activations.
 *
 * Compiled without fast math and without FMA contraction: every product and sum is rounded as
 * torch rounds it in the reference (kernels/norm.py, kernels/rotary.py), so the results are the
 * same up to the order of the one reduction (the sum of squares of RMSNorm).
 * Rows are split over OpenMP threads (the same libgomp torch runs on).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* RMSNorm of each row of x, after adding `residual` into x when it is given (x is updated in
 * place: it is the residual stream): out = weight * (x * 1 / sqrt(mean(x^2) + eps)). */
void add_rms_norm_f32(float *x, int64_t x_stride, const float *residual, int64_t residual_stride,
                      const float *weight, float *out, int64_t out_stride, int64_t rows,
                      int64_t dim, float eps, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        float *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        if (residual != NULL) {
            const float *res = residual + r * residual_stride;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d)
                xr[d] += res[d];
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < dim; ++d)
            sum += xr[d] * xr[d];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d)
            o[d] = weight[d] * (xr[d] * inv);
    }
}

/* Rotary embedding of the query and key heads of each token's fused q|k|v row, in place, then
 * the token's key and value heads stored at its cache slot.
 *   qkv   [tokens, (num_heads + 2 * num_kv_heads) * head_dim], rows qkv_stride floats apart
 *   cos/sin [tokens, head_dim] (the tables at each token's position), rows contiguous
 *   k/v cache: slot s starts at s * num_kv_heads * head_dim
 * Rotation (the "rotate half" convention): with h = head_dim / 2,
 *   x'[i] = x[i] * cos[i] - x[i+h] * sin[i],  x'[i+h] = x[i+h] * cos[i+h] + x[i] * sin[i+h].
 * Returns 0, or 2 without touching anything when a slot lies outside the cache. */
int rotary_write_kv_f32(float *qkv, int64_t qkv_stride, const float *cos_t, const float *sin_t,
                        float *k_cache, float *v_cache, int64_t num_slots, const int64_t *slots,
                        int64_t tokens, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int num_threads)
{
    /* A slot outside the cache writes nothing at all: 2, as the attention kernel's bad input. */
    for (int64_t t = 0; t < tokens; ++t)
        if (slots[t] < 0 || slots[t] >= num_slots)
            return 2;
    const int64_t half = head_dim / 2;
    const int64_t kv_size = num_kv_heads * head_dim;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (tokens > 1)
    for (int64_t t = 0; t < tokens; ++t) {
        float *row = qkv + t * qkv_stride;
        const float *c = cos_t + t * head_dim;
        const float *s = sin_t + t * head_dim;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
            float *x = row + h * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] - x2 * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
        const int64_t slot = slots[t];
        memcpy(k_cache + slot * kv_size, row + num_heads * head_dim, sizeof(float) * kv_size);
        memcpy(v_cache + slot * kv_size, row + (num_heads + num_kv_heads) * head_dim,
               sizeof(float) * kv_size);
    }
    return 0;
}
