/* ggml Q4_0 / Q4_1 / Q8_0 blocks and Q4_K / Q5_K / Q6_K super-blocks times float32 activations on an
 * AVX2+FMA+F16C CPU, and dequantization of block rows. Built at first use by
 * engine/layers/quant/ggml_cpu.py (and #included by gantry_kernels/cpu_layer.c). ggml_dequant gives exactly
 * gguf.dequantize's values (d*(q-8), d*q+m, d*q: one rounding at most, and fma rounds once; the K-quants'
 * sub-block scale times a quant is exact, so d*q - m rounds once too); the 32-weight matmul multiplies the
 * unscaled quants in registers and scales per block, the K-quant one dequantizes one 256-weight
 * super-block at a time into the stack (nothing tensor-sized is written). */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

static inline int block_bytes(int type) {
    switch (type) {
        case Q4_0: return 18;
        case Q4_1: return 20;
        case Q4_K: return 144;
        case Q5_K: return 176;
        case Q6_K: return 210;
        default: return 34;
    }
}
static inline int is_k_quant(int type) { return type == Q4_K || type == Q5_K || type == Q6_K; }
static inline int block_size(int type) { return is_k_quant(type) ? 256 : 32; }

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

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 32 quants of a block as floats q[0..3] (weights 0-7, 8-15, 16-23, 24-31), unscaled: Q4 nibbles
 * 0..15 (the offset, m or -8d, is applied once per block through the activations' block sums), Q8 int8. */
static inline __attribute__((always_inline)) void block_quants(const int type, const uint8_t *b, __m256 q[4]) {
    if (type == Q8_0) {
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i))));
        return;
    }
    __m128i raw = _mm_loadu_si128((const __m128i *)(b + (type == Q4_1 ? 4 : 2)));
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

/* The sum of one block of activations (32 floats), for the offset term of Q4 blocks. */
static inline float block_sum(const float *p) {
    return hsum8(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                               _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24))));
}

/* Rows [n0, n1) of y[M, N] = x[M, K] @ W[N, K]^T, with xs[M, nb] the activations' block sums (Q4 only).
 * Per block: y += d * (q . x) + offset * sum(x), where offset = m (Q4_1) or -8d (Q4_0): the quants are
 * converted once per tile of MT activation rows, never scaled (llama.cpp's order of operations).
 * Every activation row is computed the same way whatever M is: a request's logits do not depend on its
 * batch. */
static inline __attribute__((always_inline)) void gemm_tile(const int type, const int MT, const uint8_t *row,
                                                            int64_t nb, int64_t K, const float *x, const float *xs,
                                                            float *y, int64_t y_stride) {
    const int bb = block_bytes(type);
    __m256 acc[8];
    for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        __m256 q[4];
        block_quants(type, blk, q);
        const __m256 d = _mm256_set1_ps(f16(blk));
        for (int i = 0; i < MT; i++) {
            const float *xp = x + i * K + b * 32;
            __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xp), q[0]);
            s = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 8), q[1], s);
            s = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 16), q[2], s);
            s = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 24), q[3], s);
            acc[i] = _mm256_fmadd_ps(d, s, acc[i]);
        }
    }
    float off[8] = {0};
    if (type != Q8_0)  /* the offset term, block by block in order (the same sum for any MT) */
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bb;
            const float m = type == Q4_1 ? f16(blk + 2) : -8.0f * f16(blk);
            /* xs: the block sums computed once per call; NULL (no memory for them): summed here */
            for (int i = 0; i < MT; i++)
                off[i] = fmaf(m, xs ? xs[i * nb + b] : block_sum(x + i * K + b * 32), off[i]);
        }
    for (int i = 0; i < MT; i++) y[i * y_stride] = type == Q8_0 ? hsum8(acc[i]) : hsum8(acc[i]) + off[i];
}

static inline __attribute__((always_inline)) void gemm_rows_t(const int type, const uint8_t *w, int64_t N,
                                                              int64_t K, const float *x, const float *xs, int64_t M,
                                                              float *y, int64_t n0, int64_t n1) {
    const int64_t nb = K / 32, row_bytes = nb * block_bytes(type);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * row_bytes;
        int64_t m0 = 0;
        for (; m0 + 8 <= M; m0 += 8)
            gemm_tile(type, 8, row, nb, K, x + m0 * K, xs ? xs + m0 * nb : NULL, y + m0 * N + n, N);
        const float *xt = x + m0 * K, *xst = xs ? xs + m0 * nb : NULL;
        float *yt = y + m0 * N + n;
        switch (M - m0) {  /* constant tile sizes: the accumulators stay in registers */
            case 1: gemm_tile(type, 1, row, nb, K, xt, xst, yt, N); break;
            case 2: gemm_tile(type, 2, row, nb, K, xt, xst, yt, N); break;
            case 3: gemm_tile(type, 3, row, nb, K, xt, xst, yt, N); break;
            case 4: gemm_tile(type, 4, row, nb, K, xt, xst, yt, N); break;
            case 5: gemm_tile(type, 5, row, nb, K, xt, xst, yt, N); break;
            case 6: gemm_tile(type, 6, row, nb, K, xt, xst, yt, N); break;
            case 7: gemm_tile(type, 7, row, nb, K, xt, xst, yt, N); break;
            default: break;
        }
    }
}

