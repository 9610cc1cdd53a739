/* The rotary embedding and KV write for one activation element type T and one cache element
 * type C (f32, bf16, f16): included once per pair by elementwise_cpu.c, which documents it. The
 * rotation rounds to T as the torch reference does; the stored keys and values are rounded to C
 * (nothing changes when C is T). */
#define ELEM PS_CAT(T, _t)
#define CELEM PS_CAT(C, _t)
#define LOAD PS_CAT(load_, T)
#define STORE PS_CAT(store_, T)
#define STORE_C PS_CAT(store_, C)
#define RND(v) LOAD(STORE(v))
#define FN(name) PS_CAT(name, PS_CAT(_, PS_CAT(T, PS_CAT(_, C))))

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
                        CELEM *k_cache, CELEM *v_cache, int64_t num_slots, const int64_t *slots,
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
        const ELEM *k = row + num_heads * head_dim, *v = k + kv_size;
        CELEM *kc = k_cache + slot * kv_size, *vc = v_cache + slot * kv_size;
#pragma omp simd
        for (int64_t i = 0; i < kv_size; ++i) {
            kc[i] = STORE_C(LOAD(k[i]));
            vc[i] = STORE_C(LOAD(v[i]));
        }
    }
    return 0;
}

#undef ELEM
#undef CELEM
#undef LOAD
#undef STORE
#undef STORE_C
#undef RND
#undef FN
