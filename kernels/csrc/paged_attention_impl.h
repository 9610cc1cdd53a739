/* The decode attention kernel for one query element type T and one cache element type C (f32,
 * bf16, f16): included once per pair by paged_attention_cpu.c, which documents the layouts.
 * Scores, softmax and the weighted sum of values are computed in fp32 whatever T and C are; the
 * output row is rounded to T once. */
#define ELEM PS_CAT(T, _t)
#define CELEM PS_CAT(C, _t)
#define LOAD PS_CAT(load_, T)
#define STORE PS_CAT(store_, T)
#define FN(name) PS_CAT(name, PS_CAT(_, PS_CAT(T, PS_CAT(_, C))))
#define CN(name) PS_CAT(name, PS_CAT(_, C)) /* paged_attention_tiles.h's, for this cache type */

/* Prefetches lanes [lane_first, lane_first + lanes) of a block's n token rows (prefetch_bytes). */
static inline __attribute__((always_inline)) void FN(prefetch_block)(
    const CELEM *src, int64_t n, int64_t token_stride, int64_t lane_first, int64_t lanes)
{
    if (lanes == token_stride) {
        prefetch_bytes(src, n * token_stride * (int64_t)sizeof(CELEM));
        return;
    }
    for (int64_t t = 0; t < n; ++t)
        prefetch_bytes(src + t * token_stride + lane_first, lanes * (int64_t)sizeof(CELEM));
}

/* One sequence: its query rows [row_first, row_last) of num_kv_heads * group attend over its
 * tokens first..len-1 (all of them, or the last `window` under a sliding window). Keys and values
 * are swept once, block by block, all the rows' KV heads of a block together, so the context
 * streams through the cache once per pass (a sweep per head would re-read long contexts from L3).
 * Each row's arithmetic is the same whichever rows are taken with it. head_dim is a
 * compile-time constant in the specialised copies (64, 128), which lets the compiler keep a row's
 * accumulator in registers. With ALiBi, alibi[row] * (t - (len - 1)) is added to the scaled
 * score of token t. */
static inline __attribute__((always_inline)) void FN(attend_seq)(
    const ELEM *restrict q_s, ELEM *restrict out_s,
    const CELEM *restrict k_cache, const CELEM *restrict v_cache,
    const int64_t *restrict table, int64_t len, int64_t first, int64_t block_size,
    int64_t num_kv_heads, int64_t group, const int64_t head_dim, float scale,
    const float *restrict alibi, int64_t row_first, int64_t row_last, float *restrict scratch)
{
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t rows = num_kv_heads * group;
    const int64_t span = len - first;
    /* The KV heads the rows read, and their lanes of a token's row. */
    const int64_t head_first = row_first / group, head_last = (row_last - 1) / group + 1;
    const int64_t lane_first = head_first * head_dim;
    const int64_t lanes = (head_last - head_first) * head_dim;
    float *restrict qf = scratch;
    float *restrict accum = qf + rows * head_dim;
    float *restrict scores = accum + rows * head_dim;

    for (int64_t i = row_first * head_dim; i < row_last * head_dim; ++i) {
        qf[i] = LOAD(q_s[i]);
        accum[i] = 0.0f;
    }
    for (int64_t b = first / block_size; b * block_size < len; ++b) {
        const CELEM *kb = k_cache + table[b] * block_size * token_stride;
        if ((b + 1) * block_size < len)
            FN(prefetch_block)(k_cache + table[b + 1] * block_size * token_stride, block_size,
                               token_stride, lane_first, lanes);
        const int64_t lo = b * block_size > first ? b * block_size : first;
        const int64_t hi = (b + 1) * block_size < len ? (b + 1) * block_size : len;
        const CELEM *krows = kb + (lo - b * block_size) * token_stride;
        for (int64_t h = head_first; h < head_last; ++h) {
            const int64_t r0 = row_first > h * group ? row_first : h * group;
            const int64_t r1 = row_last < (h + 1) * group ? row_last : (h + 1) * group;
            CN(dot_rows_of)(qf + r0 * head_dim, r1 - r0, krows + h * head_dim, hi - lo,
                            token_stride, head_dim, scores + r0 * span + lo - first, span);
            for (int64_t row = r0; row < r1; ++row) {
                float *sr = scores + row * span + lo - first;
                for (int64_t t = lo; t < hi; ++t) {
                    float score = sr[t - lo] * scale;
                    if (alibi != NULL)
                        score += alibi[row] * (float)(t - (len - 1));
                    sr[t - lo] = score;
                }
            }
        }
    }

    for (int64_t row = row_first; row < row_last; ++row) {
        float *sr = scores + row * span;
        float top = -FLT_MAX;
        for (int64_t t = 0; t < span; ++t)
            top = sr[t] > top ? sr[t] : top;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < span; ++t) {
            sr[t] = expf(sr[t] - top);
            sum += sr[t];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t t = 0; t < span; ++t)
            sr[t] *= inv;
    }

    for (int64_t b = first / block_size; b * block_size < len; ++b) {
        const CELEM *vb = v_cache + table[b] * block_size * token_stride;
        if ((b + 1) * block_size < len)
            FN(prefetch_block)(v_cache + table[b + 1] * block_size * token_stride, block_size,
                               token_stride, lane_first, lanes);
        const int64_t lo = b * block_size > first ? b * block_size : first;
        const int64_t hi = (b + 1) * block_size < len ? (b + 1) * block_size : len;
        const CELEM *vrows = vb + (lo - b * block_size) * token_stride;
        for (int64_t h = head_first; h < head_last; ++h) {
            const int64_t r0 = row_first > h * group ? row_first : h * group;
            const int64_t r1 = row_last < (h + 1) * group ? row_last : (h + 1) * group;
            CN(accumulate_rows_of)(accum + r0 * head_dim, r1 - r0,
                                   scores + r0 * span + lo - first, span, vrows + h * head_dim,
                                   hi - lo, token_stride, head_dim);
        }
    }
    for (int64_t i = row_first * head_dim; i < row_last * head_dim; ++i)
        out_s[i] = STORE(accum[i]);
}

