/* The SwiGLU activation of the block-quantized paths: act[r, i] = silu(g + b_gate[i]) * (u + b_up[i])
 * for rows gate_up [rows, 2 * width] holding the gate products g, then the up products u. Both the
 * fused decode layers (decode_layers_cpu.c) and the per-operation path
 * (kernels/block_quant.py silu_gated) call it, so both compute the activation alike.
 *
 * Compiled with fast math (kernels/cpu.py), so that expf vectorizes through glibc's libmvec: a
 * scalar expf per element showed in a batched step's profile (docs/benchmarks.md).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "parallel.h"

void silu_mul(const float *gate_up, int64_t rows, int64_t width, const float *gate_bias,
              const float *up_bias, float *out, int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * width * ELEMENT_WORK, num_threads))   \
    schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = gate_up + r * 2 * width, *u = g + width;
        float *o = out + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
            const float a = gate_bias != NULL ? g[i] + gate_bias[i] : g[i];
            const float b = up_bias != NULL ? u[i] + up_bias[i] : u[i];
            o[i] = a / (1.0f + expf(-a)) * b;
        }
    }
}
