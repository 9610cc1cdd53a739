/* The LoRA deltas of a mixed batch on CPUs, in fp32, bf16 or fp16 (kernels/lora.py documents
 * the operation; add_lora_reference there is the definition):
 *
 *   add_lora_T  for each row t with slot s = slots[t] >= 0, in place:
 *                 tmp[parts * rank] = a[s] @ x[t]                                    (shrink)
 *                 y[t, part p's columns] += b[s, part p's columns] @ tmp[p * rank, +rank) (expand)
 *               Rows with a negative slot are left alone. Returns 0; 1 when scratch memory could
 *               not be allocated, 2 when a slot is >= num_slots (both without touching y).
 *       y      [rows, out], rows y_stride apart; x [rows, in], rows x_stride apart
 *       a      [num_slots, parts * rank, in] contiguous; b [num_slots, out, rank] contiguous
 *       slots  [rows] int64; widths [parts] int64, the output columns of each part in order
 *
 * Rows are grouped by slot first (a counting sort), so that an adapter's a and b are read once
 * per block of its rows rather than once per row. The shrink loads each row of a[s] once for up
 * to SHRINK_ROWS rows of its slot and dots it with all of them (contiguous over `in`, vectorised
 * by the compiler). The expand works on tiles of EXPAND_COLS output columns of one part: the
 * tile of b[s] is transposed once into fp32 [rank][EXPAND_COLS] (with vector permutations for
 * ranks 8, 16, 32 and 64), then serves up to EXPAND_ROWS rows, a group at a time (four rows
 * with AVX-512, two with AVX, one otherwise), each a sum over rank of EXPAND_COLS-wide vectors.
 * Both phases share (row block x a-row chunk) and (row block x column tile) items among the
 * OpenMP threads of one parallel region (the same libgomp torch runs on); small calls run on
 * the calling thread. Each element of tmp and y is one thread's sum in a fixed order: the
 * results do not depend on the number of threads.
 *
 * All arithmetic is fp32, the shrunk vector included (as the reference holds it); an element of
 * y is rounded to its type once, after its delta is added (round to nearest even, as torch). The
 * sums run in another order than torch's matmuls (and may contract into FMAs): results agree up
 * to that reassociation. fp16 elements are converted by F16C's instructions where the host
 * has them, else on their bits (half_bits_to_float, float_to_half_bits: the same values as
 * _Float16 casts, but vectorised).
 *
 * The typed part below is compiled once per element type: this file includes itself with LORA_T
 * set to f32, bf16 and f16.
 */
#ifndef LORA_T

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

#include "dtypes.h"

#define SHRINK_ROWS 4
#define EXPAND_ROWS 16
#define EXPAND_COLS 32
/* Calls with fewer multiply-adds than this run on the calling thread alone. */
#define PARALLEL_WORK (1 << 17)

/* A block of rows of one slot: order[first, first + count) of lora_plan. */
typedef struct {
    int64_t slot, first, count;
} row_block;

/* A tile of output columns within one part. */
typedef struct {
    int64_t part, col, count;
} col_tile;

/* The work of one call: the rows with an adapter grouped by slot (each slot's rows in their
 * original order), cut into the blocks of both phases, and the expand's column tiles. */
typedef struct {
    int64_t *order;
    row_block *shrink_blocks, *expand_blocks;
    col_tile *tiles;
    int64_t active, num_shrink, num_expand, num_tiles;
} lora_plan;

static int64_t cut_blocks(const int64_t *starts, int64_t num_slots, int64_t size,
                          row_block *blocks)
{
    int64_t n = 0;
    for (int64_t s = 0; s < num_slots; ++s)
        for (int64_t i = starts[s]; i < starts[s + 1]; i += size) {
            const int64_t left = starts[s + 1] - i;
            blocks[n++] = (row_block){s, i, left < size ? left : size};
        }
    return n;
}

/* Fills plan (its arrays in one allocation, plan->order the start of it); returns as the kernel
 * does. */
