/* Paged decode attention for CPUs, in fp32, bf16 or fp16 (computed in fp32): each query token
 * attends over its sequence's keys and values where they lie in the paged cache, without
 * gathering them into a contiguous copy first.
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
 * paged_attention_impl.h, compiled once per element type.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "dtypes.h"
#include "parallel.h"

#define T f32
#include "paged_attention_impl.h"
#undef T
#define T bf16
#include "paged_attention_impl.h"
#undef T
#define T f16
#include "paged_attention_impl.h"
#undef T
