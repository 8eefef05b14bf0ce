/* ggml Q4_0 / Q4_1 / Q8_0 blocks times float32 activations on an AVX2+FMA+F16C CPU, and
 * dequantization of block rows. Built at first use by engine/layers/quant/ggml_cpu.py.
 * Weights are dequantized exactly as gguf.dequantize does (d*(q-8), d*q+m, d*q: one rounding at
 * most, and fma rounds once), then multiplied in registers: nothing float-sized is written. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };

static inline int block_bytes(int type) { return type == Q4_0 ? 18 : type == Q4_1 ? 20 : 34; }

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 32 weights of one block into w[0..3] (weights 0-7, 8-15, 16-23, 24-31). */
static inline void dequant_block(int type, const uint8_t *b, __m256 w[4]) {
    __m256 d = _mm256_set1_ps(f16(b));
    if (type == Q8_0) {
        const uint8_t *qs = b + 2;
        for (int i = 0; i < 4; i++) {
            __m128i q8 = _mm_loadl_epi64((const __m128i *)(qs + 8 * i));
            w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
        }
        return;
    }
    /* low nibbles of the 16 bytes are weights 0-15, high nibbles 16-31 */
    __m256 m = type == Q4_1 ? _mm256_set1_ps(f16(b + 2)) : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
    __m128i raw = _mm_loadu_si128((const __m128i *)(b + (type == Q4_1 ? 4 : 2)));
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    w[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), m);
    w[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), m);
    w[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), m);
    w[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), m);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[M, N] = x[M, K] @ W[N, K]^T, W as N rows of K/32 blocks. M is small (decode): each block is
 * dequantized once per tile of 8 activation rows. Rows are dealt dynamically: on a shared CPU a
 * descheduled thread would otherwise hold the whole matmul up. */
void ggml_gemm(int type, const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M, float *y,
               int num_threads) {
    const int64_t nb = K / 32, row_bytes = nb * block_bytes(type);
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int mt = M - m0 < 8 ? (int)(M - m0) : 8;
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m256 wv[4];
                dequant_block(type, row + b * block_bytes(type), wv);
                for (int i = 0; i < mt; i++) {
                    const float *xp = x + (m0 + i) * K + b * 32;
                    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(xp), wv[0]);
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 8), wv[1], a);
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 16), wv[2], a);
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 24), wv[3], a);
                    acc[i] = _mm256_add_ps(acc[i], a);
                }
            }
            for (int i = 0; i < mt; i++) y[(m0 + i) * N + n] = hsum(acc[i]);
        }
    }
}

/* out[len(rows), K] float32 = the rows `rows` of W (rows == NULL: rows 0..num_rows-1). */
void ggml_dequant(int type, const uint8_t *w, int64_t K, const int64_t *rows, int64_t num_rows, float *out,
                  int num_threads) {
    const int64_t nb = K / 32, row_bytes = nb * block_bytes(type);
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (int64_t r = 0; r < num_rows; r++) {
        const uint8_t *row = w + (rows ? rows[r] : r) * row_bytes;
        for (int64_t b = 0; b < nb; b++) {
            __m256 wv[4];
            dequant_block(type, row + b * block_bytes(type), wv);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(out + r * K + b * 32 + 8 * i, wv[i]);
        }
    }
}
