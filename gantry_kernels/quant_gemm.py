"""Dequantize-in-kernel matmuls for int4/int8 weights packed in int32 words (compressed-tensors
pack-quantized, GPTQ, AWQ): a split-K GEMV for decode (M <= GEMV_MAX_M), gantry_kernels/quant_mma.py's
tensor-core kernel for small batches of 4-bit bf16 (M <= MMA_MAX_M), dequantize-then-cuBLAS above;
a tensor-core GEMM that dequantizes weight tiles in registers is kept (`gemm`) but not dispatched: on
an H200 it measured 10-30x slower than dequantize + cuBLAS at M=256 (benchmarks/quant_bench.py).
`dequant_gemm` documents the layouts; gantry_kernels.reference.dequant_gemm is the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gantry_kernels import quant_mma
from gantry_kernels.quant_gemv import MAGIC, MAGIC_F, _zero_magic, gemv
from gantry_kernels.quant_gemv import flags as _flags
from gantry_kernels.quant_gemv import ptrs as _ptrs

LAYOUTS = ("compressed-tensors", "gptq", "awq")
GEMV_MAX_M = 1  # rows up to this use the GEMV; above, quant_mma where it applies, else dequantize + cuBLAS
# rows up to this use quant_mma (4-bit bf16, no g_idx): on the H200, W1's shapes with MMA_TABLE's configs,
# 2.6-5.3x faster than dequantizing the weight and calling cuBLAS at 16 rows, 1.4-2.6x at 32, level at 64
# (benchmarks/quant_bench.py --parts rows,mma)
MMA_MAX_M = 32


@dataclass(frozen=True)
class PackedWeight:
    """A packed weight's logical view: word (a, b) sits at qweight + a * stride_qa + b * stride_qb, with
    (a, b) = (k // pack, n) when packed along K (compressed-tensors, GPTQ) or (k, n // pack) along N
    (AWQ); scale (g, n) at scales + g * stride_sg + n * stride_sn; zero words (g, n // pack) likewise."""

    n: int
    k: int
    bits: int
    group_size: int  # input columns per scale; K for one scale per output row
    pack_n: bool  # values packed along the output dim (AWQ)
    awq_order: bool  # AWQ's interleaved value order inside a word
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    strides: tuple[int, int, int, int, int, int]  # qa, qb, sg, sn, zg, zn


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"dequant_gemm: {field}: {message}")


def prepare(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g_idx: torch.Tensor | None,
            bits: int, group_size: int, layout: str, k: int) -> PackedWeight:
    """Checks shapes against the layout (a ValueError names the argument) and derives strides."""
    _check(layout in LAYOUTS, "layout", f"{layout!r} is not one of {LAYOUTS}")
    _check(bits in (4, 8), "bits", f"{bits} (supported: 4, 8)")
    shape = tuple(qweight.shape)
    _check(qweight.dtype == torch.int32 and qweight.dim() == 2, "qweight",
           f"must be 2-D int32, got {qweight.dtype} {shape}")
    pack = 32 // bits
    group = k if group_size <= 0 else group_size
    _check(g_idx is not None or (k % group == 0 and group % pack == 0), "group_size",
           f"{group_size} must divide K={k} and be a multiple of {pack}")
    if layout == "compressed-tensors":  # qweight [N, K / pack], scales [N, K / group]
        _check(zeros is None and g_idx is None, "zeros", "compressed-tensors pack-quantized runs symmetric only")
        n = qweight.shape[0]
        _check(shape[1] * pack == k, "qweight", f"shape {shape} does not hold K={k} {bits}-bit values a row")
        strides = (qweight.stride(1), qweight.stride(0), scales.stride(1), scales.stride(0), 0, 0)
        scale_shape = (n, -(-k // group))
    else:  # GPTQ qweight [K / pack, N]; AWQ qweight [K, N / pack]; scales [num_groups, N]; zeros [num_groups, N / pack]
        _check(layout == "gptq" or bits == 4, "bits", "AWQ packs 4-bit values only")
        n = qweight.shape[1] * (pack if layout == "awq" else 1)
        rows = k // pack if layout == "gptq" else k
        _check(shape[0] == rows and k % pack == 0, "qweight", f"shape {shape} does not hold K={k} inputs")
        zs = (zeros.stride(0), zeros.stride(1)) if zeros is not None else (0, 0)
        strides = (qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), *zs)
        num_groups = scales.shape[0] if g_idx is not None else -(-k // group)
        scale_shape = (num_groups, n)
        if zeros is not None:
            _check(zeros.dtype == torch.int32 and tuple(zeros.shape) == (num_groups, n // pack), "zeros",
                   f"expected int32 {(num_groups, n // pack)}, got {zeros.dtype} {tuple(zeros.shape)}")
    _check(tuple(scales.shape) == scale_shape, "scales", f"expected shape {scale_shape}, got {tuple(scales.shape)}")
    if g_idx is not None:
        _check(tuple(g_idx.shape) == (k,), "g_idx", f"expected shape ({k},), got {tuple(g_idx.shape)}")
        g_idx = g_idx.to(torch.int32)
    return PackedWeight(n, k, bits, group, layout == "awq", layout == "awq", qweight, scales, zeros, g_idx, strides)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, K, N,
                  stride_qa, stride_qb, stride_sg, stride_sn, stride_zg, stride_zn,
                  BITS: tl.constexpr, GROUP: tl.constexpr, PACK_N: tl.constexpr, AWQ_ORDER: tl.constexpr,
                  HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, SCALED: tl.constexpr):
    """float32 [BLOCK_K, BLOCK_N] tile of w.T: (q - zero) * scale, or q - zero (exact integers) when not
    SCALED. A word is loaded by each of its values (the repeats hit L1)."""
    PACK: tl.constexpr = 32 // BITS
    k_ok = offs_k < K
    mask = k_ok[:, None] & (offs_n[None, :] < N)
    if PACK_N:
        c = offs_n % PACK
        pos = (c // 2 + (c % 2) * 4) if AWQ_ORDER else c
        ptrs = qw_ptr + offs_k[:, None] * stride_qa + (offs_n // PACK)[None, :] * stride_qb
        words = tl.load(ptrs, mask=mask, other=0)
        shift = (pos * BITS)[None, :]
    else:
        ptrs = qw_ptr + (offs_k // PACK)[:, None] * stride_qa + offs_n[None, :] * stride_qb
        words = tl.load(ptrs, mask=mask, other=0)
        shift = ((offs_k % PACK) * BITS)[:, None]
    q = (((words >> shift) & ((1 << BITS) - 1)) | MAGIC).to(tl.float32, bitcast=True)  # 2**23 + q
    if HAS_G_IDX:
        g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)[:, None]  # [BLOCK_K, 1]
    else:
        g = (offs_k // GROUP)[:, None]
    if HAS_ZEROS:
        w = q - _zero_magic(z_ptr, g, offs_n[None, :], mask, stride_zg, stride_zn, BITS, AWQ_ORDER)
    else:
        w = q - (MAGIC_F + (1 << (BITS - 1)))
    if SCALED:
        w = w * tl.load(s_ptr + g * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit(do_not_specialize=["M"])  # one compile for every batch size
def _gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, bias_ptr, out_ptr,  # x [M, K], out [M, N]
    M, N, K, stride_xm, stride_qa, stride_qb, stride_sg, stride_sn, stride_zg, stride_zn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, PACK_N: tl.constexpr, AWQ_ORDER: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = x @ dequant(w).T + bias: weight tiles dequantized in registers feed tl.dot. With one group
    per K tile the scale multiplies the tile's partial product instead of every weight."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = pid % num_m, pid // num_m  # the M tiles of one weight tile run together (L2 reuse)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, K, N, stride_qa, stride_qb, stride_sg,
                          stride_sn, stride_zg, stride_zn, BITS, GROUP, PACK_N, AWQ_ORDER, HAS_ZEROS, HAS_G_IDX,
                          not SCALE_PER_TILE)  # [BLOCK_K, BLOCK_N]
        if SCALE_PER_TILE:  # q - zero is an exact integer in bf16/fp16 (|v| <= 255)
            s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n * stride_sn, mask=offs_n < N, other=0.0)
            acc += tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION) * s.to(tl.float32)[None, :]
        else:
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _dequantize_kernel(
    qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K,  # out [N, K]
    stride_qa, stride_qb, stride_sg, stride_sn, stride_zg, stride_zn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, PACK_N: tl.constexpr, AWQ_ORDER: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, K, N, stride_qa, stride_qb, stride_sg, stride_sn,
                      stride_zg, stride_zn, BITS, GROUP, PACK_N, AWQ_ORDER, HAS_ZEROS, HAS_G_IDX, True)
    tl.store(out_ptr + offs_n[None, :] * stride_on + offs_k[:, None], w.to(out_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


@triton.jit
def _dequantize_k_kernel(
    qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K,  # out [N, K]; words packed along K
    stride_qa, stride_qb, stride_sg, stride_sn, stride_zg, stride_zn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
):
    """One pass at memory speed: each word [BLOCK_N, BLOCK_KP] is loaded once and its PACK values go
    out as one run of PACK contiguous outputs ([BLOCK_N, BLOCK_KP, PACK], 16 bytes in bf16)."""
    PACK: tl.constexpr = 32 // BITS
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    kp = tl.program_id(0) * BLOCK_KP + tl.arange(0, BLOCK_KP)  # [BLOCK_KP] word index along K
    c = tl.arange(0, PACK)  # [PACK] value index inside a word
    mask = (offs_n[:, None] < N) & (kp[None, :] < K // PACK)  # [BLOCK_N, BLOCK_KP]
    words = tl.load(qw_ptr + kp[None, :] * stride_qa + offs_n[:, None] * stride_qb, mask=mask, other=0)
    q = ((words[:, :, None] >> (c * BITS)[None, None, :]) & ((1 << BITS) - 1)).to(tl.float32)  # [BN, BKP, PACK]
    k = kp[:, None] * PACK + c[None, :]  # [BLOCK_KP, PACK]
    mask3 = mask[:, :, None]  # [BLOCK_N, BLOCK_KP, 1]: constant along a word's values, so stores vectorize
    if HAS_G_IDX:
        g = tl.load(g_ptr + k, mask=k < K, other=0)[None, :, :]  # [1, BLOCK_KP, PACK]
    else:
        g = (kp * PACK // GROUP)[None, :, None]  # [1, BLOCK_KP, 1]: a word never straddles groups
    smask = mask3
    s = tl.load(s_ptr + g * stride_sg + offs_n[:, None, None] * stride_sn, mask=smask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = _zero_magic(z_ptr, g, offs_n[:, None, None], smask, stride_zg, stride_zn, BITS, False) - MAGIC_F
    else:
        zero = 1 << (BITS - 1)
    tl.store(out_ptr + offs_n[:, None, None] * stride_on + k[None, :, :], ((q - zero) * s).to(out_ptr.dtype.element_ty),
             mask=mask3)


def _gemm_config(m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by rows: untimed, chosen so that ptxas (sm_90)
    spills nothing (128 x 128 x 64 on 8 warps spilled: a word is loaded per value it holds)."""
    if m <= 16:  # few shapes: each is a compile when CUDA graphs are captured for every batch size
        return 16, 64, 64, 4, 3
    if m <= 64:
        return 64, 64, 64, 4, 3
    if m <= 128:
        return 64, 128, 64, 8, 3
    return 128, 128, 32, 8, 3


def gemm(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
         config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (unit stride in K) -> [M, N] through tensor cores."""
    m = x.shape[0]
    block_m, block_n, block_k, num_warps, num_stages = config or _gemm_config(m)
    out = torch.empty((m, w.n), dtype=x.dtype, device=x.device)
    scale_per_tile = w.g_idx is None and w.group_size % block_k == 0
    grid = (triton.cdiv(m, block_m) * triton.cdiv(w.n, block_n),)
    _gemm_kernel[grid](
        x, *_ptrs(w), bias if bias is not None else out, out, m, w.n, w.k, x.stride(0), *w.strides, out.stride(0),
        PACK_N=w.pack_n, AWQ_ORDER=w.awq_order, HAS_BIAS=bias is not None, SCALE_PER_TILE=scale_per_tile,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages, **_flags(w))
    return out


def dequantize(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [N, K] in `dtype`."""
    out = torch.empty((w.n, w.k), dtype=dtype, device=w.qweight.device)
    if not w.pack_n:  # 32 x 16 words: 4096 values, 32 a thread
        block_n, block_kp = 32, 16
        _dequantize_k_kernel[(triton.cdiv(w.k * w.bits // 32, block_kp), triton.cdiv(w.n, block_n))](
            *_ptrs(w), out, w.n, w.k, *w.strides, out.stride(0), BLOCK_N=block_n, BLOCK_KP=block_kp, num_warps=4,
            **_flags(w))
        return out
    block_n, block_k = 64, 64
    _dequantize_kernel[(triton.cdiv(w.k, block_k), triton.cdiv(w.n, block_n))](
        *_ptrs(w), out, w.n, w.k, *w.strides, out.stride(0), PACK_N=w.pack_n, AWQ_ORDER=w.awq_order,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **_flags(w))
    return out


def dequant_gemm(
    x: torch.Tensor,  # [..., K] bf16 / fp16 / fp32
    qweight: torch.Tensor,  # int32, see layout
    scales: torch.Tensor,  # float, see layout
    zeros: torch.Tensor | None,  # int32 [num_groups, N * bits / 32] packed along N, or None: 2**(bits-1)
    g_idx: torch.Tensor | None,  # [K] group of each input column (GPTQ desc_act), or None: k // group_size
    bits: int,  # 4 or 8
    group_size: int,  # input columns per scale; -1 (or K) for one scale per output row
    layout: str,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N], x's dtype
    """x @ w.T with w[n, k] = (q[n, k] - zero[g, n]) * scale[g, n], g = g_idx[k]; values little-endian in
    int32 words, unsigned. layout:
      compressed-tensors: qweight [N, K / pack] packed along K, scales [N, K / group], symmetric (zero 2**(bits-1))
      gptq: qweight [K / pack, N] packed along K, scales [num_groups, N]; zeros are the zero points
            themselves (gptq_v2; a gptq (v1) checkpoint stores zero - 1: add 1 at load)
      awq: qweight [K, N / 8] packed along N in AWQ's order [0, 2, 4, 6, 1, 3, 5, 7], zeros likewise
           (4 bits; repacking to the gptq layout at load lets decode use the GEMV)."""
    k = x.shape[-1]
    w = prepare(qweight, scales, zeros, g_idx, bits, group_size, layout, k)
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()  # [M, K]
    m = x2.shape[0]
    if m == 0:
        out = x2.new_empty((0, w.n))
    elif m <= GEMV_MAX_M and not w.pack_n:
        out = gemv(x2, w, bias)
    elif m <= MMA_MAX_M and x2.is_cuda and quant_mma.supports(w, x2.dtype):
        out = quant_mma.mma(x2, w, bias)
    else:  # the fused `gemm` measured slower at every M tried; use it here once it measures faster
        out = F.linear(x2, dequantize(w, x.dtype), bias)
    return out.reshape(*x.shape[:-1], w.n)
