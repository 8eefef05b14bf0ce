"""Dequantize-in-kernel matmuls for int4/int8 weights packed in int32 words (compressed-tensors
pack-quantized, GPTQ, AWQ): a split-K GEMV for decode (M <= GEMV_MAX_M), dequantize-then-cuBLAS above;
a tensor-core GEMM that dequantizes weight tiles in registers is kept (`gemm`) but not dispatched: on
an H200 it measured 10-30x slower than dequantize + cuBLAS at M=256 (benchmarks/quant_bench.py).
`dequant_gemm` documents the layouts; kernels.reference.dequant_gemm is the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LAYOUTS = ("compressed-tensors", "gptq", "awq")
GEMV_MAX_M = 1  # rows up to this use the GEMV; above, dequantize the whole weight once and call cuBLAS
# float32 2**23: OR-ing an integer q < 2**23 into its mantissa gives exactly 2**23 + q, no int->float convert
MAGIC = tl.constexpr(0x4B000000)
MAGIC_F = tl.constexpr(8388608.0)


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
def _zero_magic(z_ptr, g, n, mask, stride_zg, stride_zn, BITS: tl.constexpr, AWQ_ORDER: tl.constexpr):
    """2**23 + zero point of (group g, column n), read from zero words packed along N."""
    PACK: tl.constexpr = 32 // BITS
    c = n % PACK
    pos = (c // 2 + (c % 2) * 4) if AWQ_ORDER else c  # AWQ puts value c at nibble c // 2 + 4 * (c % 2)
    word = tl.load(z_ptr + g * stride_zg + (n // PACK) * stride_zn, mask=mask, other=0)
    return (((word >> (pos * BITS)) & ((1 << BITS) - 1)) | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, bias_ptr, out_ptr,  # x [M, K]; out [num_splits, M, N]
    N, K, stride_xm, stride_qa, stride_qb, stride_sg, stride_sn, stride_zg, stride_zn, stride_os, stride_om,
    tiles_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
):
    """One row m, BLOCK_N outputs, this split's K tiles (BLOCK_KP words each); weights packed along K.
    Each word is loaded once; its PACK values are taken one at a time (an unrolled loop) against the
    matching strided x, so every tensor keeps the words' layout (no cross-thread reduction per tile).
    A value is masked in place, not shifted down: OR-ed into 2**23's mantissa it reads 2**23 + q * 2**shift
    (exact while q * 2**shift < 2**23, hence the upper half-word shifted once), and x carries 2**-shift:
    three instructions a value (LOP3, FADD, FFMA) where shift-mask-convert-scale takes five or more."""
    PACK: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PACK // 2
    MASK: tl.constexpr = (1 << BITS) - 1
    m = tl.program_id(0)  # fastest: the rows sharing a weight tile run together and hit L2
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = offs_n < N
    num_words = K // PACK
    t_end = tl.minimum((pid_s + 1) * tiles_per_split, tl.cdiv(num_words, BLOCK_KP))
    acc = tl.zeros([BLOCK_N, BLOCK_KP], dtype=tl.float32)
    for t in range(pid_s * tiles_per_split, t_end):
        kp = t * BLOCK_KP + tl.arange(0, BLOCK_KP)  # [BLOCK_KP] word index along K
        kp_ok = kp < num_words
        mask = n_ok[:, None] & kp_ok[None, :]  # [BLOCK_N, BLOCK_KP]
        words = tl.load(qw_ptr + kp[None, :] * stride_qa + offs_n[:, None] * stride_qb, mask=mask, other=0)
        high = words >> (HALF * BITS)  # the upper values, in the low half-word (sign bits masked off below)
        if SCALE_PER_TILE:  # the tile lies in one group: a scale (and zero) per row, [BLOCK_N, 1]
            g = t * BLOCK_KP * PACK // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if HAS_ZEROS:
                zero = _zero_magic(z_ptr, g, offs_n, n_ok, stride_zg, stride_zn, BITS, False)[:, None] - MAGIC_F
            else:
                zero = 1 << (BITS - 1)
        elif not HAS_G_IDX:  # a word never straddles groups: one scale (and zero) per word
            g = (kp * PACK // GROUP)[None, :]  # [1, BLOCK_KP]
            s = tl.load(s_ptr + g * stride_sg + offs_n[:, None] * stride_sn, mask=mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = _zero_magic(z_ptr, g, offs_n[:, None], mask, stride_zg, stride_zn, BITS, False) - MAGIC_F
            else:
                zero = 1 << (BITS - 1)
        part = tl.zeros([BLOCK_N, BLOCK_KP], dtype=tl.float32)
        for c in tl.static_range(PACK):
            shift = (c % HALF) * BITS
            k = kp * PACK + c  # [BLOCK_KP]
            xc = tl.load(x_ptr + m * stride_xm + k, mask=kp_ok, other=0.0).to(tl.float32) * (1.0 / (1 << shift))
            v = (((words if c < HALF else high) & (MASK << shift)) | MAGIC).to(tl.float32, bitcast=True)
            if HAS_G_IDX:  # desc_act: the values of one word may belong to different groups
                g = tl.load(g_ptr + k, mask=kp_ok, other=0)[None, :]
                s = tl.load(s_ptr + g * stride_sg + offs_n[:, None] * stride_sn, mask=mask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    zero = _zero_magic(z_ptr, g, offs_n[:, None], mask, stride_zg, stride_zn, BITS, False) - MAGIC_F
                else:
                    zero = 1 << (BITS - 1)
                part += (v - (MAGIC_F + zero * (1 << shift))) * s * xc[None, :]
            else:
                part += (v - (MAGIC_F + zero * (1 << shift))) * xc[None, :]
        acc += part if HAS_G_IDX else part * s
    out = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, N, num_splits, stride_ps, stride_pm, stride_om,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = sum over splits of the float32 partials (+ bias), in a fixed order: deterministic."""
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


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


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # Triton's interpreter on CPU: small, so that tests see split-K
    return torch.cuda.get_device_properties(device).multi_processor_count


