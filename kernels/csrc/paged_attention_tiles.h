/* The arithmetic of attention for one cache element type C (f32, bf16, f16): included once per
 * cache type by paged_attention_cpu.c, before the kernels of every query type over that cache.
 * Keys and values are loaded to fp32 where they are read, in registers: a 16-bit cache's
 * conversion costs a load's worth, where a pass converting each block into a buffer first
 * stored and reloaded every element (the query rows of a tile share each loaded key). */
#define CELEM PS_CAT(C, _t)
#define LOAD1 PS_CAT(load_, C)
#define LOADV PS_CAT(loadv_, C)
#define TN(name) PS_CAT(name, PS_CAT(_, C))

/* a[r][c] += q_r . k_c for the first `keys` of a tile's keys (kstride apart), q_r held as nv
 * vectors: with keys a constant (a whole tile), the sums stay in registers. */
static inline __attribute__((always_inline)) void TN(dot_keys)(
    vecf (*restrict a)[KEY_TILE], const vecf (*restrict qv)[MAX_VECS], const int m,
    const int nv, const CELEM *restrict k, const int keys, int64_t kstride)
{
    for (int i = 0; i < nv; ++i)
        for (int c = 0; c < keys; ++c) {
            const vecf kv = LOADV(k + c * kstride + VL * i);
            for (int r = 0; r < m; ++r)
                a[r][c] += qv[r][i] * kv;
        }
}

/* s[r * s_stride + j] = q_r . k_j for m query rows q_r (head_dim apart) and n key rows k_j
 * (kstride apart), each head_dim wide. A tile's last keys are summed as a whole tile's are, and
 * every key's sum is taken in the same order whatever the cache type. */
static inline __attribute__((always_inline)) void TN(dot_tile)(
    const float *restrict q, const int m, const CELEM *restrict k, int64_t n, int64_t kstride,
    const int64_t head_dim, float *restrict s, int64_t s_stride)
{
    if (head_dim % VL == 0 && head_dim <= VL * MAX_VECS) {
        const int nv = (int)(head_dim / VL);
        vecf qv[MAX_ROWS][MAX_VECS];
        for (int r = 0; r < m; ++r)
            for (int i = 0; i < nv; ++i)
                qv[r][i] = loadv(q + r * head_dim + VL * i);
        for (int64_t j = 0; j < n; j += KEY_TILE) {
            const int keys = n - j < KEY_TILE ? (int)(n - j) : KEY_TILE;
            vecf a[MAX_ROWS][KEY_TILE];
            for (int r = 0; r < m; ++r)
                for (int c = 0; c < KEY_TILE; ++c)
                    a[r][c] = (vecf){0};
            if (keys == KEY_TILE)
                TN(dot_keys)(a, (const vecf(*)[MAX_VECS])qv, m, nv, k + j * kstride, KEY_TILE,
                             kstride);
            else
                TN(dot_keys)(a, (const vecf(*)[MAX_VECS])qv, m, nv, k + j * kstride, keys,
                             kstride);
            for (int r = 0; r < m; ++r) {
                const vecf sums = key_sums(a[r][0], a[r][1], a[r][2], a[r][3]);
                for (int c = 0; c < keys; ++c)
                    s[r * s_stride + j + c] = sums[c];
            }
        }
        return;
    }
    for (int64_t j = 0; j < n; ++j)
        for (int r = 0; r < m; ++r) {
            const float *qr = q + r * head_dim;
            const CELEM *kr = k + j * kstride;
            /* Eight running sums, added pairwise: an order the compiler keeps. */
            float part[8] = {0};
            int64_t d = 0;
            for (; d + 8 <= head_dim; d += 8)
                for (int l = 0; l < 8; ++l)
                    part[l] += qr[d + l] * LOAD1(kr[d + l]);
            float acc = ((part[0] + part[1]) + (part[2] + part[3])) +
                        ((part[4] + part[5]) + (part[6] + part[7]));
            for (; d < head_dim; ++d)
                acc += qr[d] * LOAD1(kr[d]);
            s[r * s_stride + j] = acc;
        }
}

/* o_r += sum over j of p[r * p_stride + j] * v_j for m output rows o_r (head_dim apart) and n
 * value rows v_j (vstride apart), each head_dim wide. */
static inline __attribute__((always_inline)) void TN(accumulate_tile)(
    float *restrict o, const int m, const float *restrict p, int64_t p_stride,
    const CELEM *restrict v, int64_t n, int64_t vstride, const int64_t head_dim)
{
    if (head_dim % VL == 0 && head_dim <= VL * MAX_VECS) {
        const int nv = (int)(head_dim / VL);
        vecf a[MAX_ROWS][MAX_VECS];
        for (int r = 0; r < m; ++r)
            for (int i = 0; i < nv; ++i)
                a[r][i] = loadv(o + r * head_dim + VL * i);
        for (int64_t j = 0; j < n; ++j)
            for (int i = 0; i < nv; ++i) {
                const vecf vv = LOADV(v + j * vstride + VL * i);
                for (int r = 0; r < m; ++r)
                    a[r][i] += p[r * p_stride + j] * vv;
            }
        for (int r = 0; r < m; ++r)
            for (int i = 0; i < nv; ++i)
                *(vecfu *)(o + r * head_dim + VL * i) = a[r][i];
        return;
    }
    for (int r = 0; r < m; ++r)
        for (int64_t j = 0; j < n; ++j) {
            const float pj = p[r * p_stride + j];
            const CELEM *vr = v + j * vstride;
            float *or = o + r * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d)
                or[d] += pj * LOAD1(vr[d]);
        }
}

