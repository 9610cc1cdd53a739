/* Matrix products with weights in llama.cpp's block formats, for CPUs: the GGUF file's own bytes
 * are the operand, and the activations are quantized to 8 bits per block as llama.cpp does, so
 * the inner products run on 8-bit integers (AVX2's maddubs: 32 products per instruction) and
 * the weights are read in 4.5 to 8.5 bits each instead of 32.
 *
 *   Q4_1 block of 32 weights: fp16 d, fp16 m, 16 bytes of 4-bit codes q (weight j in the low
 *        nibble of byte j, weight j + 16 in its high nibble): w = d * q + m.
 *   Q8_0 block of 32 weights: fp16 d, 32 int8 codes q: w = d * q.
 *   Q8 activations, a block of 32 values: fp32 d = max|x| / 127, int8 q = round(x / d), the
 *        integer sum(q) and s = d * sum(q): x ~ d * q. A Q4_1 weight's offset m multiplies s;
 *        a packed Q8_0 weight's codes, stored plus 128, need 128 * sum(q) taken off their sums.
 *
 *   quantize_rows_q8   x fp32 [rows, k] (rows x_stride apart) -> Q8 blocks [rows, k / 32].
 *   matmul_q4_1 / matmul_q8_0 / matmul_q4_1x8 / matmul_q8_0x8
 *                      y[r, n] = sum over blocks b of row r of x and row n of w:
 *                        Q4_1: d_w d_x sum(q_w q_x) + m_w s_x;  Q8_0: d_w d_x sum(q_w q_x)
 *                      y fp32 [rows, n], rows y_stride apart.
 *   matmul_q4_1x8      the Q4_1 product with the weight's rows repacked eight at a time
 *                      (kernels/block_quant.py packs them): per block of 32 inputs, the eight
 *                      rows' fp16 d, their fp16 m, then the codes as four 32-byte vectors whose
 *                      byte 4c + t holds, in its low nibble, row c's code at input 4j + t of the
 *                      block (j the vector) and, in its high nibble, the code at 16 + 4j + t.
 *                      Against one broadcast group of 4 activation codes, one maddubs then
 *                      sums 4 products for each of the 8 rows, lane by lane: the eight outputs
 *                      come out in one vector, with no horizontal sums and no scalar
 *                      conversions, where the plain layout spends most of its instructions.
 *                      Each output: acc = fma(d_w d_x, sum(q_w q_x), acc), off = fma(m_w, s_x,
 *                      off) over the blocks in order, then acc + off.
 *   matmul_q8_0x8      the Q8_0 product, rows repacked eight at a time the same way: per block,
 *                      the eight rows' fp16 d, then the codes as eight 32-byte vectors whose
 *                      byte 4c + t holds row c's code at input 4j + t (j the vector), plus 128
 *                      (stored unsigned, as the VNNI instruction wants its first operand).
 *                      Each output: acc = fma(d_w d_x, sum(q_w q_x), acc) over the blocks.
 *
 * Where the host has VNNI (AVX-512 VNNI with VL, or AVX-VNNI), one dpbusd sums four products
 * for each of eight rows straight into 32-bit lanes: the packed kernels' integer sums take one
 * instruction per 32 products where AVX2 takes two or three. The integer sums are exact either
 * way, so both give the same results.
 *
 * Each output is one fixed sequence of operations over its two rows, whatever the number of
 * rows in the call, so a sequence's results do not depend on what it is batched with. Output
 * columns are split over OpenMP threads; each weight row is read once for up to TILE rows of x.
 * The packed kernels take x in chunks of CHUNK rows, every group of weight rows for each chunk,
 * so that a long prompt's rows stay in cache while the weight streams past them.
 * Without AVX2 the same sums run as scalar loops (integer sums are exact either way; the fp32
 * accumulation order differs).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "dtypes.h"
#include "parallel.h"

#define QK 32
#define TILE 4
#define CHUNK 256

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define HAVE_VNNI 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

typedef struct { uint16_t d, m; uint8_t qs[QK / 2]; } block_q4_1;
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;
typedef struct { float d, s; int32_t sum; int8_t qs[QK]; } block_q8;
_Static_assert(sizeof(block_q8) == 44, "kernels/cpu.py and decode_layers_cpu.c size it");

_Static_assert(sizeof(block_q4_1) == 20, "GGUF's Q4_1 block is 20 bytes");
_Static_assert(sizeof(block_q8_0) == 34, "GGUF's Q8_0 block is 34 bytes");

typedef struct { uint16_t d[8], m[8]; uint8_t qs[128]; } block_q4_1x8;
_Static_assert(sizeof(block_q4_1x8) == 160, "eight Q4_1 blocks take 160 bytes repacked");
typedef struct { uint16_t d[8]; uint8_t qs[256]; } block_q8_0x8;
_Static_assert(sizeof(block_q8_0x8) == 272, "eight Q8_0 blocks take 272 bytes repacked");

static inline float half_to_float(uint16_t h)
{
    f16_t v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static void quantize_row_q8(const float *x, block_q8 *y, int64_t blocks)
{
#ifdef __AVX2__
    /* The scalar loop below, eight values at a time: the same products, the same rounding
     * (to nearest even), so the same codes. */
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t b = 0; b < blocks; b++) {
        const float *v = x + b * QK;
        __m256 part[4];
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            part[i] = _mm256_loadu_ps(v + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, part[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float top = _mm_cvtss_f32(m4);
        const __m256 id = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
        __m256i q[4];
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(part[i], id),
                                                      _MM_FROUND_TO_NEAREST_INT |
                                                      _MM_FROUND_NO_EXC));
        const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                               _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32),
                                   _mm256_extracti128_si256(sum32, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        /* Packing interleaves the 128-bit lanes; the permute puts the 32 codes back in order. */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                                 _mm256_packs_epi32(q[2], q[3]));
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        _mm256_storeu_si256((__m256i *)y[b].qs, _mm256_permutevar8x32_epi32(bytes, order));
        y[b].d = top / 127.f;
        y[b].sum = _mm_cvtsi128_si32(s4);
        y[b].s = y[b].d * (float)y[b].sum;
    }