static int make_plan(const int64_t *slots, int64_t rows, int64_t num_slots,
                     const int64_t *widths, int64_t parts, lora_plan *plan)
{
    for (int64_t t = 0; t < rows; ++t)
        if (slots[t] >= num_slots)
            return 2;
    int64_t num_tiles = 0;
    for (int64_t p = 0; p < parts; ++p)
        num_tiles += (widths[p] + EXPAND_COLS - 1) / EXPAND_COLS;
    const size_t max_blocks = (size_t)rows + (size_t)num_slots;
    const size_t bytes = ((size_t)rows + (size_t)num_slots + 1) * sizeof(int64_t) +
                         2 * max_blocks * sizeof(row_block) + (size_t)num_tiles * sizeof(col_tile);
    char *memory = malloc(bytes);
    if (memory == NULL)
        return 1;
    plan->order = (int64_t *)memory;
    int64_t *starts = plan->order + rows; /* num_slots + 1 entries */
    plan->shrink_blocks = (row_block *)(starts + num_slots + 1);
    plan->expand_blocks = plan->shrink_blocks + max_blocks;
    plan->tiles = (col_tile *)(plan->expand_blocks + max_blocks);

    /* Counting sort: starts[s + 1] counts slot s, then becomes the end of its group while the
     * rows are placed, then starts[s] its start. */
    memset(starts, 0, ((size_t)num_slots + 1) * sizeof(int64_t));
    for (int64_t t = 0; t < rows; ++t)
        if (slots[t] >= 0)
            ++starts[slots[t] + 1];
    for (int64_t s = 0; s < num_slots; ++s)
        starts[s + 1] += starts[s];
    plan->active = starts[num_slots];
    for (int64_t t = 0; t < rows; ++t)
        if (slots[t] >= 0)
            plan->order[starts[slots[t]]++] = t;
    for (int64_t s = num_slots; s > 0; --s)
        starts[s] = starts[s - 1];
    starts[0] = 0;

    plan->num_shrink = cut_blocks(starts, num_slots, SHRINK_ROWS, plan->shrink_blocks);
    plan->num_expand = cut_blocks(starts, num_slots, EXPAND_ROWS, plan->expand_blocks);
    plan->num_tiles = 0;
    for (int64_t p = 0, col = 0; p < parts; col += widths[p++])
        for (int64_t c = 0; c < widths[p]; c += EXPAND_COLS) {
            const int64_t left = widths[p] - c;
            plan->tiles[plan->num_tiles++] =
                (col_tile){p, col + c, left < EXPAND_COLS ? left : EXPAND_COLS};
        }
    return 0;
}

/* fp16 <-> fp32 on the bits. Without AVX512-FP16, GCC converts _Float16 one element at a time
 * (dtypes.h's load_f16/store_f16); these are branch-free, so that loops over them vectorise, and
 * give the same results: the load is exact (normal numbers rebiased, infinities and NaNs rebiased
 * once more, zeros and subnormals through an exact integer conversion), the store rounds to
 * nearest even through an fp32 addition that leaves the half's bits at the bottom (the method
 * of the FP16 library, github.com/Maratyszcza/FP16), overflowing to infinity, NaN kept. */
typedef uint16_t lora_u16 __attribute__((may_alias));

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float half_bits_to_float(uint16_t h)
{
    const uint32_t em = h & 0x7fffu;
    const uint32_t small = f32_bits((float)(int32_t)em * 0x1p-24f);
    const uint32_t inf_nan = 0u - (uint32_t)(em >= 0x7c00u);
    const uint32_t subnormal = 0u - (uint32_t)(em < 0x0400u);
    const uint32_t bits = ((em << 13) + 0x38000000u + (inf_nan & 0x38000000u)) & ~subnormal;
    return bits_f32(bits | (small & subnormal) | (uint32_t)(h & 0x8000u) << 16);
}