/* Q4_K / Q5_K's 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes (gguf's get_scale_min). */
static inline void scale_min_k4(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 0x3F;
        *mn = s[j + 4] & 0x3F;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

/* One 256-weight super-block into out[0..255], gguf.dequantize's arithmetic and order. */
static inline __attribute__((always_inline)) void dequant_super(const int type, const uint8_t *b, float *out) {
    if (type == Q6_K) {  /* ql[128], qh[64], int8 scales[16], f16 d; 16 sub-blocks of 16 */
        const float d = f16(b + 208);
        const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03);
        const __m256i k32 = _mm256_set1_epi32(32);
        for (int half = 0; half < 2; half++) {  /* 128 weights: ql[64] nibbles, qh[32] bit pairs, 8 scales */
            const uint8_t *ql = b + 64 * half, *qh = b + 128 + 32 * half;
            const int8_t *sc = (const int8_t *)(b + 192) + 8 * half;
            float *y = out + 128 * half;
            for (int l = 0; l < 32; l += 16) {  /* weights l.. of each quarter; sub-block scale sc[l / 16 + 2q] */
                const __m128i a = _mm_loadu_si128((const __m128i *)(ql + l));
                const __m128i c = _mm_loadu_si128((const __m128i *)(ql + l + 32));
                const __m128i h = _mm_loadu_si128((const __m128i *)(qh + l));
                __m128i q[4];
                q[0] = _mm_or_si128(_mm_and_si128(a, m4), _mm_slli_epi16(_mm_and_si128(h, m2), 4));
                q[1] = _mm_or_si128(_mm_and_si128(c, m4), _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 2), m2), 4));
                q[2] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), m4),
                                    _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 4), m2), 4));
                q[3] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(c, 4), m4),
                                    _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 6), m2), 4));
                for (int k = 0; k < 4; k++) {  /* quarter k: weights 32k + l.. , (d * sc) * (q - 32) */
                    const __m256 ds = _mm256_set1_ps(d * (float)sc[l / 16 + 2 * k]);
                    const __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(q[k]), k32));
                    const __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(q[k], 8)), k32));
                    _mm256_storeu_ps(y + 32 * k + l, _mm256_mul_ps(ds, lo));
                    _mm256_storeu_ps(y + 32 * k + l + 8, _mm256_mul_ps(ds, hi));
                }
            }
        }
        return;
    }
    /* Q4_K / Q5_K: f16 d, f16 dmin, scales[12], (Q5_K: qh[32]), qs[128]; 8 sub-blocks of 32 */
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + (type == Q5_K ? 48 : 16);
    for (int s = 0; s < 8; s++) {
        int sc, mn;
        scale_min_k4(scales, s, &sc, &mn);
        /* ds * v is exact, so fma(ds, v, -dm) rounds once, as gguf's d * q - dm does */
        const __m256 ds = _mm256_set1_ps(d * (float)sc), ndm = _mm256_set1_ps(-(dmin * (float)mn));
        const __m128i shift = _mm_cvtsi32_si128(4 * (s % 2)), mask = _mm_set1_epi8(0x0F);
        for (int i = 0; i < 32; i += 16) {
            __m128i v = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(qs + 32 * (s / 2) + i)), shift), mask);
            if (type == Q5_K) {  /* bit s of qh[i] is the fifth bit of sub-block s's weight i */
                __m128i h = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(qh + i)), _mm_cvtsi32_si128(s)),
                                          _mm_set1_epi8(1));
                v = _mm_or_si128(v, _mm_slli_epi16(h, 4));
            }
            const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
            _mm256_storeu_ps(out + 32 * s + i, _mm256_fmadd_ps(ds, lo, ndm));
            _mm256_storeu_ps(out + 32 * s + i + 8, _mm256_fmadd_ps(ds, hi, ndm));
        }
    }
}

/* Rows [n0, n1) of y[M, N] = x[M, K] @ W[N, K]^T for a K-quant W: each super-block dequantized once per
 * tile of MT activation rows into the stack, then each 8 weights loaded once for the MT rows. */
static inline __attribute__((always_inline)) void gemm_tile_k(const int type, const int MT, const uint8_t *row,
                                                              int64_t nsb, int64_t K, const float *x, float *y,
                                                              int64_t y_stride) {
    const int bb = block_bytes(type);
    float w[256] __attribute__((aligned(32)));
    __m256 acc[8];
    for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        dequant_super(type, row + b * bb, w);
        const float *xb = x + b * 256;
        for (int j = 0; j < 256; j += 8) {
            const __m256 wv = _mm256_load_ps(w + j);
            for (int i = 0; i < MT; i++) acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + i * K + j), acc[i]);
        }
    }
    for (int i = 0; i < MT; i++) y[i * y_stride] = hsum8(acc[i]);
}