#else
    for (int64_t b = 0; b < blocks; b++) {
        const float *v = x + b * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++)
            amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const int q = (int)nearbyintf(v[j] * id);
            y[b].qs[j] = (int8_t)q;
            sum += q;
        }
        y[b].d = d;
        y[b].sum = sum;
        y[b].s = d * (float)sum;
    }
#endif
}

void quantize_rows_q8(const float *x, int64_t x_stride, block_q8 *y, int64_t rows, int64_t k,
                      int num_threads)
{
    const int64_t blocks = k / QK;
#pragma omp parallel for num_threads(threads_for(rows * k * ELEMENT_WORK, num_threads))      \
    schedule(static)
    for (int64_t r = 0; r < rows; r++)
        quantize_row_q8(x + r * x_stride, y + r * blocks, blocks);
}

#ifdef __AVX2__
static inline __m256i unpack_q4(const uint8_t *qs)
{
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* 8 partial sums of u[j] * s[j] over 32 bytes: u unsigned (at most 127 here), s signed. */
static inline __m256 products(__m256i u, __m256i s)
{
    const __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

static inline float sum8(__m256 a)
{
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

/* out[r] = row w . row r of x, for r < count (x's rows `blocks` apart). */
static void dot_q4_1(const block_q4_1 *w, const block_q8 *x, int64_t blocks, int count,
                     float *out)
{
#ifdef __AVX2__
    __m256 acc[TILE];
    float offset[TILE];
    for (int r = 0; r < count; r++) {
        acc[r] = _mm256_setzero_ps();
        offset[r] = 0.f;
    }
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i q = unpack_q4(w[b].qs);
        const float d = half_to_float(w[b].d), m = half_to_float(w[b].m);
        for (int r = 0; r < count; r++) {
            const block_q8 *xb = x + r * blocks + b;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)xb->qs);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), products(q, xq), acc[r]);
            offset[r] += m * xb->s;
        }
    }
    for (int r = 0; r < count; r++)
        out[r] = sum8(acc[r]) + offset[r];
