"""The decode GEMV of gantry_kernels/quant_gemm.py (int4/int8 words packed along K, M <= GEMV_MAX_M): split-K
programs that each stream a run of [BLOCK_N, BLOCK_KP] word tiles (the next tile's load in flight while
this one is unpacked), float32 partials summed by a second kernel. `gemv_config` picks the tile by shape:
measured configs from `GEMV_TABLE` (python -m benchmarks.quant_bench --parts gemv prints them), else a rule.
"""
from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gantry_kernels.pdl import launch_kwargs, wait_prior

if TYPE_CHECKING:
    from gantry_kernels.quant_gemm import PackedWeight

# float32 2**23: OR-ing an integer q < 2**23 into its mantissa gives exactly 2**23 + q, no int->float convert
MAGIC = tl.constexpr(0x4B000000)
MAGIC_F = tl.constexpr(8388608.0)
# (N, K, bits) -> (BLOCK_N, BLOCK_KP, num_warps, splits) at M = 1: W1's shapes, from the H200 sweep of 2026-12-02
# on words stored out-major (GPTQ's order, and compressed-tensors' once loaded); other shapes use gemv_config's rule
GEMV_TABLE: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (4608, 3584, 4): (16, 64, 4, 4), (3584, 3584, 4): (16, 64, 4, 4), (37888, 3584, 4): (32, 32, 4, 1),
    (3584, 18944, 4): (16, 64, 4, 4)}
MIN_PROGRAM_BYTES = 16384  # weight bytes a split-K program streams at least (fewer: latency, not bandwidth)


