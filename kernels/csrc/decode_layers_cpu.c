/* A decode step's decoder layers in one call, for Llama-family models whose projections are
 * block-quantized (block_quant_cpu.c), in fp32, over a KV cache of fp32, bf16 or fp16.
 *
 * At one or a few tokens a step, the work of a layer is small and the host's share of it large:
 * from Python each layer is a dozen calls (two norms, four or five products, each quantizing its
 * input, the rotary write, the attention, the activation), each with its checks and allocations.
 * decode_layers_q runs every layer of the step here, calling the same kernels in the same order
 * as the model's per-operation path (backend/model/llama.py), so its results are bit for bit
 * those of that path:
 *
 *   x = add_rms_norm(h += delta)                      input norm (no delta before layer 0)
 *   qkv = x W_qkv^T (+ b_qkv); rotary_write_kv(qkv)   q and k rotated in place, k and v stored
 *   attn = paged_decode_attention(q)                  one query token per sequence
 *   out = attn W_o^T (+ b_o); x = add_rms_norm(h += out)
 *   act = silu_mul(x W_gate_up^T, b_gate, b_up)       gate and up rows fused in one weight
 *   delta = act W_down^T (+ b_down)
 *
 * h [rows, hidden] is the residual stream, updated in place; the last layer's delta is written
 * to `delta` (the caller adds it with the final norm). Returns 0, 1 when scratch memory could not
 * be allocated, 2 when a slot, length or block table lies outside the cache (as the kernels it
 * calls; the residual stream is then partly updated and the step must fail).
 *
 * The step runs in one parallel region (layers_in_team): at a few rows each kernel's work is a
 * few microseconds, too little to pay for a region's fork and join of its own, and a step of
 * hundreds of such regions ran on one thread, which streams the weights at less than the
 * memory's rate.
 *
 * silu_mul (activation_cpu.c) is also what the per-operation path calls, so that both paths
 * compute the activation alike.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#ifdef __x86_64__
#include <immintrin.h>
#endif

#include "parallel.h"

#define QK 32
#define Q8_BLOCK_BYTES 44 /* block_q8 of block_quant_cpu.c: fp32 d and s, int32 sum, 32 int8 codes */

enum { KIND_Q4_1 = 0, KIND_Q8_0 = 1, KIND_Q4_1X8 = 2, KIND_Q8_0X8 = 3 };

/* The kernels of the other sources this one calls (their fp32 versions). */
void quantize_rows_q8(const float *x, int64_t x_stride, void *y, int64_t rows, int64_t k,
                      int num_threads);
void matmul_q4_1(const void *x, int64_t rows, const void *w, int64_t n, int64_t k, float *y,
                 int64_t y_stride, int num_threads);
void matmul_q8_0(const void *x, int64_t rows, const void *w, int64_t n, int64_t k, float *y,
                 int64_t y_stride, int num_threads);
void matmul_q4_1x8(const void *x, int64_t rows, const void *w, int64_t n, int64_t k, float *y,
                   int64_t y_stride, int num_threads);
void matmul_q8_0x8(const void *x, int64_t rows, const void *w, int64_t n, int64_t k, float *y,
                   int64_t y_stride, int num_threads);
void silu_mul(const float *gate_up, int64_t rows, int64_t width, const float *gate_bias,
              const float *up_bias, float *out, int num_threads);
void add_rms_norm_f32(float *x, int64_t x_stride, const float *residual, int64_t residual_stride,
                      const float *weight, float *out, int64_t out_stride, int64_t rows,
                      int64_t dim, float eps, int num_threads);
/* The rotary write and the attention for each cache element type (cache_type below): the cache
 * travels as void * so that one call site serves all three. */
