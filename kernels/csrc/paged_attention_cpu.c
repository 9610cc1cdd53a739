/* Paged decode attention for CPUs, fp32: each query token attends over its sequence's keys and
 * values where they lie in the paged cache, without gathering them into a contiguous copy first.
 *
 * Decode attention on a CPU is bound by memory traffic: a step reads every running sequence's
 * whole context in every layer. Gathering the context (what torch ops must do) reads it, writes a
 * copy and reads the copy again; this kernel reads it once, block by block.
 *
 * Layouts (all contiguous in their last dimensions):
 *   q, out        [num_seqs, num_heads, head_dim], rows q_stride / out_stride floats apart
 *   k/v cache     [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_tables  [num_seqs, table_stride] int64: block b of sequence s is block_tables[s][b]
 *   seq_lens      [num_seqs] int64: tokens of context, the query token's own included
 * The num_heads / num_kv_heads query heads that share a KV head (grouped-query attention) are
 * computed together, so each key and value is loaded once for all of them.
 *
 * Work is split by sequence over OpenMP threads (the same libgomp torch runs on).
 * Softmax: scores for the whole context, their maximum, exp and sum, then the weighted values;
 * the scratch row for scores is per thread.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One sequence and KV head: the `group` query rows of q_h attend over the sequence's `len`
 * tokens. head_dim is a compile-time constant in the specialised copies (64, 128), which lets
 * the compiler keep a query row's accumulator in registers. */
static inline __attribute__((always_inline)) void attend_head(
    const float *restrict q_h, float *restrict out_h,
    const float *restrict k_cache, const float *restrict v_cache,
    const int64_t *restrict table, int64_t len, int64_t block_size, int64_t token_stride,
    int64_t head_offset, int64_t group, const int64_t head_dim, float scale,
    float *restrict scores)
{
    for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
        const float *kb = k_cache + table[b] * block_size * token_stride + head_offset;
        const int64_t n = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t i = 0; i < n; ++i) {
            const float *k = kb + i * token_stride;
            for (int64_t g = 0; g < group; ++g) {
                const float *qg = q_h + g * head_dim;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t d = 0; d < head_dim; ++d)
                    acc += qg[d] * k[d];
                scores[g * len + t0 + i] = acc * scale;
            }
        }
    }

    for (int64_t g = 0; g < group; ++g) {
        float *row = scores + g * len;
        float top = -FLT_MAX;
        for (int64_t t = 0; t < len; ++t)
            top = row[t] > top ? row[t] : top;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            row[t] = expf(row[t] - top);
            sum += row[t];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t)
            row[t] *= inv;
    }

    for (int64_t g = 0; g < group; ++g) {
        const float *row = scores + g * len;
        float acc[head_dim];
        for (int64_t d = 0; d < head_dim; ++d)
            acc[d] = 0.0f;
        for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
            const float *vb = v_cache + table[b] * block_size * token_stride + head_offset;
            const int64_t n = len - t0 < block_size ? len - t0 : block_size;
            for (int64_t i = 0; i < n; ++i) {
                const float p = row[t0 + i];
                const float *v = vb + i * token_stride;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d)
                    acc[d] += p * v[d];
            }
        }
        float *og = out_h + g * head_dim;
        for (int64_t d = 0; d < head_dim; ++d)
            og[d] = acc[d];
    }
}

#define DEFINE_ATTEND(NAME, HEAD_DIM)                                                         \
    static void NAME(const float *q_h, float *out_h, const float *k_cache,                  \
                     const float *v_cache, const int64_t *table, int64_t len,               \
                     int64_t block_size, int64_t token_stride, int64_t head_offset,         \
                     int64_t group, int64_t head_dim, float scale, float *scores)           \
    {                                                                                        \
        (void)head_dim;                                                                      \
        attend_head(q_h, out_h, k_cache, v_cache, table, len, block_size, token_stride,     \
                    head_offset, group, HEAD_DIM, scale, scores);                            \
    }

DEFINE_ATTEND(attend_64, 64)
DEFINE_ATTEND(attend_128, 128)
DEFINE_ATTEND(attend_any, head_dim)

/* Returns 0 on success, 1 when the scratch memory could not be allocated, 2 when a sequence's
 * length does not fit its block table or the table names a block outside the cache (nothing is
 * read then). */
int paged_decode_attention_f32(
    const float *q, int64_t q_stride,
    const float *k_cache, const float *v_cache, int64_t num_blocks,
    const int64_t *block_tables, int64_t table_stride,
    const int64_t *seq_lens,
    float *out, int64_t out_stride,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, float scale, int num_threads)
{
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t len = seq_lens[s];
        if (len < 1 || len > table_stride * block_size)
            return 2;
        for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
            const int64_t block = block_tables[s * table_stride + b];
            if (block < 0 || block >= num_blocks)
                return 2;
        }
    }
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim; /* floats between tokens of a block */
    void (*attend)(const float *, float *, const float *, const float *, const int64_t *,
                   int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float *) =
        head_dim == 64 ? attend_64 : head_dim == 128 ? attend_128 : attend_any;
    int64_t max_len = 0;
    for (int64_t s = 0; s < num_seqs; ++s)
        if (seq_lens[s] > max_len)
            max_len = seq_lens[s];
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(group * max_len + 1));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; ++s) {
            if (scores == NULL)
                continue;
            for (int64_t h = 0; h < num_kv_heads; ++h)
                attend(q + s * q_stride + h * group * head_dim,
                       out + s * out_stride + h * group * head_dim, k_cache, v_cache,
                       block_tables + s * table_stride, seq_lens[s], block_size, token_stride,
                       h * head_dim, group, head_dim, scale, scores);
        }
        free(scores);
    }
    return failed;
}
