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
 * Work is split by sequence over OpenMP threads (the same libgomp torch runs on);
 * paged_decode_attention_heads takes a range of the batch's query heads on the calling thread,
 * for a caller that splits the work itself (decode_layers_cpu.c, which can then split one
 * sequence's heads).
 * Softmax: scores for the whole context, their maximum, exp and sum, then the weighted values;
 * each thread keeps its scores (num_heads x longest span) in its own scratch buffer. The body is
 * paged_attention_impl.h, compiled once per pair of query and cache types.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtypes.h"
#include "parallel.h"
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Asks for the bytes at p (the context's next block, while this one is read) to be brought
 * into L2. A sequence's blocks lie anywhere in the cache and are a few KiB each: the hardware
 * prefetchers start afresh at each, and a 16-bit cache's blocks waited on memory
 * (pagedserve.bench.kv_cache, docs/benchmarks.md; into L1 instead, or two blocks ahead, gained
 * less or nothing). */
static inline void prefetch_bytes(const void *p, int64_t bytes)
{
    /* Every 64-byte line the bytes touch, from the one p lies in. */
    const uintptr_t line = (uintptr_t)p & ~(uintptr_t)63, end = (uintptr_t)p + (uintptr_t)bytes;
    for (uintptr_t a = line; a < end; a += 64)
        __builtin_prefetch((const void *)a, 0, 1);
}

/* The arithmetic of attention (paged_attention_tiles.h, once per cache type), in fp32. The query
 * rows of a KV head's group are taken a few at a time, so that each key or value loaded serves
 * all of them; rows whose width is a multiple of a vector's VL lanes go through vectors of the
 * machine's width (GCC's vector extensions: 16 lanes in an AVX-512 register, else 8 in an AVX2
 * one) with the accumulators in registers, and the scores of four keys are summed across lanes
 * together. Profiles of plain loops showed the loads, a row's accumulator kept in memory and a
 * horizontal sum per key and row; 16-lane vectors on AVX2 were kept on the stack, moved in
 * halves. */
#if defined(__AVX512F__)
#define VL 16
#define MAX_ROWS 3 /* query rows per tile, in 32 registers */
#else
#define VL 8
#define MAX_ROWS 2 /* in 16 registers */
#endif
typedef float vecf __attribute__((vector_size(4 * VL)));
typedef float vecfu __attribute__((vector_size(4 * VL), aligned(4))); /* unaligned loads */
typedef int32_t veci __attribute__((vector_size(4 * VL)));
#define MAX_VECS (256 / VL) /* head_dim up to 256 on the vector path */
#define KEY_TILE 4

static inline __attribute__((always_inline)) vecf loadv(const float *p)
{
    return *(const vecfu *)p;
}

/* VL cache elements as fp32, converted in registers. GCC does not vectorise _Float16
 * conversions, so fp16 goes through the F16C / AVX-512 conversions where the CPU has them. */
static inline __attribute__((always_inline)) vecf loadv_f32(const f32_t *p)
{
    return loadv(p);
}

static inline __attribute__((always_inline)) vecf loadv_bf16(const bf16_t *p)
{
    typedef uint16_t u16v __attribute__((vector_size(2 * VL), aligned(2)));
    typedef uint32_t u32v __attribute__((vector_size(4 * VL)));
    const u32v bits = __builtin_convertvector(*(const u16v *)p, u32v) << 16;
    vecf out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static inline __attribute__((always_inline)) vecf loadv_f16(const f16_t *p)
{
    vecf out;
#if defined(__AVX512F__)
    const __m512 all = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    memcpy(&out, &all, sizeof out);
#elif defined(__F16C__)
    const __m256 all = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    memcpy(&out, &all, sizeof out);
#else
    for (int i = 0; i < VL; ++i)
        out[i] = load_f16(p[i]);
#endif
    return out;
}

/* Lane j of the result is the sum of lanes 2j and 2j+1 of a then b (a's pairs in the low
 * half). */
static inline __attribute__((always_inline)) vecf pair_sums(vecf a, vecf b)
{
#if VL == 16
    const veci even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const veci odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
#else
    const veci even = {0, 2, 4, 6, 8, 10, 12, 14};
    const veci odd = {1, 3, 5, 7, 9, 11, 13, 15};
#endif
    return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}

/* Lanes 0-3 of the result hold the sums of a0's, a1's, a2's and a3's lanes: pairs summed until
 * one lane is left for each. */
static inline __attribute__((always_inline)) vecf key_sums(vecf a0, vecf a1, vecf a2, vecf a3)
{
    vecf sums = pair_sums(pair_sums(a0, a1), pair_sums(a2, a3));
    for (int lanes = VL / 4; lanes > 1; lanes /= 2)
        sums = pair_sums(sums, sums);
    return sums;
}

/* Query rows a tile takes: fewer as rows widen, so that the tile's queries and sums stay in
 * registers. */
static inline __attribute__((always_inline)) int64_t rows_per_tile(int64_t head_dim)
{
    return head_dim <= 4 * VL ? MAX_ROWS : head_dim <= 8 * VL ? 2 : 1;
}

#define C f32
#include "paged_attention_tiles.h"
#undef C
#define C bf16
#include "paged_attention_tiles.h"
#undef C
#define C f16
#include "paged_attention_tiles.h"
#undef C

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