#define DEFINE_ATTEND(NAME, HEAD_DIM)                                                         \
    static void FN(NAME)(const ELEM *q_s, ELEM *out_s, const CELEM *k_cache,                \
                         const CELEM *v_cache, const int64_t *table, int64_t len,           \
                         int64_t first, int64_t block_size, int64_t num_kv_heads,           \
                         int64_t group, int64_t head_dim, float scale, const float *alibi,  \
                         int64_t row_first, int64_t row_last, float *scratch)               \
    {                                                                                        \
        (void)head_dim;                                                                      \
        FN(attend_seq)(q_s, out_s, k_cache, v_cache, table, len, first, block_size,         \
                       num_kv_heads, group, HEAD_DIM, scale, alibi, row_first, row_last,    \
                       scratch);                                                             \
    }

DEFINE_ATTEND(attend_64, 64)
DEFINE_ATTEND(attend_128, 128)
DEFINE_ATTEND(attend_any, head_dim)
#undef DEFINE_ATTEND

typedef void (*FN(attend_fn))(const ELEM *, ELEM *, const CELEM *, const CELEM *,
                              const int64_t *, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, float, const float *, int64_t, int64_t, float *);

static FN(attend_fn) FN(attend_for)(int64_t head_dim)
{
    return head_dim == 64 ? FN(attend_64) : head_dim == 128 ? FN(attend_128) : FN(attend_any);
}

/* Sequences [s0, s1): 2 when one's length does not fit its block table or the table names a
 * block outside the cache, else 0 with their longest span and their spans' sum. */
static int FN(check_tables)(const int64_t *block_tables, int64_t table_width,
                            int64_t table_stride, const int64_t *seq_lens, int64_t s0,
                            int64_t s1, int64_t num_blocks, int64_t block_size, int64_t window,
                            int64_t *max_span, int64_t *total_span)
{
    *max_span = 0;
    *total_span = 0;
    for (int64_t s = s0; s < s1; ++s) {
        const int64_t len = seq_lens[s];
        if (len < 1 || len > table_width * block_size)
            return 2;
        for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
            const int64_t block = block_tables[s * table_stride + b];
            if (block < 0 || block >= num_blocks)
                return 2;
        }
        const int64_t span = window > 0 && len > window ? window : len;
        *max_span = span > *max_span ? span : *max_span;
        *total_span += span;
    }
    return 0;
}