static inline uint16_t float_to_half_bits(float f)
{
    const uint32_t w = f32_bits(f);
    const uint32_t twice = w + w;
    uint32_t bias = twice & 0xff000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    /* |f| * 4, or infinity from 2^16 on; exact either way, so contracting it into the addition
     * changes nothing. */
    const float base = bits_f32((bias >> 1) + 0x07800000u) + fabsf(f) * 0x1p+112f * 0x1p-110f;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
    return (uint16_t)((w & 0x80000000u) >> 16 | (twice > 0xff000000u ? 0x7e00u : nonsign));
}

/* The expand's vectors are of the machine's width: GCC keeps generic vectors wider than its
 * registers in memory, moving them in halves. A group of GROUP_ROWS rows keeps its
 * GROUP_ROWS * VECS accumulators (eight) in registers beside a row of bt. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#define VECS (EXPAND_COLS / LANES)
#define GROUP_ROWS (LANES / 4)
typedef float vecf __attribute__((vector_size(LANES * sizeof(float))));

static inline vecf load_vecf(const float *p)
{
    vecf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The expand's inner products over a transposed tile bt of b ([rank][EXPAND_COLS]):
 * deltas[r][c] = sum over k of v[r][k] * bt[k][c], in order of k. GROUP_ROWS rows at a time,
 * each row of bt loaded once for them all, their independent accumulators keep the FMA units
 * busy; a single row splits its sum over even and odd k for the same reason. */
static void expand_group(const float *const *v, const float *bt, int64_t rank,
                         float deltas[][EXPAND_COLS])
{
    vecf acc[GROUP_ROWS][VECS];
    for (int r = 0; r < GROUP_ROWS; ++r)
        for (int j = 0; j < VECS; ++j)
            acc[r][j] = (vecf){0.0f};
    for (int64_t k = 0; k < rank; ++k) {
        vecf row[VECS];
        for (int j = 0; j < VECS; ++j)
            row[j] = load_vecf(bt + k * EXPAND_COLS + j * LANES);
        for (int r = 0; r < GROUP_ROWS; ++r)
            for (int j = 0; j < VECS; ++j)
                acc[r][j] += v[r][k] * row[j];
    }
    for (int r = 0; r < GROUP_ROWS; ++r)
        memcpy(deltas[r], acc[r], sizeof acc[r]);
}

static void expand_1_row(const float *v, const float *bt, int64_t rank, float *delta)
{
    vecf even[VECS], odd[VECS];
    for (int j = 0; j < VECS; ++j)
        even[j] = odd[j] = (vecf){0.0f};
    int64_t k = 0;
    for (; k + 2 <= rank; k += 2)
        for (int j = 0; j < VECS; ++j) {
            even[j] += v[k] * load_vecf(bt + k * EXPAND_COLS + j * LANES);
            odd[j] += v[k + 1] * load_vecf(bt + (k + 1) * EXPAND_COLS + j * LANES);
        }
    if (k < rank)
        for (int j = 0; j < VECS; ++j)
            even[j] += v[k] * load_vecf(bt + k * EXPAND_COLS + j * LANES);
    for (int j = 0; j < VECS; ++j)
        even[j] += odd[j];
    memcpy(delta, even, sizeof even);
}

/* LOAD_AT(p, i): element i of p as fp32; STORE_AT(p, i, v): v rounded into it. TILE_VIA_F32:
 * the expand converts its tiles of b before transposing them. F16C_SPANS: runs of fp16
 * elements are converted eight at a time by F16C's instructions (the same values: the widening
 * is exact, the narrowing rounds to nearest even). */
