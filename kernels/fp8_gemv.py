"""Weight-only FP8 GEMV for decode: x [M, K] (bf16/fp16/fp32, M small) @ (w_fp8 [N, K] * scale [N]).T.
At a decode step's few rows cuBLASLt's FP8 GEMM has a 4-16 us floor and the activations must first be
quantized (a kernel of their own), so one stream decoded slower in FP8 than in bf16 on the H200; this
kernel streams the e4m3 weights once (half bf16's bytes) and keeps the activations in their own dtype
(W8A16: more precise than the W8A8 GEMM, never less). Split-K programs write float32 partials that
quant_gemv's kernel sums (and adds the bias to).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_gemv import num_sms, split_k, split_output, sum_splits

MIN_PROGRAM_BYTES = 16384  # weight bytes a split-K program streams at least (fewer: latency, not bandwidth)
# (N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_splits) measured best at M = 1 on the H200, 2026-12-01
# (python -m benchmarks.fp8_bench --parts gemv-sweep: W1's shapes); shapes not listed take gemv_config's rule
GEMV_TABLE: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (4608, 3584): (128, 128, 8, 8), (3584, 3584): (32, 512, 8, 1), (37888, 3584): (32, 256, 8, 1),
    (3584, 18944): (64, 256, 8, 10)}


@triton.jit(do_not_specialize=["tiles_per_split"])
def _fp8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,  # x [M, K]; w [N, K] e4m3; ws [N] float32; out [splits, M, N] or [M, N]
    N, K, stride_xm, stride_wn, stride_os, stride_om, tiles_per_split,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row m, BLOCK_N outputs, this split's K range in [BLOCK_N, BLOCK_K] tiles (16-byte loads along K)."""
    m = tl.program_id(0)  # fastest: the rows sharing a weight tile run together and hit L2
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = offs_n < N
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for t in range(t_start, t_end):
        ks = t * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]: starts on a BLOCK_K boundary (aligned vectors)
        # EVEN_K (whole tiles): a mask constant along K, so the weights load as 16-byte vectors
        k_ok = tl.full([BLOCK_K], 1, tl.int1) if EVEN_K else ks < K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xk = tl.load(x_ptr + m * stride_xm + ks, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        acc += w.to(tl.float32) * xk[None, :]
    out = tl.sum(acc, axis=1) * tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)  # [BLOCK_N]: the row's scale
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def gemv_config(n: int, k: int, m: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_splits): 64 rows x 128 bytes (8 KB a tile, 64 values a thread on 4
    warps), K split until about 4 programs an SM, each streaming >= MIN_PROGRAM_BYTES."""
    if (n, k) in GEMV_TABLE:
        return GEMV_TABLE[(n, k)]
    block_n, block_k = 64, 128
    programs = triton.cdiv(n, block_n) * m
    max_splits = max(1, k // max(block_k, MIN_PROGRAM_BYTES // block_n))
    return block_n, block_k, 4, max(1, min(triton.cdiv(4 * sms, programs), max_splits))


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (unit stride in K), weight [N, K] float8_e4m3fn (rows contiguous), weight_scale float32 [N]
    (or one per-tensor value) -> [M, N] in x's dtype: x @ (weight * weight_scale[:, None]).T (+ bias)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1, "rows must be contiguous"
    block_n, block_k, num_warps, num_splits = config or gemv_config(n, k, m, num_sms(x.device))
    tiles_per_split, num_splits = split_k(triton.cdiv(k, block_k), num_splits)
    scale = weight_scale.float().reshape(-1).expand(n).contiguous()  # [N]
    out, part = split_output(m, n, num_splits, x.dtype, x.device)
    has_bias = bias is not None and num_splits == 1
    _fp8_gemv_kernel[(m, triton.cdiv(n, block_n), num_splits)](
        x, weight, scale, bias if has_bias else scale, part, n, k, x.stride(0), weight.stride(0),
        part.stride(0) if num_splits > 1 else 0, part.stride(-2), tiles_per_split,
        HAS_BIAS=has_bias, EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    if num_splits > 1:
        sum_splits(part, out, bias)
    return out
