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

#undef ELEM
#undef LOAD
#undef STORE
#undef RND
#undef FN