@triton.jit
def _zero_magic(z_ptr, g, n, mask, stride_zg, stride_zn, BITS: tl.constexpr, AWQ_ORDER: tl.constexpr):
    """2**23 + zero point of (group g, column n), read from zero words packed along N."""
    PACK: tl.constexpr = 32 // BITS
    c = n % PACK
    pos = (c // 2 + (c % 2) * 4) if AWQ_ORDER else c  # AWQ puts value c at nibble c // 2 + 4 * (c % 2)
    word = tl.load(z_ptr + g * stride_zg + (n // PACK) * stride_zn, mask=mask, other=0)
    return (((word >> (pos * BITS)) & ((1 << BITS) - 1)) | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_load(qw_ptr, s_ptr, t, t_end, kp_end, offs_n, N, stride_qa, stride_qb, stride_sg, stride_sn,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_G_IDX: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
               EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
    """Tile t's words [BLOCK_N, BLOCK_KP] and scales ([BLOCK_N, 1] per tile, [BLOCK_N, BLOCK_KP] per word;
    unused with g_idx), all masked off past t_end: a prefetch past the split's end reads nothing."""
    PACK: tl.constexpr = 32 // BITS
    kp = t * BLOCK_KP + tl.arange(0, BLOCK_KP)  # [BLOCK_KP] word index along K
    n_ok = offs_n < N * (t < t_end).to(tl.int32)  # vector < scalar: Triton's interpreter mis-types bool & bool scalar
    # EVEN_K (no partial tile): a mask constant along K, so the words load as 16-byte vectors
    kp_ok = tl.full([BLOCK_KP], 1, tl.int1) if EVEN_K else kp < kp_end
    mask = n_ok[:, None] & kp_ok[None, :]  # [BLOCK_N, BLOCK_KP]
    words = tl.load(qw_ptr + kp[None, :] * stride_qa + offs_n[:, None] * stride_qb, mask=mask, other=0)
    if HAS_G_IDX:
        s = tl.zeros([BLOCK_N, 1], dtype=tl.float32)
    elif SCALE_PER_TILE:  # the tile lies in one group
        g = t * BLOCK_KP * PACK // GROUP
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0)
        s = s.to(tl.float32)[:, None]
    else:  # a word never straddles groups: one scale a word
        g = (kp * PACK // GROUP)[None, :]
        s = tl.load(s_ptr + g * stride_sg + offs_n[:, None] * stride_sn, mask=mask, other=0.0).to(tl.float32)
    return words, s


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, bias_ptr, out_ptr,  # x [M, K]; out [num_splits, M, N]
    N, K, stride_xm, stride_qa, stride_qb, stride_sg, stride_sn, stride_zg, stride_zn, stride_os, stride_om,
    tiles_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE_PER_TILE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr,
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
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(num_words, BLOCK_KP))
    kp_end = tl.minimum(num_words, t_end * BLOCK_KP)  # this split's last word + 1
    acc = tl.zeros([BLOCK_N, BLOCK_KP], dtype=tl.float32)
    words, s = _gemv_load(qw_ptr, s_ptr, t_start, t_end, kp_end, offs_n, N, stride_qa, stride_qb, stride_sg,
                          stride_sn, BITS, GROUP, HAS_G_IDX, SCALE_PER_TILE, EVEN_K, BLOCK_N, BLOCK_KP)
    for t in range(t_start, t_end):
        # the next tile's loads are issued before this one is unpacked: one tile always in flight
        next_words, next_s = _gemv_load(qw_ptr, s_ptr, t + 1, t_end, kp_end, offs_n, N, stride_qa, stride_qb,
                                        stride_sg, stride_sn, BITS, GROUP, HAS_G_IDX, SCALE_PER_TILE, EVEN_K,
                                        BLOCK_N, BLOCK_KP)
        kp = t * BLOCK_KP + tl.arange(0, BLOCK_KP)  # [BLOCK_KP]
        kp_ok = tl.full([BLOCK_KP], 1, tl.int1) if EVEN_K else kp < num_words
        mask = n_ok[:, None] & kp_ok[None, :]  # [BLOCK_N, BLOCK_KP]
        high = words >> (HALF * BITS)  # the upper values, in the low half-word (sign bits masked off below)
        if HAS_ZEROS and not HAS_G_IDX:
            if SCALE_PER_TILE:
                g = t * BLOCK_KP * PACK // GROUP
                zero = _zero_magic(z_ptr, g, offs_n, n_ok, stride_zg, stride_zn, BITS, False)[:, None] - MAGIC_F
            else:
                g = (kp * PACK // GROUP)[None, :]  # [1, BLOCK_KP]
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
                gk = tl.load(g_ptr + k, mask=kp_ok, other=0)[None, :]
                sk = tl.load(s_ptr + gk * stride_sg + offs_n[:, None] * stride_sn, mask=mask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    zk = _zero_magic(z_ptr, gk, offs_n[:, None], mask, stride_zg, stride_zn, BITS, False) - MAGIC_F
                else:
                    zk = 1 << (BITS - 1)
                part += (v - (MAGIC_F + zk * (1 << shift))) * sk * xc[None, :]
            else:
                part += (v - (MAGIC_F + zero * (1 << shift))) * xc[None, :]
        acc += part if HAS_G_IDX else part * s
        words, s = next_words, next_s
    out = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, N, num_splits, stride_ps, stride_pm, stride_om,
                       HAS_BIAS: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[m, n] = sum over splits of the float32 partials (+ bias): one load of all splits (no chain of
    dependent loads), a fixed reduction tree: deterministic."""
    wait_prior(PDL)  # gantry_kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = offs < N
    splits = tl.arange(0, SPLITS)  # [SPLITS] (a power of two >= num_splits)
    parts = tl.load(part_ptr + splits[:, None] * stride_ps + m * stride_pm + offs[None, :],
                    mask=(splits[:, None] < num_splits) & ok[None, :], other=0.0)  # [SPLITS, BLOCK]
    acc = tl.sum(parts, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def split_k(num_tiles: int, num_splits: int) -> tuple[int, int]:
    """(tiles_per_split, num_splits) for num_tiles K tiles asked into num_splits: no split left empty."""
    tiles_per_split = triton.cdiv(num_tiles, min(num_splits, num_tiles))
    return tiles_per_split, triton.cdiv(num_tiles, tiles_per_split)


def split_output(m: int, n: int, num_splits: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [m, n], part): one split writes out itself; more write float32 partials [num_splits, m, n]."""
    out = torch.empty((m, n), dtype=dtype, device=device)
    part = out if num_splits == 1 else torch.empty((num_splits, m, n), dtype=torch.float32, device=device)
    return out, part


def sum_splits(part: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out [M, N] = part [num_splits, M, N] (float32) summed over its splits, + bias [N]."""
    num_splits, m, n = part.shape
    splits = triton.next_power_of_2(num_splits)
    block = max(32, min(1024, 4096 // splits))  # at most 4096 partials a program
    _sum_splits_kernel[(m, triton.cdiv(n, block))](
        part, bias if bias is not None else out, out, n, num_splits, part.stride(0), part.stride(1),
        out.stride(0), HAS_BIAS=bias is not None, SPLITS=splits, BLOCK=block, num_warps=4, **launch_kwargs(out.device))


@cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # Triton's interpreter on CPU: small, so that tests see split-K
    return torch.cuda.get_device_properties(device).multi_processor_count


def flags(w: PackedWeight) -> dict:
    return {"BITS": w.bits, "GROUP": w.group_size, "HAS_ZEROS": w.zeros is not None, "HAS_G_IDX": w.g_idx is not None}


def ptrs(w: PackedWeight) -> tuple:
    """(qweight, scales, zeros, g_idx): an absent tensor is passed as the scales (never read)."""
    return w.qweight, w.scales, w.scales if w.zeros is None else w.zeros, w.scales if w.g_idx is None else w.g_idx


def auto_splits(n: int, k: int, bits: int, m: int, block_n: int, block_kp: int, sms: int) -> int:
    """Split K until there are about 8 programs an SM, but never below MIN_PROGRAM_BYTES of weights a
    program (a split that streams one tile is all latency)."""
    num_n = triton.cdiv(n, block_n)
    num_tiles = triton.cdiv(k * bits // 32, block_kp)
    min_tiles = triton.cdiv(MIN_PROGRAM_BYTES, block_n * block_kp * 4)
    return max(1, min(triton.cdiv(8 * sms, num_n * m), num_tiles // min_tiles))


def gemv_config(n: int, k: int, bits: int, m: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_KP, num_warps, num_splits) for x [m, k] @ w [n, k].T: the measured table, else a
    128 x 16-word tile split by auto_splits: 16 words a thread on 4 warps (4 rows share each x value a
    thread loads; ptxas sm_90: 122 registers, ~5.9 instructions a 4-bit value, 64 x 16 takes ~6.8)."""
    if (n, k, bits) in GEMV_TABLE and m == 1:
        return GEMV_TABLE[(n, k, bits)]
    block_n, block_kp = 128, 16
    return block_n, block_kp, 4, auto_splits(n, k, bits, m, block_n, block_kp, sms)


def gemv(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, block_n: int | None = None,
         block_kp: int | None = None, num_warps: int | None = None, num_splits: int | None = None,
         num_stages: int | None = None) -> torch.Tensor:
    """x [M, K] (unit stride in K) -> [M, N]; weights packed along K. Arguments left None come from
    gemv_config (num_splits from auto_splits when the tile is given)."""
    assert not w.pack_n, "the GEMV reads words packed along K"
    if block_n is None:
        from gantry_kernels import quant_gemv_f16x2

        if quant_gemv_f16x2.GEMV_F16X2 and quant_gemv_f16x2.supports(w):  # 4-bit, no g_idx: packed-half arithmetic
            return quant_gemv_f16x2.gemv_f16x2(x, w, bias)
    m = x.shape[0]
    sms = num_sms(x.device)
    if block_n is None:
        block_n, block_kp, num_warps, splits = gemv_config(w.n, w.k, w.bits, m, sms)
        num_splits = num_splits or splits
    block_kp = block_kp or 16
    num_warps = num_warps or 4
    num_splits = num_splits or auto_splits(w.n, w.k, w.bits, m, block_n, block_kp, sms)
    tiles_per_split, num_splits = split_k(triton.cdiv(w.k // (32 // w.bits), block_kp), num_splits)
    out, part = split_output(m, w.n, num_splits, x.dtype, x.device)
    has_bias = bias is not None and num_splits == 1
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _gemv_kernel[(m, triton.cdiv(w.n, block_n), num_splits)](
        x, *ptrs(w), bias if has_bias else out, part, w.n, w.k, x.stride(0), *w.strides,
        part.stride(0) if num_splits > 1 else 0, part.stride(-2), tiles_per_split,
        HAS_BIAS=has_bias, SCALE_PER_TILE=w.g_idx is None and w.group_size % (block_kp * 32 // w.bits) == 0,
        EVEN_K=w.k % (block_kp * 32 // w.bits) == 0,
        BLOCK_N=block_n, BLOCK_KP=block_kp, num_warps=num_warps, **extra, **flags(w))
    if num_splits > 1:
        sum_splits(part, out, bias)
    return out
