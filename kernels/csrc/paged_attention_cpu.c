/* Paged decode attention for CPUs, in fp32, bf16 or fp16 (computed in fp32): each query token
 * attends over its sequence's keys and values where they lie in the paged cache, without
 * gathering them into a contiguous copy first.
 *
 * The cache's element type may differ from the query's: an fp32 model may keep its keys and
 * values in bf16 or fp16 (half the bytes to read), loaded to fp32 as they are read.
 *
 * Decode attention on a CPU is bound by memory traffic: a step reads every running sequence's
 * whole context in every layer. Gathering the context (what torch ops must do) reads it, writes a
 * copy and reads the copy again; this kernel reads it once, block by block.
 *
 * Layouts (all contiguous in their last dimensions):
 *   q, out        [num_seqs, num_heads, head_dim], rows q_stride / out_stride elements apart
 *   k/v cache     [num_blocks, block_size, num_kv_heads, head_dim]
 *   block_tables  [num_seqs, table_width] int64, rows table_stride apart: block b of
 *                 sequence s is block_tables[s * table_stride + b]
 *   seq_lens      [num_seqs] int64: tokens of context, the query token's own included
 * Under a sliding window of W tokens a query attends over its last W tokens only (blocks before
 * them may be the null block: the engine releases them). ALiBi adds slope * (key position -
 * query position) to each scaled score, one slope per query head.
 * The num_heads / num_kv_heads query heads that share a KV head (grouped-query attention) are
 * computed together, so each key and value is loaded once for all of them.
 *
 * Work is split by sequence over OpenMP threads (the same libgomp torch runs on).
 * Softmax: scores for the whole context, their maximum, exp and sum, then the weighted values;
 * each thread keeps its scores (num_heads x longest span) in its own scratch buffer. The body is
 * paged_attention_impl.h, compiled once per pair of query and cache types.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "dtypes.h"
#include "parallel.h"
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Asks for the bytes at p (the context's next block, while this one is read) to be brought
 * into L2. A sequence's blocks lie anywhere in the cache and are a few KiB each: the hardware
 * prefetchers start afresh at each, and a 16-bit cache's blocks, converted in one quick pass,
 * waited on memory (pagedserve.bench.kv_cache, docs/benchmarks.md; into L1 instead, or two
 * blocks ahead, gained less or nothing). */
static inline void prefetch_bytes(const void *p, int64_t bytes)
{
    for (int64_t i = 0; i < bytes; i += 64)
        __builtin_prefetch((const char *)p + i, 0, 1);
}

/* n cache elements as fp32, converted once for every query row of a group that reads them:
 * fp32 rows are read in place, 16-bit rows converted into buf. GCC does not vectorise _Float16
 * conversions in loops, so fp16 rows go through the F16C / AVX-512 conversions where the CPU has
 * them. ROW_IN_PLACE_T says whether row_T reads in place. */
#define ROW_IN_PLACE_f32 1
#define ROW_IN_PLACE_bf16 0
#define ROW_IN_PLACE_f16 0

static inline const float *row_f32(const f32_t *src, float *buf, int64_t n)
{
    (void)buf;
    (void)n;
    return src;
}

static inline const float *row_bf16(const bf16_t *src, float *buf, int64_t n)
{
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
        buf[i] = load_bf16(src[i]);
    return buf;
}

static inline const float *row_f16(const f16_t *src, float *buf, int64_t n)
{
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#endif
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; ++i)
        buf[i] = load_f16(src[i]);
    return buf;
}

/* The arithmetic of attention over fp32 rows, shared by every pair of types. The query rows of
 * a KV head's group are taken a few at a time, so that each key or value loaded serves all of
 * them; rows whose width is a multiple of 16 go through 16-lane vectors (GCC's vector
 * extensions: AVX-512 registers, or pairs of AVX2 ones) with the accumulators in registers, and
 * the scores of four keys are summed across lanes together. Profiles of plain loops showed the
 * loads, a row's accumulator kept in memory and a horizontal sum per key and row. */
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16u __attribute__((vector_size(64), aligned(4))); /* unaligned loads, stores */
typedef int32_t ivec16 __attribute__((vector_size(64)));
#define MAX_VECS 16 /* head_dim up to 256 on the vector path */
#define MAX_ROWS 3  /* query rows per tile */
#define KEY_TILE 4

static inline __attribute__((always_inline)) vec16 load16(const float *p)
{
    return *(const vec16u *)p;
}

