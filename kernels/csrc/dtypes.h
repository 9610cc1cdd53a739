/* The element types the CPU kernels take, each with its load (to fp32) and store (from fp32,
 * rounding to nearest even as torch does). Kernels compute in fp32 and round where the torch
 * reference rounds: ROUND_<T>(v) is v as the tensor dtype would hold it. */
#ifndef PAGEDSERVE_DTYPES_H
#define PAGEDSERVE_DTYPES_H

#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef uint16_t bf16_t;
typedef _Float16 f16_t;
typedef float f32_t;

static inline float load_f32(f32_t v) { return v; }
static inline f32_t store_f32(float v) { return v; }

static inline float load_bf16(bf16_t v)
{
    const uint32_t bits = (uint32_t)v << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static inline bf16_t store_bf16(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) /* NaN stays NaN (quiet) */
        return (bf16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16_t)(bits >> 16);
}

static inline float load_f16(f16_t v) { return (float)v; }
static inline f16_t store_f16(float v) { return (f16_t)v; }

/* n elements of a row as fp32, for kernels that read a row more than once (attention reads a
 * key row once per query head of its group): fp32 rows are read in place, 16-bit rows converted
 * into buf once. GCC does not vectorise _Float16 conversions in loops, so fp16 rows go through
 * the F16C / AVX-512 conversions where the CPU has them. */
/* Whether row_T reads in place (fp32) rather than converting into its buffer. */
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

#define PS_CAT_(a, b) a##b
#define PS_CAT(a, b) PS_CAT_(a, b)

#endif