#else
    for (int r = 0; r < count; r++) {
        float sum = 0.f;
        for (int64_t b = 0; b < blocks; b++) {
            const block_q8 *xb = x + r * blocks + b;
            int isum = 0;
            for (int j = 0; j < QK / 2; j++)
                isum += (w[b].qs[j] & 0x0F) * xb->qs[j] + (w[b].qs[j] >> 4) * xb->qs[j + QK / 2];
            sum += half_to_float(w[b].d) * xb->d * (float)isum + half_to_float(w[b].m) * xb->s;
        }
        out[r] = sum;
    }
#endif
}

static void dot_q8_0(const block_q8_0 *w, const block_q8 *x, int64_t blocks, int count,
                     float *out)
{
#ifdef __AVX2__
    __m256 acc[TILE];
    for (int r = 0; r < count; r++)
        acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)w[b].qs);
        const __m256i magnitude = _mm256_sign_epi8(q, q);
        const float d = half_to_float(w[b].d);
        for (int r = 0; r < count; r++) {
            const block_q8 *xb = x + r * blocks + b;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)xb->qs);
            /* q_w q_x = |q_w| (sign(q_w) q_x): maddubs wants its first operand unsigned. */
            const __m256 p = products(magnitude, _mm256_sign_epi8(xq, q));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), p, acc[r]);
        }
    }
    for (int r = 0; r < count; r++)
        out[r] = sum8(acc[r]);
#else
    for (int r = 0; r < count; r++) {
        float sum = 0.f;
        for (int64_t b = 0; b < blocks; b++) {
            const block_q8 *xb = x + r * blocks + b;
            int isum = 0;
            for (int j = 0; j < QK; j++)
                isum += w[b].qs[j] * xb->qs[j];
            sum += half_to_float(w[b].d) * xb->d * (float)isum;
        }
        out[r] = sum;
    }
#endif
}

#ifdef __AVX2__
/* A single row of x against COLS weight rows at once: the same operations per output as
 * dot_q4_1 with one row (so the same results), interleaved over the columns, whose independent
 * accumulators keep the FMA units busy where one column's chain would wait. (Q8_0, bound by
 * memory at the vocabulary's width, ran slower so.) */
#define COLS 4

static void dot_q4_1_cols(const block_q4_1 *w, int64_t w_stride, const block_q8 *x,
                          int64_t blocks, float *out)
{
    __m256 acc[COLS];
    float offset[COLS];
    for (int c = 0; c < COLS; c++) {
        acc[c] = _mm256_setzero_ps();
        offset[c] = 0.f;
    }
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i xq = _mm256_loadu_si256((const __m256i *)x[b].qs);
        for (int c = 0; c < COLS; c++) {
            const block_q4_1 *wb = w + c * w_stride + b;
            const float d = half_to_float(wb->d), m = half_to_float(wb->m);
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[b].d), products(unpack_q4(wb->qs), xq),
                                     acc[c]);
            offset[c] += m * x[b].s;
        }
    }
    for (int c = 0; c < COLS; c++)
        out[c] = sum8(acc[c]) + offset[c];
}

/* One row of x: columns COLS at a time, the remainder one by one. */
#define SINGLE_ROW(DOT)                                                                        \
    if (rows == 1) {                                                                           \
        const int64_t groups = n / COLS;                                                       \
        const int threads = threads_for(n * k, num_threads);                                   \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                      \
        for (int64_t g = 0; g < groups; g++)                                                   \
            PS_CAT(DOT, _cols)(w + g * COLS * blocks, blocks, x, blocks, y + g * COLS);        \
        for (int64_t col = groups * COLS; col < n; col++)                                      \
            DOT(w + col * blocks, x, blocks, 1, y + col);                                      \
        return;                                                                                \
    }
#else
#define SINGLE_ROW(DOT)
#endif
#define ROWS_TOGETHER(DOT)

