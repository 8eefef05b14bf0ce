"""The FP8 decode GEMV of kernels/weight_gemv.py with packed half arithmetic: fewer instructions a weight.

weight_gemv.py takes each e4m3 weight to float32 (a byte permute, a half-to-float convert, after one e4m3x2 -> f16x2
convert a pair) and multiplies it with an FFMA: ~6 SASS instructions a weight in its loop, and the FP8 GEMV streams
about as many weights a second as the 4-bit one (0.82 of copy bandwidth on W1's gate_up, where issue 14's TPOT line
needs ~0.94). Here an int32 word of four e4m3 weights is two `cvt.rn.f16x2.e4m3x2` (exact: e4m3 values are f16
values) and one f16x2 multiply and one FMA with x's pairs (x0, x1), (x2, x3), its halves added and converted: ~2 a weight.

f16 overflows where bf16 does not, so x is divided by its largest |x| over the program's K range before the
conversion (a word's products then stay within 4 x 448) and the sums are multiplied back. The row scale is applied at the end.
On the GPU a word is one inline PTX block; in Triton's interpreter the same sum is taken in float32 from the same
operands, so CPU tests check the packing. Off by default (GANTRY_FP8_GEMV_F16X2=1) until measured on the device.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.quant_gemv import num_sms, split_k, split_output, sum_splits
from kernels.quant_gemv_f16x2 import HALF2_TO_SUM, _half, _pair, split_amax, split_tiles
from kernels.weight_gemv import gemv_config

FP8_GEMV_F16X2 = os.environ.get("GANTRY_FP8_GEMV_F16X2", "0") == "1"

# $0 = the float32 sum of a word's 4 products; $1 the word (e4m3 bytes 0-3 = weights k..k+3), $2 (x0, x1), $3 (x2, x3)
WORD_DOT_PTX = tl.constexpr("""
{
.reg .b16 l, h, lo, hi;
.reg .b32 a, b0, b1;
mov.b32 {l, h}, $1;
cvt.rn.f16x2.e4m3x2 b0, l;
cvt.rn.f16x2.e4m3x2 b1, h;
mul.f16x2 a, b0, $2;
fma.rn.f16x2 a, b1, $3, a;""" + HALF2_TO_SUM)


@triton.jit
def _e4m3(byte):
    """float32 of e4m3 bits (int32, low 8 bits)."""
    return (byte & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _word_dot(words, p0, p1, USE_PTX: tl.constexpr):
    """[BLOCK_N, BLOCK_KW] float32: sum over each word's 4 e4m3 weights times x (as packed in p0, p1)."""
    if USE_PTX:
        return tl.inline_asm_elementwise(WORD_DOT_PTX, "=f,r,r,r", [words, p0, p1], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:  # the same sum in float32 from the same operands (products not rounded to f16)
        return (_e4m3(words) * _half(p0) + _e4m3(words >> 8) * _half(p0 >> 16)
                + _e4m3(words >> 16) * _half(p1) + _e4m3(words >> 24) * _half(p1 >> 16))


@triton.jit(do_not_specialize=["tiles_per_split"])
def _fp8_gemv_f16x2_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,  # x [M, K]; w int32 [N, K / 4] (e4m3 bytes); ws [N] float32
    N, K, stride_xm, stride_wn, stride_os, stride_om, tiles_per_split,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr, USE_PTX: tl.constexpr,
):
    """Row m, BLOCK_N outputs, this split's K range in [BLOCK_N, BLOCK_KW] word tiles (4 weights a word)."""
    m = tl.program_id(0)
    pid_s = tl.program_id(2)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = offs_n < N
    num_words = K // 4
    t_start, t_end = split_tiles(tiles_per_split, num_words, BLOCK_KW)
    x_row = x_ptr + m * stride_xm
    amax = split_amax(x_row, t_start, t_end, num_words, 4, EVEN_K, BLOCK_KW)
    inv = 1.0 / amax
    acc = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
    for t in range(t_start, t_end):
        kw = t * BLOCK_KW + tl.arange(0, BLOCK_KW)  # [BLOCK_KW] word index along K
        kw_ok = tl.full([BLOCK_KW], 1, tl.int1) if EVEN_K else kw < num_words
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + kw[None, :], mask=n_ok[:, None] & kw_ok[None, :],
                        other=0)
        x0 = tl.load(x_row + kw * 4 + 0, mask=kw_ok, other=0.0).to(tl.float32) * inv
        x1 = tl.load(x_row + kw * 4 + 1, mask=kw_ok, other=0.0).to(tl.float32) * inv
        x2 = tl.load(x_row + kw * 4 + 2, mask=kw_ok, other=0.0).to(tl.float32) * inv
        x3 = tl.load(x_row + kw * 4 + 3, mask=kw_ok, other=0.0).to(tl.float32) * inv
        shape: tl.constexpr = [BLOCK_N, BLOCK_KW]
        p0 = tl.broadcast_to(_pair(x0, x1)[None, :], shape)  # f16x2 (x0, x1): the word's low bytes
        p1 = tl.broadcast_to(_pair(x2, x3)[None, :], shape)
        acc += _word_dot(words, p0, p1, USE_PTX)
    out = tl.sum(acc, axis=1) * amax  # [BLOCK_N]
    if HAS_SCALE:
        out *= tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def supports(weight: torch.Tensor) -> bool:
    """e4m3 rows of whole int32 words."""
    return weight.dtype == torch.float8_e4m3fn and weight.shape[1] % 4 == 0 and weight.stride(0) % 4 == 0


def fp8_gemv_f16x2(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None = None,
                   config: tuple[int, int, int, int] | None = None, use_ptx: bool | None = None) -> torch.Tensor:
    """weight_gemv's contract for e4m3 weights (scale float32 [N] or None); config as weight_gemv's (BLOCK_K counts
    weights: a multiple of 4); use_ptx None: the PTX on the GPU."""
    m, k = x.shape
    n = weight.shape[0]
    assert supports(weight) and x.stride(1) == 1, "e4m3 rows of whole int32 words, x contiguous along K"
    block_n, block_k, num_warps, num_splits = config or gemv_config(n, k, m, num_sms(x.device), 1)
    block_kw = block_k // 4
    tiles_per_split, num_splits = split_k(triton.cdiv(k // 4, block_kw), num_splits)
    out, part = split_output(m, n, num_splits, x.dtype, x.device)
    has_bias = bias is not None and num_splits == 1
    words = weight.view(torch.int32)  # [N, K / 4]: e4m3 bytes little-endian in each word
    _fp8_gemv_f16x2_kernel[(m, triton.cdiv(n, block_n), num_splits)](
        x, words, out if scale is None else scale, bias if has_bias else out, part, n, k, x.stride(0),
        words.stride(0), part.stride(0) if num_splits > 1 else 0, part.stride(-2), tiles_per_split,
        HAS_SCALE=scale is not None, HAS_BIAS=has_bias, EVEN_K=(k // 4) % block_kw == 0, BLOCK_N=block_n,
        BLOCK_KW=block_kw, USE_PTX=x.is_cuda if use_ptx is None else use_ptx, num_warps=num_warps)
    if num_splits > 1:
        sum_splits(part, out, bias)
    return out
