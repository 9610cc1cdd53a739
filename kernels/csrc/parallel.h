/* How many threads a parallel region gets. Forking and joining a team costs microseconds on a
 * quiet machine and far more where the threads must be woken or share their cores with the
 * server's own threads (a small VM): a decode step at one or a few rows runs hundreds of regions
 * of a few microseconds' work each, and there a second thread made the step slower, not faster.
 * So a region whose work is below MIN_PARALLEL_WORK runs on the calling thread alone.
 *
 * Work is counted in multiply-adds; elementwise kernels count ELEMENT_WORK per element, about
 * what one element costs them next to a multiply-add of the products. */
#ifndef PAGEDSERVE_PARALLEL_H
#define PAGEDSERVE_PARALLEL_H

#include <stdint.h>

#define MIN_PARALLEL_WORK ((int64_t)1 << 21)
#define ELEMENT_WORK 16

static inline int threads_for(int64_t work, int num_threads)
{
    return work < MIN_PARALLEL_WORK ? 1 : num_threads;
}

#endif
