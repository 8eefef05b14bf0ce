"""The 4-bit decode GEMV of gantry_kernels/quant_gemv.py with packed half arithmetic: fewer instructions a value.

quant_gemv.py spends three float32 instructions on each 4-bit value (LOP3, FADD, FFMA). Here a word's
eight values become four f16x2 pairs (Marlin's trick: a nibble OR-ed into the mantissa of 1024.0 reads 1024 + q
exactly, one LOP3 a pair; the nibbles at bits 4-7 of each half read 1024 + 16q and are scaled by 1/16), take
q - zero with one f16x2 subtract or FMA a pair, and multiply x's pairs with f16x2 FMAs: ~15 instructions a word
where float32 takes ~26. Pairs are (x0, x4), (x1, x5), (x2, x6), (x3, x7) of the word's eight x values; a word's
x values load as one 16-byte vector and pair with one cvt a pair.

f16 overflows where bf16 does not, so x is divided by its largest |x| over the program's K range before the
conversion (a word's products then stay within 8 x 15) and the sums are multiplied back at the end. A word's 8
products are summed in f16: about 5e-4 of the output's norm, under the bf16 output's own rounding.
Sym or asym zero points, no g_idx, a scale per tile (the group a multiple of the tile), M rows one program each.

On the GPU a word is one inline PTX block. Triton's interpreter cannot run PTX: there the same sum is taken in
float32 from the same packed operands, so CPU tests check how x's pairs and the zero constants are packed.
The engine's one-row 4-bit GEMV wherever it applies (GANTRY_GEMV_F16X2=0: quant_gemv.py's): on the H200, W1's
4-bit decode TPOT 0.557 of bf16's against 0.683 (benchmarks/RESULTS.md, sixteenth session).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gantry_kernels.pdl import launch_kwargs, wait_prior
from gantry_kernels.quant_gemv import _gemv_load, gemv_config, num_sms, split_k, split_output, sum_splits

if TYPE_CHECKING:
    from gantry_kernels.quant_gemm import PackedWeight

GEMV_F16X2 = os.environ.get("GANTRY_GEMV_F16X2", "1") == "1"
# (N, K, bits) -> (BLOCK_N, BLOCK_KP, num_warps, splits) at M = 1: W1's shapes, H200 sweep of 2026-12-02 on words
# stored out-major (decode_gemv_bench --dtypes w4x2 --sweep), o_proj's 8 splits from two later runs (5.5-5.9 µs
# against 16 splits' 7.4-7.6 in the same runs; benchmarks/RESULTS.md, seventeenth session); other shapes take
# quant_gemv.gemv_config's
F16X2_TABLE: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (4608, 3584, 4): (64, 16, 2, 8), (3584, 3584, 4): (64, 16, 2, 8), (37888, 3584, 4): (64, 16, 2, 4),
    (3584, 18944, 4): (64, 16, 2, 16)}

# the end of a word's PTX: the f16x2 sum `a` of its products -> $0, the sum of its two halves (added in f16: two
# instructions where converting both halves and adding in float32 takes three)
HALF2_TO_SUM = """
mov.b32 {lo, hi}, a;
add.f16 lo, lo, hi;
cvt.f32.f16 $0, lo;
}
"""
# $0 = sum of a word's 8 products (float32); $1 word, $2..$5 x pairs (f16x2), $6 (1024 + z) twice, $7 -(64 + z) twice
WORD_DOT_PTX = tl.constexpr("""
{
.reg .b32 t0, t1, t2, t3, w8, a, sx;
.reg .b16 lo, hi;
lop3.b32 t0, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t1, $1, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 w8, $1, 8;
lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t3, w8, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 t0, t0, $6;
sub.f16x2 t2, t2, $6;
mov.b32 sx, 0x2C002C00;
fma.rn.f16x2 t1, t1, sx, $7;
fma.rn.f16x2 t3, t3, sx, $7;
mul.f16x2 a, t0, $2;
fma.rn.f16x2 a, t1, $3, a;
fma.rn.f16x2 a, t2, $4, a;
fma.rn.f16x2 a, t3, $5, a;""" + HALF2_TO_SUM)


@triton.jit
def _half(bits):
    """The float32 value of f16 bits (int32, low 16 bits)."""
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_dot(words, p0, p1, p2, p3, zbase, zneg, USE_PTX: tl.constexpr):
    """[BLOCK_N, BLOCK_KP] float32: sum over each word's 8 values of (q - z) * x (x as packed in p0..p3)."""
    if USE_PTX:
        return tl.inline_asm_elementwise(WORD_DOT_PTX, "=f,r,r,r,r,r,r,r", [words, p0, p1, p2, p3, zbase, zneg],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:  # the same arithmetic in float32 from the same operands (products not rounded to f16)
        z = (zbase & 0xFFFF) - 0x6400  # 1024 + z as f16 bits is 0x6400 + z
        acc = (words * 0).to(tl.float32)
        for c in tl.static_range(4):
            p = p0 if c == 0 else p1 if c == 1 else p2 if c == 2 else p3
            q_lo = (words >> (4 * c)) & 0xF  # value c
            q_hi = (words >> (16 + 4 * c)) & 0xF  # value c + 4
            acc += (q_lo - z).to(tl.float32) * _half(p) + (q_hi - z).to(tl.float32) * _half(p >> 16)
        return acc


@triton.jit
def _pair(lo, hi, USE_PTX: tl.constexpr):
    """int32 f16x2 of two float32 tensors: lo in the low half (on the GPU one cvt for both)."""
    if USE_PTX:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)
    lo_bits = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi_bits = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo_bits | (hi_bits << 16)


@triton.jit
def _split_tiles(tiles_per_split, num_words, BLOCK_KP: tl.constexpr):
    """(t_start, t_end): the K tiles (BLOCK_KP words each) of this program's split (grid axis 2)."""
    t_start = tl.program_id(2) * tiles_per_split
    return t_start, tl.minimum(t_start + tiles_per_split, tl.cdiv(num_words, BLOCK_KP))


@triton.jit
def _x_tile(x_row, t, num_words, EVEN_K: tl.constexpr, BLOCK_KP: tl.constexpr):
    """x's values for tile t's words, [BLOCK_KP, 8] in x's dtype: a word's 8 as one 16-byte vector, 0 past K."""
    kp = t * BLOCK_KP + tl.arange(0, BLOCK_KP)  # [BLOCK_KP] word index along K
    kp_ok = tl.full([BLOCK_KP], 1, tl.int1) if EVEN_K else kp < num_words
    return tl.load(x_row + kp[:, None] * 8 + tl.arange(0, 8)[None, :], mask=kp_ok[:, None], other=0.0)


@triton.jit
def _split_amax(x_row, t_start, t_end, num_words, EVEN_K: tl.constexpr, BLOCK_KP: tl.constexpr):
    """The largest |x| over this split's K tiles, 1 when all are 0: x / amax fits f16 and a word's products stay
    small. One cross-thread reduction a program."""
    big = tl.zeros([BLOCK_KP, 8], dtype=tl.float32)
    for t in range(t_start, t_end):
        big = tl.maximum(big, tl.abs(_x_tile(x_row, t, num_words, EVEN_K, BLOCK_KP).to(tl.float32)))
    amax = tl.max(tl.max(big, axis=1), axis=0)
    return tl.where(amax > 0, amax, 1.0)


@triton.jit
def _x_pairs(xt, inv, USE_PTX: tl.constexpr, BLOCK_KP: tl.constexpr):
    """A tile's x [BLOCK_KP, 8] / amax as f16x2 pairs p0..p3 [1, BLOCK_KP] int32: p_c = (x[8 kp + c], x[8 kp + c + 4]),
    as the PTX's word halves hold (q_c, q_{c+4})."""
    xt = xt.to(tl.float32) * inv
    lo, hi = tl.split(tl.permute(tl.reshape(xt, [BLOCK_KP, 2, 4]), (0, 2, 1)))  # [BLOCK_KP, 4]: x_c, x_{c+4}
    pairs = tl.reshape(_pair(lo, hi, USE_PTX), [BLOCK_KP, 2, 2])  # [BLOCK_KP, a, b]: c = 2a + b
    even, odd = tl.split(pairs)  # c in (0, 2), (1, 3)
    p0, p2 = tl.split(even)
    p1, p3 = tl.split(odd)
    return p0[None, :], p1[None, :], p2[None, :], p3[None, :]


@triton.jit
def _gemv_f16x2_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,  # x [M, K]; out [num_splits, M, N]
    N, K, stride_xm, stride_qa, stride_qb, stride_sg, stride_sn, stride_zg, stride_zn, stride_os, stride_om,
    tiles_per_split,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, USE_PTX: tl.constexpr,
    PDL: tl.constexpr,
):
    """One row m, BLOCK_N outputs, this split's K tiles of BLOCK_KP words (8 values each); the next tile's
    words in flight while this one is taken, the first tile's while x's largest value is found."""
    m = tl.program_id(0)
    pid_s = tl.program_id(2)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = offs_n < N
    num_words = K // 8
    t_start, t_end = _split_tiles(tiles_per_split, num_words, BLOCK_KP)
    kp_end = tl.minimum(num_words, t_end * BLOCK_KP)
    words, s = _gemv_load(qw_ptr, s_ptr, t_start, t_end, kp_end, offs_n, N, stride_qa, stride_qb, stride_sg,
                          stride_sn, 4, GROUP, False, True, EVEN_K, BLOCK_N, BLOCK_KP)
    wait_prior(PDL)  # gantry_kernels/pdl.py: only the first weight tile is read before the kernel before has finished
    x_row = x_ptr + m * stride_xm
    amax = _split_amax(x_row, t_start, t_end, num_words, EVEN_K, BLOCK_KP)
    inv = 1.0 / amax
    acc = tl.zeros([BLOCK_N, BLOCK_KP], dtype=tl.float32)
    for t in range(t_start, t_end):
        next_words, next_s = _gemv_load(qw_ptr, s_ptr, t + 1, t_end, kp_end, offs_n, N, stride_qa, stride_qb,
                                        stride_sg, stride_sn, 4, GROUP, False, True, EVEN_K, BLOCK_N, BLOCK_KP)
        p0, p1, p2, p3 = _x_pairs(_x_tile(x_row, t, num_words, EVEN_K, BLOCK_KP), inv, USE_PTX, BLOCK_KP)
        if HAS_ZEROS:
            g = t * BLOCK_KP * 8 // GROUP
            zw = tl.load(z_ptr + g * stride_zg + (offs_n // 8) * stride_zn, mask=n_ok, other=0)
            z = ((zw >> ((offs_n % 8) * 4)) & 0xF)[:, None]  # [BLOCK_N, 1]
        else:
            z = tl.full([BLOCK_N, 1], 8, tl.int32)
        zbase = (0x6400 + z) | ((0x6400 + z) << 16)  # f16x2 (1024 + z, 1024 + z)
        zneg = (0xD400 + 16 * z) | ((0xD400 + 16 * z) << 16)  # f16x2 (-(64 + z), -(64 + z))
        shape: tl.constexpr = [BLOCK_N, BLOCK_KP]
        dots = _word_dot(words, tl.broadcast_to(p0, shape), tl.broadcast_to(p1, shape), tl.broadcast_to(p2, shape),
                         tl.broadcast_to(p3, shape), tl.broadcast_to(zbase, shape), tl.broadcast_to(zneg, shape),
                         USE_PTX)
        acc += dots * s
        words, s = next_words, next_s
    out = tl.sum(acc, axis=1) * amax  # [BLOCK_N]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def supports(w: PackedWeight, block_kp: int | None = None) -> bool:
    """4-bit, packed along K, no g_idx, and a scale per tile of block_kp words (default: the configured one)."""
    if w.bits != 4 or w.pack_n or w.g_idx is not None:
        return False
    block_kp = block_kp or f16x2_config(w.n, w.k, w.bits, 1, 1)[1]
    return w.group_size % (block_kp * 8) == 0


def f16x2_config(n: int, k: int, bits: int, m: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_KP, num_warps, num_splits): F16X2_TABLE at M = 1, else quant_gemv's."""
    if m == 1 and (n, k, bits) in F16X2_TABLE:
        return F16X2_TABLE[(n, k, bits)]
    return gemv_config(n, k, bits, m, sms)


def gemv_f16x2(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, use_ptx: bool | None = None,
               config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (unit stride in K) -> [M, N]; config (BLOCK_N, BLOCK_KP, num_warps, num_splits), default
    f16x2_config's for the shape; use_ptx None: the PTX on the GPU."""
    m = x.shape[0]
    sms = num_sms(x.device)
    block_n, block_kp, num_warps, num_splits = config or f16x2_config(w.n, w.k, w.bits, m, sms)
    assert supports(w, block_kp), "4-bit words packed along K, no g_idx, a scale per tile"
    tiles_per_split, num_splits = split_k(triton.cdiv(w.k // 8, block_kp), num_splits)
    out, part = split_output(m, w.n, num_splits, x.dtype, x.device)
    has_bias = bias is not None and num_splits == 1
    zeros = w.zeros if w.zeros is not None else w.scales
    _, _, sg, sn, zg, zn = w.strides
    _gemv_f16x2_kernel[(m, triton.cdiv(w.n, block_n), num_splits)](
        x, w.qweight, w.scales, zeros, bias if has_bias else out, part, w.n, w.k, x.stride(0), w.strides[0],
        w.strides[1], sg, sn, zg, zn, part.stride(0) if num_splits > 1 else 0, part.stride(-2), tiles_per_split,
        GROUP=w.group_size, HAS_ZEROS=w.zeros is not None, HAS_BIAS=has_bias,
        EVEN_K=w.k % (block_kp * 8) == 0, BLOCK_N=block_n, BLOCK_KP=block_kp,
        USE_PTX=x.is_cuda if use_ptx is None else use_ptx, num_warps=num_warps, **launch_kwargs(x.device))
    if num_splits > 1:
        sum_splits(part, out, bias)
    return out