/* dot_tile and accumulate_tile for a group of rows, a tile at a time, each tile's row count a
 * constant of its own copy (the switch), so that its vectors are registers. */
static inline __attribute__((always_inline)) void TN(dot_rows)(
    const float *q, int64_t rows, const CELEM *k, int64_t n, int64_t kstride,
    const int64_t head_dim, float *s, int64_t s_stride)
{
    const int64_t tile = rows_per_tile(head_dim);
    for (int64_t r = 0; r < rows; r += tile) {
        const float *qr = q + r * head_dim;
        float *sr = s + r * s_stride;
        switch (rows - r < tile ? rows - r : tile) {
        case 1: TN(dot_tile)(qr, 1, k, n, kstride, head_dim, sr, s_stride); break;
        case 2: TN(dot_tile)(qr, 2, k, n, kstride, head_dim, sr, s_stride); break;
        default: TN(dot_tile)(qr, MAX_ROWS, k, n, kstride, head_dim, sr, s_stride); break;
        }
    }
}

static inline __attribute__((always_inline)) void TN(accumulate_rows)(
    float *o, int64_t rows, const float *p, int64_t p_stride, const CELEM *v, int64_t n,
    int64_t vstride, const int64_t head_dim)
{
    const int64_t tile = rows_per_tile(head_dim);
    for (int64_t r = 0; r < rows; r += tile) {
        float *orow = o + r * head_dim;
        const float *pr = p + r * p_stride;
        switch (rows - r < tile ? rows - r : tile) {
        case 1: TN(accumulate_tile)(orow, 1, pr, p_stride, v, n, vstride, head_dim); break;
        case 2: TN(accumulate_tile)(orow, 2, pr, p_stride, v, n, vstride, head_dim); break;
        default:
            TN(accumulate_tile)(orow, MAX_ROWS, pr, p_stride, v, n, vstride, head_dim);
            break;
        }
    }
}

/* The row helpers, compiled once per head width (64, 128, any) for this cache type and shared
 * by every query type: inlined into each pair's copy of the kernel they took most of its
 * compile time. The copies pick theirs by head_dim, a constant there, so the choice folds
 * away. */
#define DEFINE_ROW_HELPERS(WIDTH, HEAD_DIM)                                                    \
    static __attribute__((noinline)) void TN(PS_CAT(dot_rows_, WIDTH))(                     \
        const float *q, int64_t rows, const CELEM *k, int64_t n, int64_t kstride,           \
        int64_t head_dim, float *s, int64_t s_stride)                                        \
    {                                                                                        \
        (void)head_dim;                                                                      \
        TN(dot_rows)(q, rows, k, n, kstride, HEAD_DIM, s, s_stride);                         \
    }                                                                                        \
    static __attribute__((noinline)) void TN(PS_CAT(accumulate_rows_, WIDTH))(              \
        float *o, int64_t rows, const float *p, int64_t p_stride, const CELEM *v, int64_t n, \
        int64_t vstride, int64_t head_dim)                                                   \
    {                                                                                        \
        (void)head_dim;                                                                      \
        TN(accumulate_rows)(o, rows, p, p_stride, v, n, vstride, HEAD_DIM);                  \
    }

DEFINE_ROW_HELPERS(64, 64)
DEFINE_ROW_HELPERS(128, 128)
DEFINE_ROW_HELPERS(any, head_dim)
#undef DEFINE_ROW_HELPERS

static inline __attribute__((always_inline)) void TN(dot_rows_of)(
    const float *q, int64_t rows, const CELEM *k, int64_t n, int64_t kstride,
    const int64_t head_dim, float *s, int64_t s_stride)
{
    if (head_dim == 64)
        TN(dot_rows_64)(q, rows, k, n, kstride, head_dim, s, s_stride);
    else if (head_dim == 128)
        TN(dot_rows_128)(q, rows, k, n, kstride, head_dim, s, s_stride);
    else
        TN(dot_rows_any)(q, rows, k, n, kstride, head_dim, s, s_stride);
}

static inline __attribute__((always_inline)) void TN(accumulate_rows_of)(
    float *o, int64_t rows, const float *p, int64_t p_stride, const CELEM *v, int64_t n,
    int64_t vstride, const int64_t head_dim)
{
    if (head_dim == 64)
        TN(accumulate_rows_64)(o, rows, p, p_stride, v, n, vstride, head_dim);
    else if (head_dim == 128)
        TN(accumulate_rows_128)(o, rows, p, p_stride, v, n, vstride, head_dim);
    else
        TN(accumulate_rows_any)(o, rows, p, p_stride, v, n, vstride, head_dim);
}

#undef CELEM
#undef LOAD1
#undef LOADV
#undef TN