#define DECLARE_CACHE_KERNELS(C, CELEM)                                                       \
    int rotary_write_kv_f32_##C(float *qkv, int64_t qkv_stride, const float *cos_t,          \
                                const float *sin_t, CELEM *k_cache, CELEM *v_cache,          \
                                int64_t num_slots, const int64_t *slots, int64_t tokens,     \
                                int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,   \
                                const float *q_norm, const float *k_norm, float norm_eps,    \
                                int num_threads);                                            \
    int paged_decode_attention_heads_f32_##C(                                                \
        const float *q, int64_t q_stride, const CELEM *k_cache, const CELEM *v_cache,        \
        int64_t num_blocks, const int64_t *block_tables, int64_t table_width,                \
        int64_t table_stride, const int64_t *seq_lens, float *out, int64_t out_stride,       \
        int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,       \
        float scale, int64_t window, const float *alibi, int64_t head_first,                 \
        int64_t head_last);                                                                  \
    static int rotary_##C(float *qkv, int64_t qkv_stride, const float *cos_t,                \
                          const float *sin_t, void *k_cache, void *v_cache,                  \
                          int64_t num_slots, const int64_t *slots, int64_t tokens,           \
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,         \
                          const float *q_norm, const float *k_norm, float norm_eps,          \
                          int num_threads)                                                   \
    {                                                                                        \
        return rotary_write_kv_f32_##C(qkv, qkv_stride, cos_t, sin_t, k_cache, v_cache,      \
                                       num_slots, slots, tokens, num_heads, num_kv_heads,    \
                                       head_dim, q_norm, k_norm, norm_eps, num_threads);     \
    }                                                                                        \
    static int attention_##C(const float *q, int64_t q_stride, const void *k_cache,          \
                             const void *v_cache, int64_t num_blocks,                        \
                             const int64_t *block_tables, int64_t table_width,               \
                             int64_t table_stride, const int64_t *seq_lens, float *out,      \
                             int64_t out_stride, int64_t num_heads, int64_t num_kv_heads,    \
                             int64_t head_dim, int64_t block_size, float scale,              \
                             int64_t window, const float *alibi, int64_t head_first,         \
                             int64_t head_last)                                              \
    {                                                                                        \
        return paged_decode_attention_heads_f32_##C(q, q_stride, k_cache, v_cache,           \
                                                    num_blocks, block_tables, table_width,   \
                                                    table_stride, seq_lens, out, out_stride, \
                                                    num_heads, num_kv_heads, head_dim,       \
                                                    block_size, scale, window, alibi,        \
                                                    head_first, head_last);                  \
    }

DECLARE_CACHE_KERNELS(f32, float)
DECLARE_CACHE_KERNELS(bf16, uint16_t)
DECLARE_CACHE_KERNELS(f16, _Float16)
#undef DECLARE_CACHE_KERNELS

typedef int (*rotary_fn)(float *, int64_t, const float *, const float *, void *, void *, int64_t,
                         const int64_t *, int64_t, int64_t, int64_t, int64_t, const float *,
                         const float *, float, int);
typedef int (*attention_fn)(const float *, int64_t, const void *, const void *, int64_t,
                            const int64_t *, int64_t, int64_t, const int64_t *, float *, int64_t,
                            int64_t, int64_t, int64_t, int64_t, float, int64_t, const float *,
                            int64_t, int64_t);

/* The cache element types' codes (kernels/cpu.py's CACHE_TYPES). */
enum { CACHE_F32 = 0, CACHE_BF16 = 1, CACHE_F16 = 2 };

/* One layer's weights and cache. Blocks are [out, in / 32 * block bytes] of their kind; a NULL
 * bias or norm is absent. Mirrored by kernels/cpu.py's DecodeLayer. */
typedef struct {
    const float *input_norm, *post_norm;
    const void *qkv, *o, *gate_up, *down;
    int64_t qkv_kind, o_kind, gate_up_kind, down_kind;
    const float *qkv_bias, *o_bias, *gate_bias, *up_bias, *down_bias;
    const float *q_norm, *k_norm;
    void *k_cache, *v_cache; /* of the call's cache_type */
    int64_t window; /* 0: attends over the whole context */
} decode_layer;

/* Bytes of a weight row per QK inputs: the packed kinds keep eight rows' blocks together in
 * the same bytes per row, so rows from a multiple of eight on start at the same offset. */
static int64_t row_block_bytes(int64_t kind)
{
    return kind == KIND_Q4_1 || kind == KIND_Q4_1X8 ? 20 : 34;
}

/* y[:, begin:end] = x w[begin:end]^T (+ bias) for x already quantized (q8), on the calling
 * thread; begin is a multiple of eight, y rows are n apart. */
