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
 *   block_tables  [num_seqs, table_width] int64, rows table_stride apart: block b of
 *                 sequence s is block_tables[s * table_stride + b]
 *   seq_lens      [num_seqs] int64: tokens of context, the query token's own included
 * The num_heads / num_kv_heads query heads that share a KV head (grouped-query attention) are
 * computed together, so each key and value is loaded once for all of them.
 *
 * Work is split by sequence over OpenMP threads (the same libgomp torch runs on).
 * Softmax: scores for the whole context, their maximum, exp and sum, then the weighted values;
 * each thread keeps its scores (num_heads x longest context) in its own scratch buffer.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* One sequence: its num_kv_heads * group query rows (q_s, heads contiguous) attend over its
 * `len` tokens. Keys and values are swept once, block by block, all heads of a token together,
 * so the sequence's context streams through the cache once per pass (a sweep per head would
 * re-read long contexts from L3). head_dim is a compile-time constant in the specialised copies
 * (64, 128), which lets the compiler keep a row's accumulator in registers. */
static inline __attribute__((always_inline)) void attend_seq(
    const float *restrict q_s, float *restrict out_s,
    const float *restrict k_cache, const float *restrict v_cache,
    const int64_t *restrict table, int64_t len, int64_t block_size, int64_t num_kv_heads,
    int64_t group, const int64_t head_dim, float scale, float *restrict scores)
{
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t rows = num_kv_heads * group;

    for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
        const float *kb = k_cache + table[b] * block_size * token_stride;
        const int64_t n = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t i = 0; i < n; ++i) {
            for (int64_t h = 0; h < num_kv_heads; ++h) {
                const float *k = kb + i * token_stride + h * head_dim;
                for (int64_t g = 0; g < group; ++g) {
                    const int64_t row = h * group + g;
                    const float *qr = q_s + row * head_dim;
                    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                    for (int64_t d = 0; d < head_dim; ++d)
                        acc += qr[d] * k[d];
                    scores[row * len + t0 + i] = acc * scale;
                }
            }
        }
    }

    for (int64_t row = 0; row < rows; ++row) {
        float *sr = scores + row * len;
        float top = -FLT_MAX;
        for (int64_t t = 0; t < len; ++t)
            top = sr[t] > top ? sr[t] : top;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            sr[t] = expf(sr[t] - top);
            sum += sr[t];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t)
            sr[t] *= inv;
    }

    for (int64_t row = 0; row < rows; ++row)
        for (int64_t d = 0; d < head_dim; ++d)
            out_s[row * head_dim + d] = 0.0f;
    for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
        const float *vb = v_cache + table[b] * block_size * token_stride;
        const int64_t n = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
            for (int64_t g = 0; g < group; ++g) {
                const int64_t row = h * group + g;
                const float *sr = scores + row * len + t0;
                float *o = out_s + row * head_dim;
                float acc[head_dim];
                for (int64_t d = 0; d < head_dim; ++d)
                    acc[d] = o[d];
                for (int64_t i = 0; i < n; ++i) {
                    const float p = sr[i];
                    const float *v = vb + i * token_stride + h * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; ++d)
                        acc[d] += p * v[d];
                }
                for (int64_t d = 0; d < head_dim; ++d)
                    o[d] = acc[d];
            }
        }
    }
}

#define DEFINE_ATTEND(NAME, HEAD_DIM)                                                         \
    static void NAME(const float *q_s, float *out_s, const float *k_cache,                  \
                     const float *v_cache, const int64_t *table, int64_t len,               \
                     int64_t block_size, int64_t num_kv_heads, int64_t group,               \
                     int64_t head_dim, float scale, float *scores)                          \
    {                                                                                        \
        (void)head_dim;                                                                      \
        attend_seq(q_s, out_s, k_cache, v_cache, table, len, block_size, num_kv_heads,      \
                   group, HEAD_DIM, scale, scores);                                          \
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
    const int64_t *block_tables, int64_t table_width, int64_t table_stride,
    const int64_t *seq_lens,
    float *out, int64_t out_stride,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, float scale, int num_threads)
{
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t len = seq_lens[s];
        if (len < 1 || len > table_width * block_size)
            return 2;
        for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
            const int64_t block = block_tables[s * table_stride + b];
            if (block < 0 || block >= num_blocks)
                return 2;
        }
    }
    if (num_seqs == 0)
        return 0;
    const int64_t group = num_heads / num_kv_heads;
    void (*attend)(const float *, float *, const float *, const float *, const int64_t *,
                   int64_t, int64_t, int64_t, int64_t, int64_t, float, float *) =
        head_dim == 64 ? attend_64 : head_dim == 128 ? attend_128 : attend_any;
    int64_t max_len = 0;
    for (int64_t s = 0; s < num_seqs; ++s)
        if (seq_lens[s] > max_len)
            max_len = seq_lens[s];
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(num_heads * max_len));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; ++s) {
            if (scores == NULL)
                continue;
            attend(q + s * q_stride, out + s * out_stride, k_cache, v_cache,
                   block_tables + s * table_stride, seq_lens[s], block_size, num_kv_heads,
                   group, head_dim, scale, scores);
        }
        free(scores);
    }
    return failed;
}