#define LORA_T f32
#define TILE_VIA_F32 0
#define F16C_SPANS 0
#define LOAD_AT(p, i) load_f32((p)[i])
#define STORE_AT(p, i, v) ((p)[i] = store_f32(v))
#include "lora_cpu.c"
#undef LORA_T
#undef LOAD_AT
#undef STORE_AT
#undef TILE_VIA_F32
#undef F16C_SPANS
#define LORA_T bf16
#define TILE_VIA_F32 0
#define F16C_SPANS 0
#define LOAD_AT(p, i) load_bf16((p)[i])
#define STORE_AT(p, i, v) ((p)[i] = store_bf16(v))
#include "lora_cpu.c"
#undef LORA_T
#undef LOAD_AT
#undef STORE_AT
#undef TILE_VIA_F32
#undef F16C_SPANS
#define LORA_T f16
#define TILE_VIA_F32 1
#ifdef __F16C__
#define F16C_SPANS 1
#else
#define F16C_SPANS 0
#endif
#define LOAD_AT(p, i) half_bits_to_float(((const lora_u16 *)(p))[i])
#define STORE_AT(p, i, v) (((lora_u16 *)(p))[i] = float_to_half_bits(v))
#include "lora_cpu.c"
#undef LORA_T
#undef LOAD_AT
#undef STORE_AT
#undef TILE_VIA_F32
#undef F16C_SPANS

#else /* The kernel for element type LORA_T. */

#define ELEM PS_CAT(LORA_T, _t)
#define FN(name) PS_CAT(name, PS_CAT(_, LORA_T))

/* dst[i] = src[i] as fp32, for i < n. */
static inline void FN(to_f32)(const ELEM *src, float *dst, int64_t n)
{
    int64_t i = 0;
#if F16C_SPANS
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
#pragma omp simd
    for (int64_t j = i; j < n; ++j)
        dst[j] = LOAD_AT(src, j);
}

/* y[i] += delta[i], rounded to y's type, for i < n. */
static inline void FN(add_into)(ELEM *y, const float *delta, int64_t n)
{
    int64_t i = 0;
#if F16C_SPANS
    for (; i + 8 <= n; i += 8) {
        const __m256 sum = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128((__m128i *)(y + i))),
                                         _mm256_loadu_ps(delta + i));
        _mm_storeu_si128((__m128i *)(y + i),
                         _mm256_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
#pragma omp simd
    for (int64_t j = i; j < n; ++j)
        STORE_AT(y, j, LOAD_AT(y, j) + delta[j]);
}

/* Row t of x as fp32: the row itself for fp32 tensors, else converted into buf. */
static inline const float *FN(x_row)(const ELEM *x, float *buf, int64_t in)
{
    if (sizeof(ELEM) == sizeof(float))
        return (const float *)x;
    FN(to_f32)(x, buf, in);
    return buf;
}

/* The shrink of a block of rows (xs, count of them, at most SHRINK_ROWS) against rows
 * [j0, j1) of one adapter's a; results to tmp[out_rows[i] * pr + j]. A full block takes two a
 * rows at a time: eight sums from six loaded vectors. */
static void FN(shrink)(const ELEM *a, const float *const *xs, int64_t count,
                       const int64_t *out_rows, int64_t j0, int64_t j1, int64_t in,
                       float *tmp, int64_t pr)
{
    int64_t j = j0;
    if (count == 4)
        for (; j + 2 <= j1; j += 2) {
            const ELEM *aj = a + j * in, *ak = aj + in;
            const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, t0, t1, t2, t3)
            for (int64_t d = 0; d < in; ++d) {
                const float v = LOAD_AT(aj, d), w = LOAD_AT(ak, d);
                s0 += v * x0[d];
                s1 += v * x1[d];
                s2 += v * x2[d];
                s3 += v * x3[d];
                t0 += w * x0[d];
                t1 += w * x1[d];
                t2 += w * x2[d];
                t3 += w * x3[d];
            }
            tmp[out_rows[0] * pr + j] = s0;
            tmp[out_rows[1] * pr + j] = s1;
            tmp[out_rows[2] * pr + j] = s2;
            tmp[out_rows[3] * pr + j] = s3;
            tmp[out_rows[0] * pr + j + 1] = t0;
            tmp[out_rows[1] * pr + j + 1] = t1;
            tmp[out_rows[2] * pr + j + 1] = t2;
            tmp[out_rows[3] * pr + j + 1] = t3;
        }
    for (; j < j1; ++j) {
        const ELEM *aj = a + j * in;
        int64_t i = 0;
        for (; i + 4 <= count; i += 4) {
            const float *x0 = xs[i], *x1 = xs[i + 1], *x2 = xs[i + 2], *x3 = xs[i + 3];
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t d = 0; d < in; ++d) {
                const float v = LOAD_AT(aj, d);
                s0 += v * x0[d];
                s1 += v * x1[d];
                s2 += v * x2[d];
                s3 += v * x3[d];
            }
            tmp[out_rows[i] * pr + j] = s0;
            tmp[out_rows[i + 1] * pr + j] = s1;
            tmp[out_rows[i + 2] * pr + j] = s2;
            tmp[out_rows[i + 3] * pr + j] = s3;
        }
        for (; i + 2 <= count; i += 2) {
            const float *x0 = xs[i], *x1 = xs[i + 1];
            float s0 = 0.0f, s1 = 0.0f;
#pragma omp simd reduction(+ : s0, s1)
            for (int64_t d = 0; d < in; ++d) {
                const float v = LOAD_AT(aj, d);
                s0 += v * x0[d];
                s1 += v * x1[d];
            }
            tmp[out_rows[i] * pr + j] = s0;
            tmp[out_rows[i + 1] * pr + j] = s1;
        }
        for (; i < count; ++i) {
            const float *x0 = xs[i];
            float s0 = 0.0f;
#pragma omp simd reduction(+ : s0)
            for (int64_t d = 0; d < in; ++d)
                s0 += LOAD_AT(aj, d) * x0[d];
            tmp[out_rows[i] * pr + j] = s0;
        }
    }
}

