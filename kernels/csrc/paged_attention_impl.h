/* The decode attention kernel for one query element type T and one cache element type C (f32,
 * bf16, f16): included once per pair by paged_attention_cpu.c, which documents the layouts.
 * Scores, softmax and the weighted sum of values are computed in fp32 whatever T and C are; the
 * output row is rounded to T once. */
#define ELEM PS_CAT(T, _t)
#define CELEM PS_CAT(C, _t)
#define LOAD PS_CAT(load_, T)
#define ROW_C PS_CAT(row_, C)
#define STORE PS_CAT(store_, T)
#define FN(name) PS_CAT(name, PS_CAT(_, PS_CAT(T, PS_CAT(_, C))))

/* The n token rows of a block (all heads, `token_stride` elements each) as fp32 rows
 * `*stride_out` apart: in place for an fp32 cache, else converted into buf in one sequential
 * pass (which the hardware prefetchers follow), once for every query row that reads them. */
static inline __attribute__((always_inline)) const float *FN(block_rows)(
    const CELEM *src, int64_t n, int64_t token_stride, float *buf)
{
#if PS_CAT(ROW_IN_PLACE_, C)
    (void)n;
    (void)token_stride;
    (void)buf;
    return (const float *)src;
#else
    return ROW_C(src, buf, n * token_stride);
#endif
}

/* One sequence: its num_kv_heads * group query rows attend over its tokens first..len-1 (all of
 * them, or the last `window` under a sliding window). Keys and values are swept once, block by
 * block, all heads of a block together, so the context streams through the cache once per pass
 * (a sweep per head would re-read long contexts from L3). head_dim is a compile-time constant in
 * the specialised copies (64, 128), which lets the compiler keep a row's accumulator in
 * registers. With ALiBi, alibi[row] * (t - (len - 1)) is added to the scaled score of token t. */
static inline __attribute__((always_inline)) void FN(attend_seq)(
    const ELEM *restrict q_s, ELEM *restrict out_s,
    const CELEM *restrict k_cache, const CELEM *restrict v_cache,
    const int64_t *restrict table, int64_t len, int64_t first, int64_t block_size,
    int64_t num_kv_heads, int64_t group, const int64_t head_dim, float scale,
    const float *restrict alibi, float *restrict scratch)
{
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t rows = num_kv_heads * group;
    const int64_t span = len - first;
    float *restrict qf = scratch;
    float *restrict accum = qf + rows * head_dim;
    float *restrict rowbuf = accum + rows * head_dim; /* a block's rows, converted from C */
    float *restrict scores = rowbuf + block_size * token_stride;

    for (int64_t i = 0; i < rows * head_dim; ++i) {
        qf[i] = LOAD(q_s[i]);
        accum[i] = 0.0f;
    }
    const int64_t block_bytes = block_size * token_stride * (int64_t)sizeof(CELEM);
    for (int64_t b = first / block_size; b * block_size < len; ++b) {
        const CELEM *kb = k_cache + table[b] * block_size * token_stride;
        if ((b + 1) * block_size < len)
            prefetch_bytes(k_cache + table[b + 1] * block_size * token_stride, block_bytes);
        const int64_t lo = b * block_size > first ? b * block_size : first;
        const int64_t hi = (b + 1) * block_size < len ? (b + 1) * block_size : len;
        const float *krows = FN(block_rows)(kb + (lo - b * block_size) * token_stride, hi - lo,
                                            token_stride, rowbuf);
        for (int64_t h = 0; h < num_kv_heads; ++h) {
            dot_rows_of(qf + h * group * head_dim, group, krows + h * head_dim, hi - lo,
                        token_stride, head_dim, scores + h * group * span + lo - first, span);
            for (int64_t g = 0; g < group; ++g) {
                const int64_t row = h * group + g;
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

    for (int64_t row = 0; row < rows; ++row) {
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
            prefetch_bytes(v_cache + table[b + 1] * block_size * token_stride, block_bytes);
        const int64_t lo = b * block_size > first ? b * block_size : first;
        const int64_t hi = (b + 1) * block_size < len ? (b + 1) * block_size : len;
        const float *vrows = FN(block_rows)(vb + (lo - b * block_size) * token_stride, hi - lo,
                                            token_stride, rowbuf);
        for (int64_t h = 0; h < num_kv_heads; ++h)
            accumulate_rows_of(accum + h * group * head_dim, group,
                               scores + h * group * span + lo - first, span,
                               vrows + h * head_dim, hi - lo, token_stride, head_dim);
    }
    for (int64_t i = 0; i < rows * head_dim; ++i)
        out_s[i] = STORE(accum[i]);
}

#define DEFINE_ATTEND(NAME, HEAD_DIM)                                                         \
    static void FN(NAME)(const ELEM *q_s, ELEM *out_s, const CELEM *k_cache,                \
                         const CELEM *v_cache, const int64_t *table, int64_t len,           \
                         int64_t first, int64_t block_size, int64_t num_kv_heads,           \
                         int64_t group, int64_t head_dim, float scale, const float *alibi,  \
                         float *scratch)                                                     \
    {                                                                                        \
        (void)head_dim;                                                                      \
        FN(attend_seq)(q_s, out_s, k_cache, v_cache, table, len, first, block_size,         \
                       num_kv_heads, group, HEAD_DIM, scale, alibi, scratch);               \
    }

DEFINE_ATTEND(attend_64, 64)
DEFINE_ATTEND(attend_128, 128)
DEFINE_ATTEND(attend_any, head_dim)
#undef DEFINE_ATTEND

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
    int64_t max_span = 0, total_span = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t len = seq_lens[s];
        if (len < 1 || len > table_width * block_size)
            return 2;
        for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
            const int64_t block = block_tables[s * table_stride + b];
            if (block < 0 || block >= num_blocks)
                return 2;
        }
        const int64_t span = window > 0 && len > window ? window : len;
        max_span = span > max_span ? span : max_span;
        total_span += span;
    }
    if (num_seqs == 0)
        return 0;
    const int64_t group = num_heads / num_kv_heads;
    void (*attend)(const ELEM *, ELEM *, const CELEM *, const CELEM *, const int64_t *, int64_t,
                   int64_t, int64_t, int64_t, int64_t, int64_t, float, const float *,
                   float *) =
        head_dim == 64 ? FN(attend_64) : head_dim == 128 ? FN(attend_128) : FN(attend_any);
    int failed = 0;

#pragma omp parallel num_threads(threads_for(2 * total_span * num_heads * head_dim, num_threads))
    {
        float *scratch = malloc(sizeof(float) * (size_t)(num_heads * (max_span + 2 * head_dim) +
                                                         block_size * num_kv_heads * head_dim));
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
                   group, head_dim, scale, alibi, scratch);
        }
        free(scratch);
    }
    return failed;
}

#undef ELEM
#undef CELEM
#undef LOAD
#undef ROW_C
#undef STORE
#undef FN