def _flags(w: PackedWeight) -> dict:
    return {"BITS": w.bits, "GROUP": w.group_size, "HAS_ZEROS": w.zeros is not None, "HAS_G_IDX": w.g_idx is not None}


def _ptrs(w: PackedWeight) -> tuple:
    """(qweight, scales, zeros, g_idx): an absent tensor is passed as the scales (never read)."""
    return w.qweight, w.scales, w.scales if w.zeros is None else w.zeros, w.scales if w.g_idx is None else w.g_idx


def gemv(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, block_n: int = 128,
         block_kp: int = 16, num_warps: int = 4, num_splits: int | None = None) -> torch.Tensor:
    """x [M, K] (unit stride in K) -> [M, N]; weights packed along K. Split-K (float32 partials summed
    by a second kernel) when the N tiles alone would leave SMs idle. The default tile, 128 rows x 16 words
    (one group of 128 4-bit values), compiles for sm_90 to about 5.7 instructions a value, 92 registers."""
    assert not w.pack_n, "the GEMV reads words packed along K"
    m = x.shape[0]
    num_n = triton.cdiv(w.n, block_n)
    num_tiles = triton.cdiv(w.k // (32 // w.bits), block_kp)
    if num_splits is None:  # about 4 programs an SM
        num_splits = min(num_tiles, max(1, triton.cdiv(4 * _num_sms(x.device), num_n * m)))
    tiles_per_split = triton.cdiv(num_tiles, num_splits)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)  # no empty split
    out = torch.empty((m, w.n), dtype=x.dtype, device=x.device)
    part = out if num_splits == 1 else torch.empty((num_splits, m, w.n), dtype=torch.float32, device=x.device)
    has_bias = bias is not None and num_splits == 1
    _gemv_kernel[(m, num_n, num_splits)](
        x, *_ptrs(w), bias if has_bias else out, part, w.n, w.k, x.stride(0), *w.strides,
        part.stride(0) if num_splits > 1 else 0, part.stride(-2), tiles_per_split,
        HAS_BIAS=has_bias, SCALE_PER_TILE=w.g_idx is None and w.group_size % (block_kp * 32 // w.bits) == 0,
        BLOCK_N=block_n, BLOCK_KP=block_kp, num_warps=num_warps, **_flags(w))
    if num_splits > 1:
        block = 256
        _sum_splits_kernel[(m, triton.cdiv(w.n, block))](
            part, bias if bias is not None else out, out, w.n, num_splits, part.stride(0), part.stride(1),
            out.stride(0), HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


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
    else:  # the fused `gemm` measured slower at every M tried; use it here once it measures faster
        out = F.linear(x2, dequantize(w, x.dtype), bias)
    return out.reshape(*x.shape[:-1], w.n)
