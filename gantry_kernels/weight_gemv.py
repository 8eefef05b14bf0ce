"""The decode GEMV of dense weights: x [M, K] (bf16/fp16/fp32, M small) @ (w [N, K] (* scale [N])).T, w in
bf16/fp16 or e4m3 with a scale per row.
- FP8: at a decode step's few rows cuBLASLt's FP8 GEMM has a 4-16 us floor and the activations must first be
  quantized (a kernel of their own), so one stream decoded slower in FP8 than in bf16 on the H200; this kernel
  streams the e4m3 weights once (half bf16's bytes) and keeps the activations in their own dtype (W8A16: more
  precise than the W8A8 GEMM, never less).
- bf16 at one row: cuBLAS's GEMVs reach 0.52-0.84 of read bandwidth on W1's projections and split K behind a
  reduce kernel; programs of 4-8 whole rows here reach 0.70-0.98 with no second kernel
  (benchmarks/decode_gemv_bench.py). At two rows and more cuBLAS reads the weights once and wins.
- Pipelined tiles (NUM_STAGES > 1, through shared memory) keep a program's loads in flight while it multiplies: the
  FP8 sweep's winners are 1-2 warps pipelined 4-6 deep (gate_up 0.89 of read bandwidth, from 0.81). Prefetching a
  small layer's weights into L2 before the PDL wait (cp.async.bulk.prefetch) was measured and is slower (RESULTS.md).
Split-K programs write float32 partials that quant_gemv's kernel sums (and adds the bias to).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gantry_kernels.pdl import launch_kwargs, wait_prior
from gantry_kernels.quant_gemv import num_sms, split_k, split_output, sum_splits

MIN_PROGRAM_BYTES = 16384  # weight bytes a split-K program streams at least (fewer: latency, not bandwidth)
Config = tuple[int, int, int, int, int]  # (BLOCK_N, BLOCK_K, num_warps, num_splits, num_stages)
# (N, K, weight bytes an element) -> Config measured best at M = 1 on the H200, 2026-12-03 (python -m
# benchmarks.decode_gemv_bench --sweep --dtypes <fp8|bf16>: W1's shapes, weights rotated out of L2; 528 FP8 and 480
# bf16 configs); shapes not listed take gemv_config's rule. Pipelined tiles took W1's four FP8 projections from 73.2 to
# 67.2 µs a layer and bf16's from 121.3 to 117.9 (benchmarks/RESULTS.md, twenty-seventh session).
GEMV_TABLE: dict[tuple[int, int, int], Config] = {
    (4608, 3584, 2): (4, 1024, 4, 1, 4), (3584, 3584, 2): (4, 1024, 4, 1, 4), (37888, 3584, 2): (4, 512, 2, 1, 1),
    (3584, 18944, 2): (4, 1024, 4, 1, 3), (4608, 3584, 1): (8, 256, 1, 1, 6), (3584, 3584, 1): (4, 512, 1, 1, 4),
    (37888, 3584, 1): (8, 256, 2, 1, 6), (3584, 18944, 1): (4, 512, 1, 1, 4)}


@triton.jit
def _weight_tile(w_ptr, offs_n, n_ok, t, K, stride_wn, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile t's weights [BLOCK_N, BLOCK_K]: it starts on a BLOCK_K boundary (aligned vectors); with EVEN_K (whole
    tiles) its mask is constant along K, so the weights load as 16-byte vectors."""
    ks = t * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    k_ok = tl.full([BLOCK_K], 1, tl.int1) if EVEN_K else ks < K
    return tl.load(w_ptr + offs_n[:, None] * stride_wn + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _x_tile(x_row, t, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """x's values [BLOCK_K] for tile t, float32."""
    ks = t * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = tl.full([BLOCK_K], 1, tl.int1) if EVEN_K else ks < K
    return tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["tiles_per_split"])
def _weight_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,  # x [M, K]; w [N, K]; ws [N] float32; out [splits, M, N] or [M, N]
    N, K, stride_xm, stride_wn, stride_os, stride_om, tiles_per_split,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    """Row m, BLOCK_N outputs, this split's K range in [BLOCK_N, BLOCK_K] tiles (16-byte loads along K). With
    NUM_STAGES > 1 the tiles after the first stream through shared memory NUM_STAGES - 1 ahead (Triton's software
    pipeliner: cp.async), so a program keeps loads in flight while it multiplies."""
    m = tl.program_id(0)  # fastest: the rows sharing a weight tile run together and hit L2
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = offs_n < N
    t_start = pid_s * tiles_per_split  # split_k leaves no split empty
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PDL:  # gantry_kernels/pdl.py: the first tile's weights in flight while the kernel before finishes
        w = _weight_tile(w_ptr, offs_n, n_ok, t_start, K, stride_wn, EVEN_K, BLOCK_K)
        wait_prior(PDL)
        acc += w.to(tl.float32) * _x_tile(x_row, t_start, K, EVEN_K, BLOCK_K)[None, :]
        t_first = t_start + 1
    else:
        t_first = t_start
    for t in tl.range(t_first, t_end, num_stages=NUM_STAGES):
        w = _weight_tile(w_ptr, offs_n, n_ok, t, K, stride_wn, EVEN_K, BLOCK_K)
        acc += w.to(tl.float32) * _x_tile(x_row, t, K, EVEN_K, BLOCK_K)[None, :]
    out = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_SCALE:  # the row's scale
        out *= tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def gemv_config(n: int, k: int, m: int, sms: int, elem_bytes: int) -> Config:
    """(BLOCK_N, BLOCK_K, num_warps, num_splits, num_stages) for weights of elem_bytes an element: the measured
    table, else a rule. bf16: 8 whole rows a program in tiles of 512 columns on 4 warps, not pipelined. FP8: 4 rows
    on one warp, pipelined 4 deep (on the H200, 2026-12-03, 0.78-0.80x the 4-warp loop's time a layer on 8B and
    32B shapes, 0.91x on 0.5B ones; bf16 gained 3% and lost on small shapes, so it keeps its rule). Both split K
    until about 4 programs of 8 rows an SM, each split streaming >= MIN_PROGRAM_BYTES over 8 rows."""
    if (n, k, elem_bytes) in GEMV_TABLE:
        return GEMV_TABLE[(n, k, elem_bytes)]
    block_k = min(512, max(64, triton.next_power_of_2(k)))
    max_splits = max(1, k // max(block_k, MIN_PROGRAM_BYTES // (8 * elem_bytes)))
    splits = max(1, min(triton.cdiv(4 * sms, triton.cdiv(n, 8) * m), max_splits))
    if elem_bytes == 1:
        return 4, block_k, 1, splits, 4
    return 8, block_k, 4, splits, 1


def weight_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x [M, K] (unit stride in K), weight [N, K] (bf16/fp16/float8_e4m3fn, unit stride in K), weight_scale
    float32 [N] or one per-tensor value (None: unscaled) -> [M, N] in x's dtype: x @ (weight * scale).T (+ bias)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1, "rows must be contiguous"
    block_n, block_k, num_warps, num_splits, num_stages = config or gemv_config(n, k, m, num_sms(x.device),
                                                                            weight.element_size())
    tiles_per_split, num_splits = split_k(triton.cdiv(k, block_k), num_splits)
    scale = None if weight_scale is None else weight_scale.float().reshape(-1).expand(n).contiguous()  # [N]
    out, part = split_output(m, n, num_splits, x.dtype, x.device)
    has_bias = bias is not None and num_splits == 1
    unused = out  # a pointer never read
    _weight_gemv_kernel[(m, triton.cdiv(n, block_n), num_splits)](
        x, weight, unused if scale is None else scale, bias if has_bias else unused, part, n, k, x.stride(0),
        weight.stride(0), part.stride(0) if num_splits > 1 else 0, part.stride(-2), tiles_per_split,
        HAS_SCALE=scale is not None, HAS_BIAS=has_bias, EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k,
        NUM_STAGES=num_stages, num_warps=num_warps, **launch_kwargs(x.device))
    if num_splits > 1:
        sum_splits(part, out, bias)
    return out