static void columns(const void *q8, int64_t rows, int64_t k, const void *w, int64_t kind,
                    int64_t n, int64_t begin, int64_t end, const float *bias, float *y)
{
    const void *part = (const char *)w + begin * (k / QK) * row_block_bytes(kind);
    const int64_t width = end - begin;
    if (width <= 0)
        return;
    if (kind == KIND_Q4_1)
        matmul_q4_1(q8, rows, part, width, k, y + begin, n, 1);
    else if (kind == KIND_Q4_1X8)
        matmul_q4_1x8(q8, rows, part, width, k, y + begin, n, 1);
    else if (kind == KIND_Q8_0X8)
        matmul_q8_0x8(q8, rows, part, width, k, y + begin, n, 1);
    else
        matmul_q8_0(q8, rows, part, width, k, y + begin, n, 1);
    if (bias != NULL)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = begin; i < end; ++i)
                y[r * n + i] += bias[i];
}

/* Thread `part` of `parts`' share of n output columns: whole groups of eight. */
static void share(int64_t n, int part, int parts, int64_t *begin, int64_t *end)
{
    const int64_t groups = n / 8;
    *begin = groups * part / parts * 8;
    *end = part == parts - 1 ? n : groups * (part + 1) / parts * 8;
}

/* What every layer of a step shares: the batch, the sizes, the scratch. */
typedef struct {
    float *h, *delta;
    int64_t rows, hidden, intermediate, num_heads, num_kv_heads, head_dim;
    int64_t q_width, qkv_width;
    const float *cos_t, *sin_t;
    const int64_t *slots, *block_tables, *seq_lens;
    int64_t num_cache_blocks, block_size, table_width, table_stride;
    rotary_fn rotary;
    attention_fn attention;
    float eps, scale;
    float *x, *qkv, *attn, *out, *gate_up, *act; /* scratch, [rows, width] each */
    void *q8;
} decode_step;

/* Rows [first, first + count) of the step's rotary write for layer L. */
static int rotate(const decode_step *S, const decode_layer *L, int64_t first, int64_t count)
{
    if (count <= 0)
        return 0;
    return S->rotary(S->qkv + first * S->qkv_width, S->qkv_width, S->cos_t + first * S->head_dim,
                     S->sin_t + first * S->head_dim, L->k_cache, L->v_cache,
                     S->num_cache_blocks * S->block_size, S->slots + first, count,
                     S->num_heads, S->num_kv_heads, S->head_dim, L->q_norm, L->k_norm, S->eps,
                     1);
}

/* Query heads [head_first, head_last) of the step's rows * num_heads (counted row by row) of
 * layer L's attention, their outputs quantized for the output product. */
static int attend(const decode_step *S, const decode_layer *L, int64_t head_first,
                  int64_t head_last)
{
    const int status = S->attention(S->qkv, S->qkv_width, L->k_cache, L->v_cache,
                                    S->num_cache_blocks, S->block_tables, S->table_width,
                                    S->table_stride, S->seq_lens, S->attn, S->q_width,
                                    S->num_heads, S->num_kv_heads, S->head_dim, S->block_size,
                                    S->scale, L->window, NULL, head_first, head_last);
    if (status != 0)
        return status;
    const int64_t hd = S->head_dim, nh = S->num_heads, blocks = S->q_width / QK;
    for (int64_t u = head_first; u < head_last;) {
        /* Whole rows in one call; a row's heads in the range on their own (Q8 blocks are
         * independent, and a range starts and ends on a block: share_step). */
        const int64_t row = u / nh, r0 = u - row * nh;
        const int64_t whole = r0 == 0 ? (head_last - u) / nh : 0;
        const int64_t r1 = whole > 0 ? nh : head_last < (row + 1) * nh ? head_last - row * nh : nh;
        quantize_rows_q8(S->attn + row * S->q_width + r0 * hd, S->q_width,
                         (char *)S->q8 + (row * blocks + r0 * hd / QK) * Q8_BLOCK_BYTES,
                         whole > 0 ? whole : 1, (r1 - r0) * hd, 1);
        u = whole > 0 ? u + whole * nh : row * nh + r1;
    }
    return 0;
}

/* The first query head of thread `part` of `parts`' share of the attention, among the step's
 * rows * num_heads counted row by row, in steps of `step` heads: the heads whose contexts
 * together make about its share of the step's, since each head reads its row's context and the
 * rows' lengths differ. */