#if !TILE_VIA_F32
/* A tile of count (at most EXPAND_COLS) rows of b, rank apart, transposed into bt in fp32
 * ([rank][EXPAND_COLS], zeros beyond count). Inlined with a constant rank, the compiler
 * transposes whole tiles with vector permutations. */
static inline __attribute__((always_inline)) void FN(transpose_rank)(const ELEM *restrict rows,
                                                                     float *restrict bt,
                                                                     const int64_t rank)
{
    for (int64_t c = 0; c < EXPAND_COLS; ++c)
        for (int64_t k = 0; k < rank; ++k)
            bt[k * EXPAND_COLS + c] = LOAD_AT(rows, c * rank + k);
}

static void FN(transpose_tile)(const ELEM *restrict rows, int64_t count, int64_t rank,
                               float *restrict bt)
{
    if (count == EXPAND_COLS && rank == 8)
        FN(transpose_rank)(rows, bt, 8);
    else if (count == EXPAND_COLS && rank == 16)
        FN(transpose_rank)(rows, bt, 16);
    else if (count == EXPAND_COLS && rank == 32)
        FN(transpose_rank)(rows, bt, 32);
    else if (count == EXPAND_COLS && rank == 64)
        FN(transpose_rank)(rows, bt, 64);
    else
        for (int64_t c = 0; c < EXPAND_COLS; ++c)
            for (int64_t k = 0; k < rank; ++k)
                bt[k * EXPAND_COLS + c] = c < count ? LOAD_AT(rows, c * rank + k) : 0.0f;
}
#endif

/* The expand of a block of rows (out_rows, count of them) over one column tile: bt is scratch
 * for the tile of b transposed. */
static void FN(expand)(const ELEM *b, const col_tile *tile, int64_t rank, const float *tmp,
                       int64_t pr, const int64_t *out_rows, int64_t count, ELEM *y,
                       int64_t y_stride, float *bt)
{
    b += tile->col * rank;
#if TILE_VIA_F32
    /* The tile's rows of b are contiguous: converted in one pass (after bt in the scratch), then
     * transposed as fp32 (the conversion spoils the transpose's permutations). */
    float *converted = bt + rank * EXPAND_COLS;
    FN(to_f32)(b, converted, tile->count * rank);
    transpose_tile_f32(converted, tile->count, rank, bt);
#else
    FN(transpose_tile)(b, tile->count, rank, bt);
#endif
    for (int64_t i = 0; i < count; i += GROUP_ROWS) {
        const int64_t n = count - i < GROUP_ROWS ? count - i : GROUP_ROWS;
        const float *v[GROUP_ROWS];
        for (int64_t r = 0; r < n; ++r)
            v[r] = tmp + out_rows[i + r] * pr + tile->part * rank;
        float deltas[GROUP_ROWS][EXPAND_COLS];
        if (n == GROUP_ROWS && n > 1)
            expand_group(v, bt, rank, deltas);
        else
            for (int64_t r = 0; r < n; ++r)
                expand_1_row(v[r], bt, rank, deltas[r]);
        for (int64_t r = 0; r < n; ++r)
            FN(add_into)(y + out_rows[i + r] * y_stride + tile->col, deltas[r], tile->count);
    }
}