/* Lane j of the result is the sum of lanes 2j and 2j+1 of a then b (pairs of a in lanes 0-7). */
static inline __attribute__((always_inline)) vec16 pair_sums(vec16 a, vec16 b)
{
    const ivec16 even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const ivec16 odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}

/* Query rows a tile takes: fewer as rows widen, so that the tile's queries and sums stay in
 * registers. */
static inline __attribute__((always_inline)) int64_t rows_per_tile(int64_t head_dim)
{
    return head_dim <= 64 ? MAX_ROWS : head_dim <= 128 ? 2 : 1;
}

/* s[r * s_stride + j] = q_r . k_j for m query rows q_r (head_dim apart) and n key rows k_j
 * (kstride apart), each head_dim wide. */
static inline __attribute__((always_inline)) void dot_tile(
    const float *restrict q, const int m, const float *restrict k, int64_t n, int64_t kstride,
    const int64_t head_dim, float *restrict s, int64_t s_stride)
{
    int64_t j = 0;
    if (head_dim % 16 == 0 && head_dim <= 16 * MAX_VECS) {
        const int nv = (int)(head_dim / 16);
        vec16 qv[MAX_ROWS][MAX_VECS];
        for (int r = 0; r < m; ++r)
            for (int i = 0; i < nv; ++i)
                qv[r][i] = load16(q + r * head_dim + 16 * i);
        for (; j + KEY_TILE <= n; j += KEY_TILE) {
            vec16 a[MAX_ROWS][KEY_TILE];
            for (int r = 0; r < m; ++r)
                for (int c = 0; c < KEY_TILE; ++c)
                    a[r][c] = (vec16){0};
            for (int i = 0; i < nv; ++i)
                for (int c = 0; c < KEY_TILE; ++c) {
                    const vec16 kv = load16(k + (j + c) * kstride + 16 * i);
                    for (int r = 0; r < m; ++r)
                        a[r][c] += qv[r][i] * kv;
                }
            for (int r = 0; r < m; ++r) {
                /* Four horizontal sums at once: halve the lanes per key four times. */
                const vec16 quads = pair_sums(pair_sums(a[r][0], a[r][1]),
                                              pair_sums(a[r][2], a[r][3]));
                const vec16 halves = pair_sums(quads, quads);
                const vec16 sums = pair_sums(halves, halves);
                for (int c = 0; c < KEY_TILE; ++c)
                    s[r * s_stride + j + c] = sums[c];
            }
        }
    }
    for (; j < n; ++j)
        for (int r = 0; r < m; ++r) {
            const float *qr = q + r * head_dim, *kr = k + j * kstride;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < head_dim; ++d)
                acc += qr[d] * kr[d];
            s[r * s_stride + j] = acc;
        }
}

/* o_r += sum over j of p[r * p_stride + j] * v_j for m output rows o_r (head_dim apart) and n
 * value rows v_j (vstride apart), each head_dim wide. */
static inline __attribute__((always_inline)) void accumulate_tile(
    float *restrict o, const int m, const float *restrict p, int64_t p_stride,
    const float *restrict v, int64_t n, int64_t vstride, const int64_t head_dim)
{
    if (head_dim % 16 == 0 && head_dim <= 16 * MAX_VECS) {
        const int nv = (int)(head_dim / 16);
        vec16 a[MAX_ROWS][MAX_VECS];
        for (int r = 0; r < m; ++r)
            for (int i = 0; i < nv; ++i)
                a[r][i] = load16(o + r * head_dim + 16 * i);
        for (int64_t j = 0; j < n; ++j)
            for (int i = 0; i < nv; ++i) {
                const vec16 vv = load16(v + j * vstride + 16 * i);
                for (int r = 0; r < m; ++r)
                    a[r][i] += p[r * p_stride + j] * vv;
            }
        for (int r = 0; r < m; ++r)
            for (int i = 0; i < nv; ++i)
                *(vec16u *)(o + r * head_dim + 16 * i) = a[r][i];
        return;
    }
    for (int r = 0; r < m; ++r)
        for (int64_t j = 0; j < n; ++j) {
            const float pj = p[r * p_stride + j];
            const float *vr = v + j * vstride;
            float *or = o + r * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d)
                or[d] += pj * vr[d];
        }
}

/* dot_tile and accumulate_tile for a group of rows, a tile at a time, each tile's row count a
 * constant of its own copy (the switch), so that its vectors are registers. */
