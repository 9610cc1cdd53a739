/* The sampler's two reductions over each row of logits, in one call: the index of the row's
 * largest value (the first among equals, as torch.argmax) and its log-normalizer
 * log(sum(exp(x))) (torch.logsumexp), from which every sampled token's logprob follows.
 *
 * torch makes these five passes over the row (max, subtract, exp, sum, log, and the argmax
 * apart) and each a parallel region of its own: at one or a few rows a decode step spent more
 * in them, and in waking threads for them, than in the output projection that made the logits
 * (docs/benchmarks.md). Here: two passes (the maximum and its first index, then the sum of
 * exponentials), rows split over threads only when they are worth it (parallel.h).
 *
 * Compiled with fast math for glibc's vectorised expf (libmvec: without fast math glibc declares
 * no vector variants). Masked logits are -inf (min_tokens, grammars): no constant here is
 * infinite, so nothing is folded on the finite-math assumption, and libmvec's expf(-inf) is 0
 * at run time (tests/test_sampling.py masks tokens). */
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "parallel.h"

void argmax_logsumexp(const float *x, int64_t stride, int64_t rows, int64_t vocab,
                      int64_t *argmax, float *lse, int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * vocab * ELEMENT_WORK, num_threads))   \
    schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * stride;
        float top = -FLT_MAX;
#pragma omp simd reduction(max : top)
        for (int64_t i = 0; i < vocab; ++i)
            top = row[i] > top ? row[i] : top;
        int64_t first = 0;
        while (first < vocab - 1 && row[first] != top)
            ++first;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < vocab; ++i)
            sum += expf(row[i] - top);
        argmax[r] = first;
        lse[r] = top + logf(sum);
    }
}
