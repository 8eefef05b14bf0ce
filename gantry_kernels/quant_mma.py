"""Tensor-core dequant matmul for int4 words packed along K (compressed-tensors, GPTQ without g_idx), for
small M: x [M, K] @ dequant(w).T with M padded to 16- or 32-row tiles. Each word is loaded once; its eight
values leave it as four scaled bf16 pairs (value c in the low half, c + 4 in the high one) by one LOP3
into the mantissa of 128.0 and two bf16x2 FMAs (take 128 + zero off, exact; times the scale, one
rounding: the weights dequantize() writes, so this equals dequantize + cuBLAS but for summation order).
The eight [BLOCK_N, BLOCK_KP] value planes each feed a tl.dot against x's matching strided columns (the
order of K inside a tile is free as long as x follows it). Split-K partials are summed by quant_gemv's
kernel.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gantry_kernels.pdl import launch_kwargs, wait_prior
from gantry_kernels.quant_gemv import num_sms, split_k, split_output, sum_splits

if TYPE_CHECKING:
    from gantry_kernels.quant_gemm import PackedWeight

# (N, K, BLOCK_M) -> (BLOCK_N, BLOCK_KP, num_warps, splits): W1's shapes at 16 and 32 rows, from the H200
# sweeps of 2026-12-01 (python -m benchmarks.quant_bench --parts mma --mma-m 16 / 32); other shapes take
# mma_config's rule
MMA_TABLE: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (4608, 3584, 16): (128, 16, 4, 7), (3584, 3584, 16): (256, 16, 8, 8), (37888, 3584, 16): (256, 16, 8, 8),
    (3584, 18944, 16): (256, 16, 4, 16),
    (4608, 3584, 32): (128, 16, 2, 8), (3584, 3584, 32): (256, 16, 4, 7), (37888, 3584, 32): (256, 16, 4, 8),
    (3584, 18944, 32): (256, 16, 4, 16)}
MIN_PROGRAM_BYTES = 16384  # weight bytes a split-K program streams at least


@triton.jit
def _pairs_asm(words, neg_zero2, scale2):
    """words int32 (value c in bits 0-3, value c + 4 in bits 16-19), neg_zero2 = bf16x2 of -(128 + zero),
    scale2 = bf16x2 of the scale -> ((value c - zero) * scale, (value c+4 - zero) * scale) as two bf16:
    LOP3 into 128.0's mantissa, an FMA that takes 128 + zero off (exact), an FMA by the scale plus -0.0
    (one rounding of an exact product: the bf16 that dequantize() writes)."""
    return tl.inline_asm_elementwise(
        asm="{ .reg .b32 t, one, nz; mov.b32 one, 0x3F803F80; mov.b32 nz, 0x80008000; "
            "lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA; fma.rn.bf16x2 t, t, one, $3; "
            "fma.rn.bf16x2 t, t, $4, nz; mov.b32 {$0, $1}, t; }",
        constraints="=h,=h,r,r,r", args=[words, neg_zero2, scale2], dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=1)


@triton.jit
def _pairs_plain(words, zero, scale, dtype: tl.constexpr):
    """The same as _pairs_asm in plain Triton (the interpreter, and the reference the asm is tested on)."""
    lo = (((words & 15) - zero).to(tl.float32) * scale).to(dtype)
    hi = ((((words >> 16) & 15) - zero).to(tl.float32) * scale).to(dtype)
    return lo, hi


@triton.jit
def _mma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,  # x [M, K]; out [num_splits, M, N] (float32) or [M, N]
    M, N, K, stride_xm, stride_qa, stride_qb, stride_sg, stride_sn, stride_zg, stride_zn, stride_os, stride_om,
    tiles_per_split,
    HAS_ZEROS: tl.constexpr, USE_ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Program (m tile, n tile, split): this split's K tiles of BLOCK_KP words (BLOCK_KP * 8 values inside
    one group); the next tile's words load while this one is unpacked."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_ok = offs_m < M
    n_ok = offs_n < N
    num_tiles = K // (BLOCK_KP * 8)
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    kp = tl.arange(0, BLOCK_KP)  # [BLOCK_KP]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_ptrs = qw_ptr + kp[None, :] * stride_qa + offs_n[:, None] * stride_qb  # [BLOCK_N, BLOCK_KP], tile 0
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
    # a tile past the split's end loads nothing (vector < scalar: the interpreter mis-types bool & bool scalar)
    words = tl.load(w_ptrs + t_start * BLOCK_KP * stride_qa,
                    mask=(offs_n < N * (t_start < t_end).to(tl.int32))[:, None], other=0)
    wait_prior(PDL)  # gantry_kernels/pdl.py: only the first weight tile is read before the kernel before has finished
    for t in range(t_start, t_end):
        nxt = t + 1
        next_words = tl.load(w_ptrs + nxt * BLOCK_KP * stride_qa,
                             mask=(offs_n < N * (nxt < t_end).to(tl.int32))[:, None], other=0)
        g = t * BLOCK_KP * 8 // GROUP
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0)  # [BLOCK_N]
        if HAS_ZEROS:  # GPTQ: zero words [groups, N / 8] packed along N
            zw = tl.load(z_ptr + g * stride_zg + (offs_n // 8) * stride_zn, mask=n_ok, other=0)
            zero = (zw >> ((offs_n % 8) * 4)) & 15  # [BLOCK_N]
        else:
            zero = tl.full([BLOCK_N], 8, tl.int32)
        if USE_ASM:
            neg_zero = 0xC300 | zero  # bf16 bits of -(128 + zero), zero < 16
            neg_zero2 = (neg_zero | (neg_zero << 16))[:, None]  # [BLOCK_N, 1]
            s_bits = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            scale2 = (s_bits | (s_bits << 16))[:, None]  # [BLOCK_N, 1]
        k0 = t * BLOCK_KP * 8 + kp * 8  # [BLOCK_KP] first value of each word
        for c in tl.static_range(4):
            shifted = words >> (4 * c)
            if USE_ASM:
                lo, hi = _pairs_asm(shifted, neg_zero2, scale2)
            else:
                lo, hi = _pairs_plain(shifted, zero[:, None], s.to(tl.float32)[:, None], x_ptr.dtype.element_ty)
            x_lo = tl.load(x_rows + (k0 + c)[None, :], mask=m_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_KP]
            x_hi = tl.load(x_rows + (k0 + c + 4)[None, :], mask=m_ok[:, None], other=0.0)
            acc = tl.dot(x_lo, tl.trans(lo), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(x_hi, tl.trans(hi), acc, input_precision=DOT_PRECISION)
        words = next_words
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def supports(w: PackedWeight, dtype: torch.dtype) -> bool:
    """4-bit, packed along K, groups in order (no g_idx), K a whole number of 128-value tiles, bf16 x and
    scales (the asm multiplies by the scale's bf16 bits)."""
    return (w.bits == 4 and not w.pack_n and w.g_idx is None and dtype == torch.bfloat16
            and w.scales.dtype == torch.bfloat16 and w.group_size % 128 == 0 and w.k % 128 == 0)


def block_rows(m: int) -> int:
    """BLOCK_M for m rows: the smallest tl.dot tile of 16, then 32 (64 above: measured no faster than
    dequantize + cuBLAS)."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


def mma_config(n: int, k: int, m: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_KP, num_warps, num_splits): the measured table, else 64 columns x 16 words
    (128 values: one group of 128) split until about 4 programs an SM, each streaming >= 16 KB."""
    block_m = block_rows(m)
    if (n, k, block_m) in MMA_TABLE:
        return MMA_TABLE[(n, k, block_m)]
    block_n, block_kp = 64, 16
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    num_tiles = k // (block_kp * 8)
    min_tiles = triton.cdiv(MIN_PROGRAM_BYTES, block_n * block_kp * 4)
    return block_n, block_kp, 4, max(1, min(triton.cdiv(4 * sms, programs), num_tiles // min_tiles))


def mma(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, block_n: int | None = None,
        block_kp: int | None = None, num_warps: int | None = None, num_splits: int | None = None,
        use_asm: bool | None = None) -> torch.Tensor:
    """x [M, K] (unit stride in K) -> [M, N]; `supports(w, x.dtype)` must hold on CUDA (the asm makes
    bf16); use_asm=False runs plain Triton for any float x (the interpreter's tests use float32)."""
    m = x.shape[0]
    block_m = block_rows(m)
    cfg = mma_config(w.n, w.k, m, num_sms(x.device))
    block_n, block_kp, num_warps = block_n or cfg[0], block_kp or cfg[1], num_warps or cfg[2]
    num_splits = num_splits or cfg[3]
    assert w.group_size % (block_kp * 8) == 0, "a K tile must lie inside one group"
    tiles_per_split, num_splits = split_k(w.k // (block_kp * 8), num_splits)
    out, part = split_output(m, w.n, num_splits, x.dtype, x.device)
    if use_asm is None:
        use_asm = x.device.type == "cuda"
    qa, qb, sg, sn, zg, zn = w.strides
    _mma_kernel[(triton.cdiv(m, block_m), triton.cdiv(w.n, block_n), num_splits)](
        x, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, part, m, w.n, w.k, x.stride(0),
        qa, qb, sg, sn, zg, zn, part.stride(0) if num_splits > 1 else 0, part.stride(-2), tiles_per_split,
        HAS_ZEROS=w.zeros is not None, USE_ASM=use_asm, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KP=block_kp,
        GROUP=w.group_size, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, **launch_kwargs(x.device))
    if num_splits > 1 or bias is not None:  # the kernel adds no bias: one split's out goes through the sum too
        sum_splits(part if num_splits > 1 else out.float().unsqueeze(0), out, bias)
    return out