static inline __attribute__((always_inline)) void dot_rows(
    const float *q, int64_t rows, const float *k, int64_t n, int64_t kstride,
    const int64_t head_dim, float *s, int64_t s_stride)
{
    const int64_t tile = rows_per_tile(head_dim);
    for (int64_t r = 0; r < rows; r += tile) {
        const float *qr = q + r * head_dim;
        float *sr = s + r * s_stride;
        switch (rows - r < tile ? rows - r : tile) {
        case 1: dot_tile(qr, 1, k, n, kstride, head_dim, sr, s_stride); break;
        case 2: dot_tile(qr, 2, k, n, kstride, head_dim, sr, s_stride); break;
        default: dot_tile(qr, MAX_ROWS, k, n, kstride, head_dim, sr, s_stride); break;
        }
    }
}

static inline __attribute__((always_inline)) void accumulate_rows(
    float *o, int64_t rows, const float *p, int64_t p_stride, const float *v, int64_t n,
    int64_t vstride, const int64_t head_dim)
{
    const int64_t tile = rows_per_tile(head_dim);
    for (int64_t r = 0; r < rows; r += tile) {
        float *orow = o + r * head_dim;
        const float *pr = p + r * p_stride;
        switch (rows - r < tile ? rows - r : tile) {
        case 1: accumulate_tile(orow, 1, pr, p_stride, v, n, vstride, head_dim); break;
        case 2: accumulate_tile(orow, 2, pr, p_stride, v, n, vstride, head_dim); break;
        default: accumulate_tile(orow, MAX_ROWS, pr, p_stride, v, n, vstride, head_dim); break;
        }
    }
}

/* The row helpers, compiled once per head width (64, 128, any) and shared by every pair of
 * types: inlined into each pair's copy of the kernel they took most of its compile time. The
 * copies pick theirs by head_dim, a constant there, so the choice folds away. */
#define DEFINE_ROW_HELPERS(SUFFIX, HEAD_DIM)                                                   \
    static __attribute__((noinline)) void dot_rows_##SUFFIX(                                \
        const float *q, int64_t rows, const float *k, int64_t n, int64_t kstride,           \
        int64_t head_dim, float *s, int64_t s_stride)                                        \
    {                                                                                        \
        (void)head_dim;                                                                      \
        dot_rows(q, rows, k, n, kstride, HEAD_DIM, s, s_stride);                             \
    }                                                                                        \
    static __attribute__((noinline)) void accumulate_rows_##SUFFIX(                         \
        float *o, int64_t rows, const float *p, int64_t p_stride, const float *v, int64_t n, \
        int64_t vstride, int64_t head_dim)                                                   \
    {                                                                                        \
        (void)head_dim;                                                                      \
        accumulate_rows(o, rows, p, p_stride, v, n, vstride, HEAD_DIM);                      \
    }

DEFINE_ROW_HELPERS(64, 64)
DEFINE_ROW_HELPERS(128, 128)
DEFINE_ROW_HELPERS(any, head_dim)
#undef DEFINE_ROW_HELPERS

static inline __attribute__((always_inline)) void dot_rows_of(
    const float *q, int64_t rows, const float *k, int64_t n, int64_t kstride,
    const int64_t head_dim, float *s, int64_t s_stride)
{
    if (head_dim == 64)
        dot_rows_64(q, rows, k, n, kstride, head_dim, s, s_stride);
    else if (head_dim == 128)
        dot_rows_128(q, rows, k, n, kstride, head_dim, s, s_stride);
    else
        dot_rows_any(q, rows, k, n, kstride, head_dim, s, s_stride);
}

static inline __attribute__((always_inline)) void accumulate_rows_of(
    float *o, int64_t rows, const float *p, int64_t p_stride, const float *v, int64_t n,
    int64_t vstride, const int64_t head_dim)
{
    if (head_dim == 64)
        accumulate_rows_64(o, rows, p, p_stride, v, n, vstride, head_dim);
    else if (head_dim == 128)
        accumulate_rows_128(o, rows, p, p_stride, v, n, vstride, head_dim);
    else
        accumulate_rows_any(o, rows, p, p_stride, v, n, vstride, head_dim);
}

/* The cache holds the query's type, or (an fp32 model with a 16-bit cache) half its bytes. */
#define T f32
#define C f32
#include "paged_attention_impl.h"
#undef C
#define C bf16
#include "paged_attention_impl.h"
#undef C
#define C f16
#include "paged_attention_impl.h"
#undef C
#undef T
#define T bf16
#define C bf16
#include "paged_attention_impl.h"
#undef C
#undef T
#define T f16
#define C f16
#include "paged_attention_impl.h"
#undef C
#undef T
