/* The row kernels for one element type T (f32, bf16, f16): included once per type by
 * elementwise_cpu.c, which documents them. Arithmetic is fp32; RND rounds a value to T wherever
 * the torch reference holds an intermediate result in the tensor dtype. */
#define ELEM PS_CAT(T, _t)
#define LOAD PS_CAT(load_, T)
#define STORE PS_CAT(store_, T)
#define RND(v) LOAD(STORE(v))
#define FN(name) PS_CAT(name, PS_CAT(_, T))

/* x += residual for one row, rounded to T as torch's in-place add rounds. */
static inline void FN(add_row)(ELEM *x, const ELEM *residual, int64_t dim)
{
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d)
        x[d] = STORE(LOAD(x[d]) + LOAD(residual[d]));
}

void FN(add_rms_norm)(ELEM *x, int64_t x_stride, const ELEM *residual, int64_t residual_stride,
                      const ELEM *weight, ELEM *out, int64_t out_stride, int64_t rows,
                      int64_t dim, float eps, int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * dim * ELEMENT_WORK, num_threads))   \
    schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        ELEM *xr = x + r * x_stride;
        ELEM *o = out + r * out_stride;
        if (residual != NULL)
            FN(add_row)(xr, residual + r * residual_stride, dim);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < dim; ++d)
            sum += LOAD(xr[d]) * LOAD(xr[d]);
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d)
            o[d] = STORE(LOAD(weight[d]) * RND(LOAD(xr[d]) * inv));
    }
}

void FN(add_layer_norm)(ELEM *x, int64_t x_stride, const ELEM *residual,
                        int64_t residual_stride, const ELEM *weight, const ELEM *bias,
                        ELEM *out, int64_t out_stride, int64_t rows, int64_t dim, float eps,
                        int num_threads)
{
#pragma omp parallel for num_threads(threads_for(rows * dim * ELEMENT_WORK, num_threads))   \
    schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        ELEM *xr = x + r * x_stride;
        ELEM *o = out + r * out_stride;
        if (residual != NULL)
            FN(add_row)(xr, residual + r * residual_stride, dim);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < dim; ++d)
            sum += LOAD(xr[d]);
        const float mean = sum / (float)dim;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < dim; ++d)
            squares += (LOAD(xr[d]) - mean) * (LOAD(xr[d]) - mean);
        const float inv = 1.0f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) {
            const float y = (LOAD(xr[d]) - mean) * inv * LOAD(weight[d]);
            o[d] = STORE(bias != NULL ? y + LOAD(bias[d]) : y);
        }
    }
}

/* RMSNorm of one head in place, rounded as torch's per-head norm (Qwen3's q_norm / k_norm). */
static inline void FN(head_rms_norm)(ELEM *x, const ELEM *weight, int64_t head_dim, float eps)
{
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < head_dim; ++d)
        sum += LOAD(x[d]) * LOAD(x[d]);
    const float inv = 1.0f / sqrtf(sum / (float)head_dim + eps);
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d)
        x[d] = STORE(LOAD(weight[d]) * RND(LOAD(x[d]) * inv));
}

int FN(rotary_write_kv)(ELEM *qkv, int64_t qkv_stride, const ELEM *cos_t, const ELEM *sin_t,
                        ELEM *k_cache, ELEM *v_cache, int64_t num_slots, const int64_t *slots,
                        int64_t tokens, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, const ELEM *q_norm, const ELEM *k_norm,
                        float norm_eps, int num_threads)
{
    /* A slot outside the cache writes nothing at all: 2, as the attention kernel's bad input. */
    for (int64_t t = 0; t < tokens; ++t)
        if (slots[t] < 0 || slots[t] >= num_slots)
            return 2;
    const int64_t half = head_dim / 2;
    const int64_t kv_size = num_kv_heads * head_dim;
#pragma omp parallel for num_threads(threads_for(tokens * (num_heads + num_kv_heads) * head_dim * \
                                              ELEMENT_WORK, num_threads)) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        ELEM *row = qkv + t * qkv_stride;
        const ELEM *c = cos_t + t * head_dim;
        const ELEM *s = sin_t + t * head_dim;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
            ELEM *x = row + h * head_dim;
            const ELEM *norm = h < num_heads ? q_norm : k_norm;
            if (norm != NULL)
                FN(head_rms_norm)(x, norm, head_dim, norm_eps);
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = LOAD(x[i]), x2 = LOAD(x[i + half]);
                x[i] = STORE(RND(x1 * LOAD(c[i])) - RND(x2 * LOAD(s[i])));
                x[i + half] = STORE(RND(x2 * LOAD(c[i + half])) + RND(x1 * LOAD(s[i + half])));
            }
        }
        const int64_t slot = slots[t];
        memcpy(k_cache + slot * kv_size, row + num_heads * head_dim, sizeof(ELEM) * kv_size);
        memcpy(v_cache + slot * kv_size, row + (num_heads + num_kv_heads) * head_dim,
               sizeof(ELEM) * kv_size);
    }
    return 0;
}

#undef ELEM
#undef LOAD
#undef STORE
#undef RND
#undef FN
