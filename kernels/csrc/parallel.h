/* How many threads a parallel region gets. Forking and joining a team costs microseconds on a
 * quiet machine and far more where the threads must be woken or share their cores with the
 * server's own threads (a small VM): a decode step at one or a few rows runs hundreds of regions
 * of a few microseconds' work each, and there a second thread made the step slower, not faster
 * (docs/benchmarks.md). So each thread of a region gets at least MIN_WORK_PER_THREAD, and a
 * region with less runs on the calling thread alone. (The fused decode layers sidestep the
 * question: a step is one region whose team meets at spinning barriers, decode_layers_cpu.c.)
 *
 * Work is counted in multiply-adds; elementwise kernels count ELEMENT_WORK per element, about
 * what one element costs them next to a multiply-add of the products. */
#ifndef PAGEDSERVE_PARALLEL_H
#define PAGEDSERVE_PARALLEL_H

#include <stdint.h>

#define MIN_WORK_PER_THREAD ((int64_t)1 << 20)
#define ELEMENT_WORK 16

static inline int threads_for(int64_t work, int num_threads)
{
    const int64_t most = work / MIN_WORK_PER_THREAD;
    return most < 1 ? 1 : most < num_threads ? (int)most : num_threads;
}

#endif
