/* The element types the CPU kernels take, each with its load (to fp32) and store (from fp32,
 * rounding to nearest even as torch does). Kernels compute in fp32 and round where the torch
 * reference rounds: ROUND_<T>(v) is v as the tensor dtype would hold it. */
#ifndef PAGEDSERVE_DTYPES_H
#define PAGEDSERVE_DTYPES_H

#include <stdint.h>
#include <string.h>

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

#define PS_CAT_(a, b) a##b
#define PS_CAT(a, b) PS_CAT_(a, b)

#endif