static inline __attribute__((always_inline)) void gemm_rows_k_t(const int type, const uint8_t *w, int64_t N,
                                                                int64_t K, const float *x, int64_t M, float *y,
                                                                int64_t n0, int64_t n1) {
    const int64_t nsb = K / 256, row_bytes = nsb * block_bytes(type);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * row_bytes;
        int64_t m0 = 0;
        for (; m0 + 8 <= M; m0 += 8) gemm_tile_k(type, 8, row, nsb, K, x + m0 * K, y + m0 * N + n, N);
        const float *xt = x + m0 * K;
        float *yt = y + m0 * N + n;
        switch (M - m0) {  /* constant tile sizes: the accumulators stay in registers, one dequantization */
            case 1: gemm_tile_k(type, 1, row, nsb, K, xt, yt, N); break;
            case 2: gemm_tile_k(type, 2, row, nsb, K, xt, yt, N); break;
            case 3: gemm_tile_k(type, 3, row, nsb, K, xt, yt, N); break;
            case 4: gemm_tile_k(type, 4, row, nsb, K, xt, yt, N); break;
            case 5: gemm_tile_k(type, 5, row, nsb, K, xt, yt, N); break;
            case 6: gemm_tile_k(type, 6, row, nsb, K, xt, yt, N); break;
            case 7: gemm_tile_k(type, 7, row, nsb, K, xt, yt, N); break;
            default: break;
        }
    }
}

static void gemm_rows_k(int type, const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M, float *y,
                        int64_t n0, int64_t n1) {
    switch (type) {  /* one specialized copy per K-quant type */
        case Q4_K: gemm_rows_k_t(Q4_K, w, N, K, x, M, y, n0, n1); break;
        case Q5_K: gemm_rows_k_t(Q5_K, w, N, K, x, M, y, n0, n1); break;
        default: gemm_rows_k_t(Q6_K, w, N, K, x, M, y, n0, n1); break;
    }
}

static void gemm_rows(int type, const uint8_t *w, int64_t N, int64_t K, const float *x, const float *xs, int64_t M,
                      float *y, int64_t n0, int64_t n1) {
    if (is_k_quant(type)) {
        gemm_rows_k(type, w, N, K, x, M, y, n0, n1);
        return;
    }
    switch (type) {  /* one specialized copy per block type */
        case Q4_0: gemm_rows_t(Q4_0, w, N, K, x, xs, M, y, n0, n1); break;
        case Q4_1: gemm_rows_t(Q4_1, w, N, K, x, xs, M, y, n0, n1); break;
        default: gemm_rows_t(Q8_0, w, N, K, x, xs, M, y, n0, n1); break;
    }
}

#define GEMM_CHUNK 16
/* The work-sharing loop of ggml_gemm, orphaned: it splits over the threads of the enclosing parallel
 * region (gantry_kernels/cpu_layer.c runs a whole decoder layer in one region). Rows are dealt dynamically:
 * on a shared CPU a descheduled thread would otherwise hold the whole matmul up. Each thread sums the
 * activations' blocks itself (M * K adds against N * M * K multiply-adds). */
static void gemm_omp_for(int type, const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M, float *y) {
    const int64_t nb = K / 32;
    float *xs = type == Q8_0 || is_k_quant(type) ? NULL : malloc(sizeof(float) * M * nb);
    if (xs)
        for (int64_t i = 0; i < M * nb; i++) xs[i] = block_sum(x + i * 32);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < (N + GEMM_CHUNK - 1) / GEMM_CHUNK; c++) {
        const int64_t n0 = c * GEMM_CHUNK, n1 = n0 + GEMM_CHUNK < N ? n0 + GEMM_CHUNK : N;
        gemm_rows(type, w, N, K, x, xs, M, y, n0, n1);
    }
    free(xs);
}

/* y[M, N] = x[M, K] @ W[N, K]^T, W as N rows of K/32 blocks. M is small (decode). */
void ggml_gemm(int type, const uint8_t *w, int64_t N, int64_t K, const float *x, int64_t M, float *y,
               int num_threads) {
#pragma omp parallel num_threads(num_threads)
    gemm_omp_for(type, w, N, K, x, M, y);
}

/* out[len(rows), K] float32 = the rows `rows` of W (rows == NULL: rows 0..num_rows-1). */
void ggml_dequant(int type, const uint8_t *w, int64_t K, const int64_t *rows, int64_t num_rows, float *out,
                  int num_threads) {
    const int64_t nb = K / block_size(type), row_bytes = nb * block_bytes(type);
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (int64_t r = 0; r < num_rows; r++) {
        const uint8_t *row = w + (rows ? rows[r] : r) * row_bytes;
        if (is_k_quant(type)) {
            for (int64_t b = 0; b < nb; b++) dequant_super(type, row + b * block_bytes(type), out + r * K + b * 256);
            continue;
        }
        for (int64_t b = 0; b < nb; b++) {
            __m256 wv[4];
            dequant_block(type, row + b * block_bytes(type), wv);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(out + r * K + b * 32 + 8 * i, wv[i]);
        }
    }
}