#define DEFINE_MATMUL(NAME, BLOCK, DOT, ONE_ROW)                                               \
    void NAME(const block_q8 *x, int64_t rows, const BLOCK *w, int64_t n, int64_t k, float *y,  \
              int64_t y_stride, int num_threads)                                               \
    {                                                                                          \
        const int64_t blocks = k / QK;                                                         \
        ONE_ROW(DOT)                                                                           \
        const int threads = threads_for(rows * n * k, num_threads);                            \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                      \
        for (int64_t col = 0; col < n; col++) {                                                \
            float out[TILE];                                                                   \
            for (int64_t r = 0; r < rows; r += TILE) {                                         \
                const int count = rows - r < TILE ? (int)(rows - r) : TILE;                    \
                DOT(w + col * blocks, x + r * blocks, blocks, count, out);                     \
                for (int i = 0; i < count; i++)                                                \
                    y[(r + i) * y_stride + col] = out[i];                                      \
            }                                                                                  \
        }                                                                                      \
    }

DEFINE_MATMUL(matmul_q4_1, block_q4_1, dot_q4_1, SINGLE_ROW)
DEFINE_MATMUL(matmul_q8_0, block_q8_0, dot_q8_0, ROWS_TOGETHER)

#ifdef __AVX2__
static inline __m256i broadcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
}

#ifdef HAVE_VNNI
/* The integer sums of one block of x (`xq`, 32 codes) against eight repacked rows whose codes
 * for input 4j + t of the block lie, unsigned, in byte 4c + t of q[j] (row c): each lane the
 * sum for its row, starting from `init`. */
static inline __m256i row_sums_unsigned(const __m256i q[8], const int8_t *xq, __m256i init)
{
    /* Two chains, so that each dpbusd need not wait for the one before (the sums are exact
     * integers: their order does not matter). */
    __m256i other = _mm256_setzero_si256();
    for (int j = 0; j < 8; j += 2) {
        init = DPBUSD(init, q[j], broadcast4(xq + 4 * j));
        other = DPBUSD(other, q[j + 1], broadcast4(xq + 4 * j + 4));
    }
    return _mm256_add_epi32(init, other);
}
#endif
#endif

/* Pins v to a register here: GCC would otherwise regroup the exact integer sums, computing
 * every product of a block first and spilling them. */
#define IN_REGISTER(v) __asm__("" : "+x"(v))

/* The 8 outputs of one group of repacked rows for `count` rows of x (rows `blocks` apart).
 * Inlined for each constant count (dispatch_rows), so that the accumulators live in registers. */
static inline __attribute__((always_inline)) void
dot_q4_1x8_rows(const block_q4_1x8 *w, const block_q8 *x, int64_t blocks, const int count,
                float *out, int64_t out_stride)
{
#if defined(__AVX2__) && !defined(HAVE_VNNI)
    /* AVX2 has sixteen vector registers: eight unpacked code vectors beside TILE rows'
     * accumulators and offsets do not fit, and the spills cost much of the time. So each code
     * vector is unpacked and used by every row at once, the rows' 16-bit sums kept across the
     * block, and the offsets are summed in a pass of their own. The integer sums are exact and
     * every float operation of an output is the VNNI build's (below), in the same order. */
    __m256 acc[TILE];
    for (int r = 0; r < count; r++)
        acc[r] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < blocks; b++) {
        /* Each 16-bit lane sums 8 pairs of products of q_w <= 15 and |q_x| <= 127 at most:
         * 30480, inside int16. */
        __m256i pairs[TILE];
        for (int r = 0; r < count; r++)
            pairs[r] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w[b].qs + 32 * j));
            const __m256i lo = _mm256_and_si256(v, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int r = 0; r < count; r++) {
                const int8_t *xq = x[r * blocks + b].qs;
                const __m256i both =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(xq + 4 * j)),
                                     _mm256_maddubs_epi16(hi, broadcast4(xq + 16 + 4 * j)));
                pairs[r] = _mm256_add_epi16(pairs[r], both);
                IN_REGISTER(pairs[r]);
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w[b].d));
        for (int r = 0; r < count; r++) {
            const block_q8 *xb = x + r * blocks + b;
            const __m256 sums =
                _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[r], _mm256_set1_epi16(1)));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb->d)), sums, acc[r]);
        }
    }
    /* The rows' offsets together: each sum is a chain of dependent FMAs. */
    __m256 off[TILE];
    for (int r = 0; r < count; r++)
        off[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w[b].m));
        for (int r = 0; r < count; r++)
            off[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[r * blocks + b].s), off[r]);
    }
    for (int r = 0; r < count; r++)
        _mm256_storeu_ps(out + r * out_stride, _mm256_add_ps(acc[r], off[r]));
