"""Triton FP8 GEMM with row-wise scales for decode-sized batches: y = (xq @ wq^T) * x_scale * w_scale + bias.

xq [M, K] and wq [N, K] are float8_e4m3fn, K contiguous (wq is the FP8 linear's weight as stored); x_scale [M]
and w_scale [N] are float32; y [M, N] is bf16/fp16. tl.dot on Hopper runs FP8 wgmma. For small M, cuBLASLt's
row-wise kernels use 128 x 128 tiles and no split, so N = 3584 at M = 256 fills 56 of 132 SMs; here the tile
and the split of K come from a table per (N, K, M bucket) that benchmarks/fp8_gemm_sweep.py writes. With
SPLIT_K > 1 each split writes its float32 partial [SPLIT_K, M, N] and _split_epilogue_kernel sums them, scales
and adds the bias (deterministic; no atomics). Hopper's FP8 MMA keeps ~14 bits in its accumulator, so each
K tile's products are summed apart and added in float32 (max_num_imprecise_acc; Triton's sm_90 default never
promotes), as cuBLASLt does without fast accumulation; fast_accum=True skips the promotion (use_fast_accum).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# (N, K, M bucket) -> config where this kernel beat torch._scaled_mm in `python3 -m benchmarks.fp8_gemm_sweep`
# on an H200 (twenty-second session, fast accumulation on both sides; at M = 128-256 cuBLASLt mostly wins); the
# M bucket is the smallest of
# M_BUCKETS at or above M. Other shapes and M go to cuBLASLt. Fields: block_m, block_n, block_k, split_k,
# num_warps, num_stages.
M_BUCKETS = (16, 32, 64, 128, 256)
GEMM_TABLE: dict[tuple[int, int, int], GemmConfig] = {
    # W1 qkv_proj
    (4608, 3584, 16): GemmConfig(64, 128, 128, 8, 4, 3),
    (4608, 3584, 32): GemmConfig(64, 64, 128, 4, 4, 4),
    (4608, 3584, 64): GemmConfig(64, 128, 128, 2, 4, 4),
    (4608, 3584, 128): GemmConfig(64, 128, 128, 1, 4, 4),
    # W1 o_proj
    (3584, 3584, 16): GemmConfig(64, 128, 128, 4, 4, 4),
    (3584, 3584, 32): GemmConfig(64, 128, 128, 4, 4, 4),
    (3584, 3584, 64): GemmConfig(64, 128, 128, 4, 4, 4),
    (3584, 3584, 128): GemmConfig(64, 128, 128, 2, 4, 4),
    (3584, 3584, 256): GemmConfig(64, 128, 128, 1, 4, 4),
    # W1 gate_up_proj
    (37888, 3584, 16): GemmConfig(64, 128, 128, 1, 4, 3),
    (37888, 3584, 32): GemmConfig(64, 128, 128, 1, 4, 3),
    (37888, 3584, 64): GemmConfig(64, 128, 128, 1, 4, 3),
    # W1 down_proj
    (3584, 18944, 16): GemmConfig(64, 64, 128, 8, 4, 3),
    (3584, 18944, 32): GemmConfig(64, 64, 128, 8, 4, 3),
    (3584, 18944, 64): GemmConfig(64, 64, 128, 4, 4, 4),
    (3584, 18944, 128): GemmConfig(64, 128, 128, 4, 4, 4),
    (3584, 18944, 256): GemmConfig(128, 256, 128, 4, 8, 4),
    # W3 qkv_proj
    (7168, 5120, 16): GemmConfig(64, 128, 128, 4, 4, 3),
    (7168, 5120, 32): GemmConfig(64, 64, 128, 2, 4, 4),
    (7168, 5120, 64): GemmConfig(64, 64, 128, 2, 4, 4),
    # W3 o_proj
    (5120, 5120, 16): GemmConfig(64, 256, 128, 4, 4, 4),
    (5120, 5120, 32): GemmConfig(64, 64, 128, 4, 4, 4),
    (5120, 5120, 64): GemmConfig(64, 64, 128, 4, 4, 4),
    (5120, 5120, 128): GemmConfig(64, 64, 128, 2, 4, 4),
    # W3 gate_up_proj
    (55296, 5120, 16): GemmConfig(64, 256, 128, 1, 4, 4),
    (55296, 5120, 32): GemmConfig(64, 128, 128, 1, 4, 4),
    (55296, 5120, 64): GemmConfig(64, 128, 128, 1, 4, 4),
    (55296, 5120, 128): GemmConfig(128, 256, 128, 1, 8, 4),
    # W3 down_proj
    (5120, 27648, 16): GemmConfig(64, 128, 128, 4, 4, 4),
    (5120, 27648, 32): GemmConfig(64, 64, 128, 4, 4, 4),
    (5120, 27648, 64): GemmConfig(64, 64, 128, 4, 4, 4),
    (5120, 27648, 128): GemmConfig(128, 256, 128, 4, 8, 4),
}


def m_bucket(m: int) -> int | None:
    return next((b for b in M_BUCKETS if m <= b), None)


def config_for(m: int, n: int, k: int) -> GemmConfig | None:
    """The table's config for this shape, None where cuBLASLt is the faster (or the unmeasured) choice."""
    return GEMM_TABLE.get((n, k, m_bucket(m)))


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,  # [M, K] float8_e4m3fn
    w_ptr,  # [N, K] float8_e4m3fn
    out_ptr,  # [M, N] bf16/fp16, written when SPLIT_K == 1
    a_scale_ptr,  # [M] float32
    w_scale_ptr,  # [N] float32
    bias_ptr,  # [N], read when HAS_BIAS
    part_ptr,  # [SPLIT_K, M, N] float32, written when SPLIT_K > 1
    M, N, K,
    stride_am, stride_wn, stride_om,
    K_PER_SPLIT,  # a multiple of BLOCK_K; the last split may get fewer tiles
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    FAST_ACCUM: tl.constexpr,  # no float32 promotion per K tile (Triton's sm_90 default for FP8 dots)
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles sweep the same weight columns together, so a weight tile is read
    # from DRAM once and from L2 by the other row tiles
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    ra = rm % M  # rows past M re-read row (rm % M); their results are not stored: no masks in the loop
    rw = rn % N
    k0 = split * K_PER_SPLIT
    a_ptrs = a_ptr + ra[:, None].to(tl.int64) * stride_am + (k0 + rk)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rw[None, :].to(tl.int64) * stride_wn + (k0 + rk)[:, None]  # [BLOCK_K, BLOCK_N], K-major
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in tl.range(0, tl.minimum(K_PER_SPLIT, K - k0) // BLOCK_K, num_stages=NUM_STAGES):
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        if FAST_ACCUM:
            acc = tl.dot(a, w, acc)
        else:
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        a_scale = tl.load(a_scale_ptr + ra)
        w_scale = tl.load(w_scale_ptr + rw)
        y = acc * a_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rw).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        part = part_ptr + split.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part, acc, mask=out_mask)