int FN(add_lora)(ELEM *y, int64_t y_stride, const ELEM *x, int64_t x_stride, const ELEM *a,
                 const ELEM *b, const int64_t *slots, int64_t num_slots, int64_t rows,
                 int64_t in, int64_t out, int64_t rank, const int64_t *widths, int64_t parts,
                 int num_threads)
{
    const int64_t pr = parts * rank;
    lora_plan plan;
    const int status = make_plan(slots, rows, num_slots, widths, parts, &plan);
    if (status != 0)
        return status;
    if (plan.active == 0 || rank == 0 || out == 0) {
        free(plan.order);
        return 0;
    }
    const int64_t work = plan.active * (pr * in + out * rank);
    const int threads = work >= PARALLEL_WORK && num_threads > 1 ? num_threads : 1;
    /* The shrink's a rows in chunks, enough items to share among the threads when the rows are
     * few (at least 8 a rows per chunk: converted x rows serve them all). */
    int64_t chunks = threads == 1 ? 1 : (4 * (int64_t)threads + plan.num_shrink - 1) /
                                            plan.num_shrink;
    const int64_t max_chunks = (pr + 7) / 8;
    chunks = chunks < 1 ? 1 : chunks > max_chunks ? max_chunks : chunks;
    const int64_t chunk = (pr + chunks - 1) / chunks;
    chunks = (pr + chunk - 1) / chunk;

    /* tmp, then each thread's scratch: converted x rows, or a transposed tile of b (and the
     * tile converted). */
    const int64_t x_scratch = sizeof(ELEM) == sizeof(float) ? 0 : SHRINK_ROWS * in;
    const int64_t b_scratch = (TILE_VIA_F32 ? 2 : 1) * rank * EXPAND_COLS;
    const int64_t per_thread = x_scratch > b_scratch ? x_scratch : b_scratch;
    float *tmp = malloc(((size_t)rows * (size_t)pr + (size_t)threads * (size_t)per_thread) *
                        sizeof(float));
    if (tmp == NULL) {
        free(plan.order);
        return 1;
    }
    float *scratch = tmp + rows * pr;

#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *mine = scratch + omp_get_thread_num() * per_thread;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < plan.num_shrink * chunks; ++item) {
            const row_block *blk = plan.shrink_blocks + item / chunks;
            const int64_t j0 = item % chunks * chunk;
            const int64_t j1 = j0 + chunk < pr ? j0 + chunk : pr;
            const int64_t *block_rows = plan.order + blk->first;
            const float *xs[SHRINK_ROWS];
            for (int64_t i = 0; i < blk->count; ++i)
                xs[i] = FN(x_row)(x + block_rows[i] * x_stride, mine + i * in, in);
            FN(shrink)(a + blk->slot * pr * in, xs, blk->count, block_rows, j0, j1, in, tmp,
                       pr);
        }
        /* The implicit barrier: every shrunk vector is complete. */
#pragma omp for schedule(static)
        for (int64_t item = 0; item < plan.num_expand * plan.num_tiles; ++item) {
            const row_block *blk = plan.expand_blocks + item / plan.num_tiles;
            FN(expand)(b + blk->slot * out * rank, plan.tiles + item % plan.num_tiles, rank, tmp,
                       pr, plan.order + blk->first, blk->count, y, y_stride, mine);
        }
    }
    free(tmp);
    free(plan.order);
    return 0;
}

#undef ELEM
#undef FN

#endif