#elif defined(__AVX2__)
    __m256 acc[TILE], off[TILE];
    for (int r = 0; r < count; r++) {
        acc[r] = _mm256_setzero_ps();
        off[r] = _mm256_setzero_ps();
    }
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < blocks; b++) {
        __m256i q[8];
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w[b].qs + 32 * j));
            q[j] = _mm256_and_si256(v, low);
            q[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w[b].d));
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w[b].m));
        for (int r = 0; r < count; r++) {
            const block_q8 *xb = x + r * blocks + b;
            const __m256 sums = _mm256_cvtepi32_ps(row_sums_unsigned(q, xb->qs,
                                                                     _mm256_setzero_si256()));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb->d)), sums, acc[r]);
            off[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xb->s), off[r]);
        }
    }
    for (int r = 0; r < count; r++)
        _mm256_storeu_ps(out + r * out_stride, _mm256_add_ps(acc[r], off[r]));
#else
    for (int r = 0; r < count; r++)
        for (int c = 0; c < 8; c++) {
            float acc = 0.f, off = 0.f;
            for (int64_t b = 0; b < blocks; b++) {
                const block_q8 *xb = x + r * blocks + b;
                int isum = 0;
                for (int j = 0; j < 4; j++)
                    for (int t = 0; t < 4; t++) {
                        const uint8_t byte = w[b].qs[32 * j + 4 * c + t];
                        isum += (byte & 0x0F) * xb->qs[4 * j + t] +
                                (byte >> 4) * xb->qs[16 + 4 * j + t];
                    }
                acc += half_to_float(w[b].d[c]) * xb->d * (float)isum;
                off += half_to_float(w[b].m[c]) * xb->s;
            }
            out[r * out_stride + c] = acc + off;
        }
#endif
}

/* The same for a group of repacked Q8_0 rows (codes stored plus 128). */
static inline __attribute__((always_inline)) void
dot_q8_0x8_rows(const block_q8_0x8 *w, const block_q8 *x, int64_t blocks, const int count,
                float *out, int64_t out_stride)
{
#if defined(__AVX2__) && !defined(HAVE_VNNI)
    /* As dot_q4_1x8_rows without VNNI: each code vector serves every row at once, so that the
     * rows' integer sums, not eight code vectors and their magnitudes, stay in registers. The
     * signed codes, and q_w q_x = |q_w| (sign(q_w) q_x), as maddubs wants its first operand
     * unsigned and its pairs inside int16. */
    __m256 acc[TILE];
    for (int r = 0; r < count; r++)
        acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i isum[TILE];
        for (int r = 0; r < count; r++)
            isum[r] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256i stored = _mm256_loadu_si256((const __m256i *)(w[b].qs + 32 * j));
            const __m256i q = _mm256_xor_si256(stored, _mm256_set1_epi8((char)0x80));
            const __m256i magnitude = _mm256_sign_epi8(q, q);
            for (int r = 0; r < count; r++) {
                const __m256i pairs = _mm256_maddubs_epi16(
                    magnitude, _mm256_sign_epi8(broadcast4(x[r * blocks + b].qs + 4 * j), q));
                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
                IN_REGISTER(isum[r]);
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w[b].d));
        for (int r = 0; r < count; r++) {
            const block_q8 *xb = x + r * blocks + b;
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb->d)),
                                     _mm256_cvtepi32_ps(isum[r]), acc[r]);
        }
    }
    for (int r = 0; r < count; r++)
        _mm256_storeu_ps(out + r * out_stride, acc[r]);