/* Floats of one thread's scratch for spans up to max_span. */
static size_t FN(scratch_floats)(int64_t max_span, int64_t num_heads, int64_t head_dim)
{
    return (size_t)(num_heads * (max_span + 2 * head_dim));
}

/* Returns 0 on success, 1 when the scratch memory could not be allocated, 2 when a sequence's
 * length does not fit its block table or the table names a block outside the cache (nothing is
 * read then). window 0: no sliding window; alibi NULL: no ALiBi (else one slope per head). */
int FN(paged_decode_attention)(
    const ELEM *q, int64_t q_stride,
    const CELEM *k_cache, const CELEM *v_cache, int64_t num_blocks,
    const int64_t *block_tables, int64_t table_width, int64_t table_stride,
    const int64_t *seq_lens,
    ELEM *out, int64_t out_stride,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, float scale, int64_t window, const float *alibi, int num_threads)
{
    int64_t max_span, total_span;
    if (FN(check_tables)(block_tables, table_width, table_stride, seq_lens, 0, num_seqs,
                         num_blocks, block_size, window, &max_span, &total_span) != 0)
        return 2;
    if (num_seqs == 0)
        return 0;
    const int64_t group = num_heads / num_kv_heads;
    const FN(attend_fn) attend = FN(attend_for)(head_dim);
    int failed = 0;

#pragma omp parallel num_threads(threads_for(2 * total_span * num_heads * head_dim, num_threads))
    {
        float *scratch =
            malloc(sizeof(float) * FN(scratch_floats)(max_span, num_heads, head_dim));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; ++s) {
            if (scratch == NULL)
                continue;
            const int64_t len = seq_lens[s];
            const int64_t first = window > 0 && len > window ? len - window : 0;
            attend(q + s * q_stride, out + s * out_stride, k_cache, v_cache,
                   block_tables + s * table_stride, len, first, block_size, num_kv_heads,
                   group, head_dim, scale, alibi, 0, num_heads, scratch);
        }
        free(scratch);
    }
    return failed;
}

/* The query heads [head_first, head_last) of the batch's num_seqs * num_heads, counted sequence
 * by sequence, on the calling thread: a team of threads splits a step's attention with it (by
 * whole sequences, or inside one where the sequences are fewer than the threads). Results and
 * returns are paged_decode_attention's, for the sequences it reads. */
int FN(paged_decode_attention_heads)(
    const ELEM *q, int64_t q_stride,
    const CELEM *k_cache, const CELEM *v_cache, int64_t num_blocks,
    const int64_t *block_tables, int64_t table_width, int64_t table_stride,
    const int64_t *seq_lens,
    ELEM *out, int64_t out_stride,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, float scale, int64_t window, const float *alibi,
    int64_t head_first, int64_t head_last)
{
    if (head_last <= head_first)
        return 0;
    const int64_t s0 = head_first / num_heads, s1 = (head_last - 1) / num_heads + 1;
    int64_t max_span, total_span;
    if (FN(check_tables)(block_tables, table_width, table_stride, seq_lens, s0, s1, num_blocks,
                         block_size, window, &max_span, &total_span) != 0)
        return 2;
    float *scratch = malloc(sizeof(float) * FN(scratch_floats)(max_span, num_heads, head_dim));
    if (scratch == NULL)
        return 1;
    const FN(attend_fn) attend = FN(attend_for)(head_dim);
    for (int64_t s = s0; s < s1; ++s) {
        const int64_t len = seq_lens[s];
        const int64_t first = window > 0 && len > window ? len - window : 0;
        const int64_t r0 = head_first > s * num_heads ? head_first - s * num_heads : 0;
        const int64_t r1 = head_last < (s + 1) * num_heads ? head_last - s * num_heads
                                                           : num_heads;
        attend(q + s * q_stride, out + s * out_stride, k_cache, v_cache,
               block_tables + s * table_stride, len, first, block_size, num_kv_heads,
               num_heads / num_kv_heads, head_dim, scale, alibi, r0, r1, scratch);
    }
    free(scratch);
    return 0;
}

#undef ELEM
#undef CELEM
#undef LOAD
#undef STORE
#undef FN
#undef CN
