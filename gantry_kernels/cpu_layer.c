/* One Llama decoder layer in one call on an AVX2+FMA CPU: norm (with the residual add), qkv matmul,
 * NeoX rotary, KV store, paged attention, o matmul, residual add and norm, gate_up matmul, SiLU-and-mul,
 * down matmul. Built at first use by gantry_kernels/cpu_native.py. The ops are the functions of
 * cpu_attention.c and ggml_cpu.c (the same arithmetic, so the same outputs as one call per op); they
 * run in one OpenMP region, so no Python and no thread wake-up sits between them. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attention.c"
#include "../engine/layers/quant/ggml_cpu.c"

/* A quantized weight [N, K] as ggml blocks. */
typedef struct {
    const uint8_t *blocks;
    int64_t type, N, K;
} gg_weight;

typedef struct {
    /* shapes */
    int64_t T, hidden, H, Hkv, D, inter;
    float eps, scale;
    /* weights */
    const float *w_in_norm, *w_post_norm, *cos_sin;
    gg_weight qkv, o, gate_up, down;
    /* paged KV and the step's metadata */
    float *k_cache, *v_cache;
    int64_t block_size, max_blocks, num_seqs;
    const int64_t *positions, *slot_mapping;
    const int32_t *block_tables, *query_start_loc, *seq_lens;
    /* in: x [T, hidden], residual [T, hidden] or NULL; out: out, res_out [T, hidden] */
    const float *x, *residual;
    float *out, *res_out;
} llama_layer_args;

/* each token's k (contiguous rows) and v (rows v_stride apart) into its page slot (-1: padding) */
static void store_kv_rows(const float *key, const float *value, int64_t v_stride, float *k_cache, float *v_cache,
                          const int64_t *slots, int64_t row, int64_t T) {
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0) continue;
        memcpy(k_cache + slots[t] * row, key + t * row, sizeof(float) * row);
        memcpy(v_cache + slots[t] * row, value + t * v_stride, sizeof(float) * row);
    }
}

/* Returns 0, or -1 when a scratch buffer could not be allocated (nothing written then). Five barriers
 * a layer (after the qkv matmul, the KV store, attention, o and gate_up): the norms (and SiLU for a few
 * tokens) are computed by every thread on its own copy rather than by one thread while the others wait,
 * since with OMP_WAIT_POLICY=PASSIVE (engine.serve's default) each barrier is a futex sleep and wake. */
int llama_layer_f32(const llama_layer_args *a, int num_threads) {
    const int64_t T = a->T, Hd = a->hidden, I = a->inter, qd = a->H * a->D, kvd = a->Hkv * a->D,
                  nqkv = qd + 2 * kvd, per_thread = 2 * T * Hd + T * I;
    const int64_t sizes[] = {T * nqkv, T * qd, T * kvd, T * qd, T * Hd, T * 2 * I, T * I, num_threads * per_thread};
    int64_t total = 0;
    for (int i = 0; i < 8; i++) total += sizes[i];
    float *scratch = malloc(sizeof(float) * total);
    if (!scratch) return -1;
    float *qkv = scratch, *q = qkv + sizes[0], *k = q + sizes[1], *attn = k + sizes[2], *o = attn + sizes[3],
          *gu = o + sizes[4], *act_shared = gu + sizes[5], *priv = act_shared + sizes[6];
    const int private_silu = T <= 8;  /* more tokens: SiLU split over the threads, one barrier more */
#pragma omp parallel num_threads(num_threads)
    {
        const int tid = omp_get_thread_num();
        float *normed = priv + tid * per_thread, *res = normed + T * Hd, *act = res + T * Hd;
        const float *res_in = a->x;  /* the first layer: the residual is the embedding itself */
        if (a->residual) {
            rms_norm_f32(a->x, a->residual, res, a->w_in_norm, normed, T, Hd, a->eps);
            res_in = res;
        } else {
            rms_norm_f32(a->x, NULL, NULL, a->w_in_norm, normed, T, Hd, a->eps);
        }
        gemm_omp_for((int)a->qkv.type, a->qkv.blocks, nqkv, Hd, normed, T, qkv);
#pragma omp single
        {
            rotary_f32(a->positions, qkv, nqkv, a->H, qkv + qd, nqkv, a->Hkv, a->cos_sin, a->D, T, q, k);
            store_kv_rows(k, qkv + qd + kvd, nqkv, a->k_cache, a->v_cache, a->slot_mapping, kvd, T);
        }
        paged_attention_omp_for(q, a->k_cache, a->v_cache, a->block_tables, a->max_blocks, a->query_start_loc,
                                a->seq_lens, a->num_seqs, T, a->H, a->Hkv, a->D, a->block_size, a->scale, attn);
        gemm_omp_for((int)a->o.type, a->o.blocks, Hd, qd, attn, T, o);
        /* res = o + res_in, element by element (res_in may be res itself) */
        rms_norm_f32(o, res_in, res, a->w_post_norm, normed, T, Hd, a->eps);
        if (tid == 0) memcpy(a->res_out, res, sizeof(float) * T * Hd);
        gemm_omp_for((int)a->gate_up.type, a->gate_up.blocks, 2 * I, Hd, normed, T, gu);
        if (private_silu) {
            silu_and_mul_f32(gu, act, T, I);
        } else {
            act = act_shared;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++) silu_and_mul_f32(gu + t * 2 * I, act + t * I, 1, I);
        }
        gemm_omp_for((int)a->down.type, a->down.blocks, Hd, I, act, T, a->out);
    }
    free(scratch);
    return 0;
}