static int64_t heads_share_start(const int64_t *seq_lens, int64_t rows, int64_t num_heads,
                                 int64_t step, int part, int parts)
{
    const int64_t units = rows * num_heads;
    if (part == parts)
        return units;
    int64_t total = 0, before = 0, u = 0;
    for (int64_t i = 0; i < rows; ++i)
        total += seq_lens[i] * num_heads;
    while (u < units && before * parts < total * part) {
        before += seq_lens[u / num_heads] * step;
        u += step;
    }
    return u;
}

/* The heads the attention's shares are counted in. Whole rows where the team has a row for each
 * thread: each thread then rotates the rows it attends, with no barrier between. Else whole KV
 * heads, so that fewer rows than threads (one long stream) still use every thread: a share may
 * end inside a row, between KV heads (no two threads read the same keys and values; measured
 * faster than splitting a KV head's query heads), where the outputs end on a Q8 block. */
static int64_t share_step(const decode_step *S, int parts)
{
    const int64_t group = S->num_heads / S->num_kv_heads;
    return S->rows >= parts || group * S->head_dim % QK != 0 ? S->num_heads : group;
}

/* A barrier for the team of layers_in_team, which meets at one between every two stages of a
 * layer: a few hundred times a step. It spins, since each wait is a few microseconds of the
 * other thread's work, and yields its core after SPINS pauses, since the thread it waits for
 * may be the one that needs the core (the server's event loop shares the machine). */
#define SPINS 4096
typedef struct {
    _Atomic int arrived, generation;
    int parts;
} team_barrier;

static void team_wait(team_barrier *b)
{
    const int generation = atomic_load_explicit(&b->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == b->parts - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->generation, generation + 1, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->generation, memory_order_acquire) == generation;
         ++spins) {
        if (spins < SPINS) {
#ifdef __x86_64__
            _mm_pause();
#endif
        } else {
            sched_yield();
        }
    }
}

/* The layers in one parallel region of `team` threads. The team splits each product's output
 * columns (each output's operations do not depend on the split: block_quant_cpu.c), the
 * attention's query heads (nor do a head's: paged_attention_impl.h) and every other stage's
 * rows, and meets at a barrier between stages. A rotary write or attention that fails (a slot or
 * block outside the cache) leaves its rows unwritten; the team finishes the step and reports
 * it. */
static int layers_in_team(const decode_step *S, const decode_layer *layers, int64_t num_layers,
                          int team)
{
    const int64_t rows = S->rows, hidden = S->hidden, inter = S->intermediate;
    const int64_t q_width = S->q_width, qkv_width = S->qkv_width;
    _Atomic int status = 0;
    team_barrier barrier = {0};
#pragma omp parallel num_threads(team)
    {
        const int me = omp_get_thread_num(), parts = omp_get_num_threads();
#pragma omp single
        barrier.parts = parts;
        /* This thread's rows [first, first + count), its query heads of the attention
         * [head_first, head_last) and its output columns [begin, end) of each product. */
        const int64_t first = rows * me / parts, count = rows * (me + 1) / parts - first;
        const int64_t step = share_step(S, parts), num_heads = S->num_heads;
        const int64_t head_first = heads_share_start(S->seq_lens, rows, num_heads, step, me,
                                                     parts);
        const int64_t head_last = heads_share_start(S->seq_lens, rows, num_heads, step, me + 1,
                                                    parts);
        float *const x = S->x + first * hidden, *const h = S->h + first * hidden;
        const float *const delta = S->delta + first * hidden;
        void *const q8 = (char *)S->q8 + first * (hidden / QK) * Q8_BLOCK_BYTES;
        int64_t begin, end;
        for (int64_t l = 0; l < num_layers; ++l) {
            const decode_layer *L = &layers[l];
            add_rms_norm_f32(h, hidden, l == 0 ? NULL : delta, hidden, L->input_norm, x, hidden,
                             count, hidden, S->eps, 1);
            quantize_rows_q8(x, hidden, q8, count, hidden, 1);
            team_wait(&barrier);
            share(qkv_width, me, parts, &begin, &end);
            columns(S->q8, rows, hidden, L->qkv, L->qkv_kind, qkv_width, begin, end,
                    L->qkv_bias, S->qkv);
            team_wait(&barrier);
            int failed;
            if (step == num_heads) {
                failed = rotate(S, L, head_first / num_heads,
                                (head_last - head_first) / num_heads);
            } else {
                failed = rotate(S, L, first, count);
                team_wait(&barrier); /* the rows this thread attends may be another's */
            }
            if (failed == 0)
                failed = attend(S, L, head_first, head_last);
            if (failed != 0)
                atomic_store(&status, failed);
            team_wait(&barrier);
            share(hidden, me, parts, &begin, &end);
            columns(S->q8, rows, q_width, L->o, L->o_kind, hidden, begin, end, L->o_bias,
                    S->out);
            team_wait(&barrier);
            add_rms_norm_f32(h, hidden, S->out + first * hidden, hidden, L->post_norm, x, hidden,
                             count, hidden, S->eps, 1);
            quantize_rows_q8(x, hidden, q8, count, hidden, 1);
            team_wait(&barrier);
            share(2 * inter, me, parts, &begin, &end);
            columns(S->q8, rows, hidden, L->gate_up, L->gate_up_kind, 2 * inter, begin, end,
                    NULL, S->gate_up);
            team_wait(&barrier);
            silu_mul(S->gate_up + first * 2 * inter, count, inter, L->gate_bias, L->up_bias,
                     S->act + first * inter, 1);
            quantize_rows_q8(S->act + first * inter, inter,
                             (char *)S->q8 + first * (inter / QK) * Q8_BLOCK_BYTES, count, inter,
                             1);
            team_wait(&barrier);
            share(hidden, me, parts, &begin, &end);
            columns(S->q8, rows, inter, L->down, L->down_kind, hidden, begin, end, L->down_bias,
                    S->delta);
            team_wait(&barrier);
        }
    }
    return atomic_load(&status);
}

