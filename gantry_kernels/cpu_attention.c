/* CPU paged attention over float32 pages, and the small per-layer ops of a decode step (RMSNorm with
 * the residual add, NeoX rotary, SiLU-and-mul), on an AVX2+FMA CPU. Built at first use by
 * gantry_kernels/cpu_native.py. One call per layer for every sequence: the pages are read in place through
 * the block tables (no gather of the context), softmax is online (one pass over the keys). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
    if (n >= 8) {
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
        for (i = 8; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        s = hsum(acc);
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* acc = acc * c + p * v over n floats */
static inline void scale_add(float *acc, float c, float p, const float *v, int64_t n) {
    int64_t i = 0;
    __m256 cv = _mm256_set1_ps(c), pv = _mm256_set1_ps(p);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i,
                         _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_mul_ps(cv, _mm256_loadu_ps(acc + i))));
    for (; i < n; i++) acc[i] = acc[i] * c + p * v[i];
}

/* out[T, H, D] = causal attention of each sequence's new tokens q[T, H, D] over its context in the
 * pages k/v[num_blocks, BS, Hkv, D]. The i-th of a sequence's
 * q_len new tokens sits at position seq_len - q_len + i and sees positions 0..itself. This is the
 * work-sharing loop, orphaned: it splits over the threads of the enclosing parallel region
 * (paged_attention_f32 below, or gantry_kernels/cpu_layer.c, which runs a whole decoder layer in one region). */
static void paged_attention_omp_for(const float *q, const float *k, const float *v, const int32_t *block_tables,
                                    int64_t max_blocks, const int32_t *query_start_loc, const int32_t *seq_lens,
                                    int64_t num_seqs, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t BS,
                                    float scale, float *out) {
    const int64_t group = H / Hkv, page_stride = BS * Hkv * D;
    {
        float *acc = malloc(sizeof(float) * D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < T * H; item++) {
            const int64_t t = item / H, h = item % H, kvh = h / group;
            int64_t lo = 0, hi = num_seqs - 1;  /* the sequence of token t: last start <= t */
            while (lo < hi) {
                const int64_t mid = (lo + hi + 1) / 2;
                if (query_start_loc[mid] <= t) lo = mid; else hi = mid - 1;
            }
            const int64_t s = lo;
            const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
            const int64_t pos = seq_lens[s] - q_len + (t - query_start_loc[s]);
            const int32_t *table = block_tables + s * max_blocks;
            const float *qv = q + (t * H + h) * D;
            float m = -INFINITY, l = 0.0f;
            for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
            for (int64_t j = 0; j <= pos; j++) {
                const int64_t off = (int64_t)table[j / BS] * page_stride + ((j % BS) * Hkv + kvh) * D;
                const float sc = dot(qv, k + off, D) * scale;
                if (sc > m) {  /* new maximum: rescale what was summed so far */
                    const float c = expf(m - sc);
                    l = l * c + 1.0f;
                    scale_add(acc, c, 1.0f, v + off, D);
                    m = sc;
                } else {
                    const float p = expf(sc - m);
                    l += p;
                    scale_add(acc, 1.0f, p, v + off, D);
                }
            }
            float *o = out + (t * H + h) * D;
            const float inv = 1.0f / l;
            for (int64_t d = 0; d < D; d++) o[d] = acc[d] * inv;
        }
        free(acc);
    }
}

void paged_attention_f32(const float *q, const float *k, const float *v, const int32_t *block_tables,
                         int64_t max_blocks, const int32_t *query_start_loc, const int32_t *seq_lens,
                         int64_t num_seqs, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t BS,
                         float scale, float *out, int num_threads) {
#pragma omp parallel num_threads(num_threads)
    paged_attention_omp_for(q, k, v, block_tables, max_blocks, query_start_loc, seq_lens, num_seqs, T, H, Hkv, D, BS,
                            scale, out);
}

/* k/v pages[slot] = key/value[t] for slot = slot_mapping[t] >= 0 (rows of Hkv * D floats). */
void store_kv_f32(const float *key, const float *value, float *k_cache, float *v_cache, const int64_t *slots,
                  int64_t T, int64_t row) {
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0) continue;
        for (int64_t i = 0; i < row; i++) {
            k_cache[slots[t] * row + i] = key[t * row + i];
            v_cache[slots[t] * row + i] = value[t * row + i];
        }
    }
}

/* RMSNorm of x[T, N] into out; with residual != NULL first res_out = x + residual, and the norm is
 * of that sum (vLLM's fused_add_rms_norm). Same arithmetic order as the torch reference up to the sum
 * of squares (float32 either way). */
void rms_norm_f32(const float *x, const float *residual, float *res_out, const float *w, float *out, int64_t T,
                  int64_t N, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * N;
        if (residual) {
            float *r = res_out + t * N;
            for (int64_t i = 0; i < N; i++) r[i] = xr[i] + residual[t * N + i];
            xr = r;
        }
        const float inv = 1.0f / sqrtf(dot(xr, xr, N) / (float)N + eps);
        for (int64_t i = 0; i < N; i++) out[t * N + i] = w[i] * (xr[i] * inv);
    }
}

/* NeoX rotary of q[T, Hq, D] and k[T, Hk, D] (token rows q_stride / k_stride floats apart, heads
 * contiguous) into contiguous q_out, k_out, from cos_sin[max_pos, D] (cos first half, sin second). */
void rotary_f32(const int64_t *positions, const float *q, int64_t q_stride, int64_t Hq, const float *k,
                int64_t k_stride, int64_t Hk, const float *cos_sin, int64_t D, int64_t T, float *q_out, float *k_out) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *cos = cos_sin + positions[t] * D, *sin = cos + half;
        for (int64_t which = 0; which < 2; which++) {
            const float *base = which ? k + t * k_stride : q + t * q_stride;
            const int64_t heads = which ? Hk : Hq;
            float *obase = which ? k_out + t * Hk * D : q_out + t * Hq * D;
            for (int64_t h = 0; h < heads; h++) {
                const float *x = base + h * D;
                float *o = obase + h * D;
                for (int64_t i = 0; i < half; i++) {
                    const float x1 = x[i], x2 = x[i + half];
                    o[i] = x1 * cos[i] - x2 * sin[i];
                    o[i + half] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}

/* out[T, d] = silu(x[:, :d]) * x[:, d:] for x[T, 2d] */
void silu_and_mul_f32(const float *x, float *out, int64_t T, int64_t d) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < d; i++) {
            const float g = x[t * 2 * d + i];
            out[t * d + i] = g / (1.0f + expf(-g)) * x[t * 2 * d + d + i];
        }
}