#elif defined(__AVX2__)
    __m256 acc[TILE];
    for (int r = 0; r < count; r++)
        acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i q[8];
        for (int j = 0; j < 8; j++)
            q[j] = _mm256_loadu_si256((const __m256i *)(w[b].qs + 32 * j));
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w[b].d));
        for (int r = 0; r < count; r++) {
            const block_q8 *xb = x + r * blocks + b;
            /* sum((q_w + 128) q_x) - 128 sum(q_x) */
            const __m256i isum = row_sums_unsigned(q, xb->qs, _mm256_set1_epi32(-128 * xb->sum));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb->d)),
                                     _mm256_cvtepi32_ps(isum), acc[r]);
        }
    }
    for (int r = 0; r < count; r++)
        _mm256_storeu_ps(out + r * out_stride, acc[r]);
#else
    for (int r = 0; r < count; r++)
        for (int c = 0; c < 8; c++) {
            float acc = 0.f;
            for (int64_t b = 0; b < blocks; b++) {
                const block_q8 *xb = x + r * blocks + b;
                int isum = 0;
                for (int j = 0; j < 8; j++)
                    for (int t = 0; t < 4; t++)
                        isum += ((int)w[b].qs[32 * j + 4 * c + t] - 128) * xb->qs[4 * j + t];
                acc += half_to_float(w[b].d[c]) * xb->d * (float)isum;
            }
            out[r * out_stride + c] = acc;
        }
#endif
}

_Static_assert(TILE == 4, "dispatch_rows has a case for each count up to TILE");
#define DISPATCH_ROWS(NAME, BLOCK)                                                             \
    static void NAME(const BLOCK *w, const block_q8 *x, int64_t blocks, int count, float *out, \
                     int64_t out_stride)                                                       \
    {                                                                                          \
        switch (count) {                                                                       \
        case 1: PS_CAT(NAME, _rows)(w, x, blocks, 1, out, out_stride); break;                  \
        case 2: PS_CAT(NAME, _rows)(w, x, blocks, 2, out, out_stride); break;                  \
        case 3: PS_CAT(NAME, _rows)(w, x, blocks, 3, out, out_stride); break;                  \
        default: PS_CAT(NAME, _rows)(w, x, blocks, 4, out, out_stride); break;                 \
        }                                                                                      \
    }

DISPATCH_ROWS(dot_q4_1x8, block_q4_1x8)
DISPATCH_ROWS(dot_q8_0x8, block_q8_0x8)

/* A packed product: chunks of CHUNK rows of x, every group of eight weight rows for each
 * (the (chunk, group) pairs split over the threads), TILE rows of x at a time. */
#define DEFINE_PACKED_MATMUL(NAME, BLOCK, DOT)                                                 \
    void NAME(const block_q8 *x, int64_t rows, const BLOCK *w, int64_t n, int64_t k, float *y,  \
              int64_t y_stride, int num_threads)                                               \
    {                                                                                          \
        const int64_t blocks = k / QK, groups = n / 8, chunks = (rows + CHUNK - 1) / CHUNK;     \
        const int threads = threads_for(rows * n * k, num_threads);                            \
        _Pragma("omp parallel for collapse(2) num_threads(threads) schedule(static)")          \
        for (int64_t c = 0; c < chunks; c++)                                                   \
            for (int64_t g = 0; g < groups; g++) {                                             \
                const int64_t end = rows < (c + 1) * CHUNK ? rows : (c + 1) * CHUNK;           \
                for (int64_t r = c * CHUNK; r < end; r += TILE) {                              \
                    const int count = end - r < TILE ? (int)(end - r) : TILE;                  \
                    DOT(w + g * blocks, x + r * blocks, blocks, count,                         \
                        y + r * y_stride + 8 * g, y_stride);                                   \
                }                                                                              \
            }                                                                                  \
    }

DEFINE_PACKED_MATMUL(matmul_q4_1x8, block_q4_1x8, dot_q4_1x8)
DEFINE_PACKED_MATMUL(matmul_q8_0x8, block_q8_0x8, dot_q8_0x8)