int decode_layers_q(const decode_layer *layers, int64_t num_layers, float *h, float *delta,
                    int64_t rows, int64_t hidden, int64_t intermediate, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, const float *cos_t,
                    const float *sin_t, const int64_t *slots, int64_t num_cache_blocks,
                    int64_t block_size, const int64_t *block_tables, int64_t table_width,
                    int64_t table_stride, const int64_t *seq_lens, int64_t cache_type,
                    float eps, float scale, int num_threads)
{
    decode_step S = {
        .h = h, .delta = delta, .rows = rows, .hidden = hidden, .intermediate = intermediate,
        .num_heads = num_heads, .num_kv_heads = num_kv_heads, .head_dim = head_dim,
        .q_width = num_heads * head_dim, .qkv_width = (num_heads + 2 * num_kv_heads) * head_dim,
        .cos_t = cos_t, .sin_t = sin_t, .slots = slots, .block_tables = block_tables,
        .seq_lens = seq_lens, .num_cache_blocks = num_cache_blocks, .block_size = block_size,
        .table_width = table_width, .table_stride = table_stride, .eps = eps, .scale = scale,
        .rotary = cache_type == CACHE_BF16  ? rotary_bf16
                  : cache_type == CACHE_F16 ? rotary_f16
                                            : rotary_f32,
        .attention = cache_type == CACHE_BF16  ? attention_bf16
                     : cache_type == CACHE_F16 ? attention_f16
                                               : attention_f32,
    };
    int64_t widest = hidden > intermediate ? hidden : intermediate;
    widest = widest > S.q_width ? widest : S.q_width;
    const size_t floats = (size_t)rows * (size_t)(hidden + S.qkv_width + S.q_width + hidden +
                                                  2 * intermediate + intermediate);
    float *scratch = malloc(sizeof(float) * floats);
    S.q8 = malloc((size_t)rows * (size_t)(widest / QK) * Q8_BLOCK_BYTES);
    if (scratch == NULL || S.q8 == NULL) {
        free(scratch);
        free(S.q8);
        return 1;
    }
    S.x = scratch;
    S.qkv = S.x + rows * hidden;
    S.attn = S.qkv + rows * S.qkv_width;
    S.out = S.attn + rows * S.q_width;
    S.gate_up = S.out + rows * hidden;
    S.act = S.gate_up + rows * 2 * intermediate;
    const int64_t layer_work = hidden * S.qkv_width + S.q_width * hidden +
                               hidden * 2 * intermediate + intermediate * hidden;
    const int status = layers_in_team(&S, layers, num_layers,
                                      threads_for(rows * layer_work, num_threads));
    free(scratch);
    free(S.q8);
    return status;
}