@triton.jit
def _split_epilogue_kernel(
    part_ptr,  # [SPLIT_K, M, N] float32
    out_ptr,  # [M, N]
    a_scale_ptr,  # [M]
    w_scale_ptr,  # [N]
    bias_ptr,  # [N]
    M, N, stride_om,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + row) * N + cols, mask=mask, other=0.0)
    y = acc * tl.load(a_scale_ptr + row) * tl.load(w_scale_ptr + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def supports(k: int, config: GemmConfig) -> bool:
    """The loop has no K mask: K is a whole number of BLOCK_K tiles, and every split gets at least one."""
    return k % config.block_k == 0 and k // config.block_k >= config.split_k


def fp8_gemm(
    xq: torch.Tensor,  # [M, K] float8_e4m3fn
    x_scale: torch.Tensor,  # [M, 1] or [M] float32
    wq: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [N], [N, 1] or [1, N] float32
    config: GemmConfig,
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
) -> torch.Tensor:
    """[M, N] in out_dtype, with `config` from config_for (callers use torch._scaled_mm where it is None)."""
    m, k = xq.shape
    n = wq.shape[0]
    assert wq.shape[1] == k and xq.stride(1) == 1 and wq.stride(1) == 1
    cfg = config
    assert supports(k, cfg), f"K={k} is not {cfg.split_k} or more whole tiles of {cfg.block_k}"
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    a_scale, w_sc = x_scale.reshape(-1), w_scale.reshape(-1)
    part = out if cfg.split_k == 1 else torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=xq.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _fp8_gemm_kernel[grid](
        xq, wq, out, a_scale, w_sc, bias if bias is not None else w_sc, part,
        m, n, k, xq.stride(0), wq.stride(0), out.stride(0), triton.cdiv(k // cfg.block_k, cfg.split_k) * cfg.block_k,
        HAS_BIAS=bias is not None, SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        FAST_ACCUM=fast_accum,
        num_stages=cfg.num_stages,
    )
    if cfg.split_k > 1:
        block = 1024
        _split_epilogue_kernel[(m, triton.cdiv(n, block))](
            part, out, a_scale, w_sc, bias if bias is not None else w_sc, m, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=cfg.split_k, BLOCK=block, num_warps=4,
        )
    return out
