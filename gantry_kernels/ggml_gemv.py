"""Decode GEMV straight from GGUF's ggml blocks (issue 13): x [M, K] @ W.T for W kept as uint8 blocks
[N, row_bytes] of Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K (layouts: engine/layers/quant/ggml_cpu.py), each
block dequantized in registers with ggml's arithmetic, never written out. One program: row m, BLOCK_N
output rows, one split of K's tiles (256 weights a row: 8 blocks of 32, or one K-quant super-block);
split-K partials are float32, summed by gantry_kernels/quant_gemv.py's sum_splits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.layers.quant.ggml_cpu import (BLOCK_BYTES, GGML_Q4_0, GGML_Q4_1, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K,
                                          GGML_Q8_0, K_QUANTS)
from gantry_kernels.pdl import launch_kwargs, wait_prior
from gantry_kernels.quant_gemv import MIN_PROGRAM_BYTES, num_sms, split_k, split_output, sum_splits

GGML_GEMV_MAX_M = 4  # above this many rows dequantize + matmul (tensor cores) wins: prefill
TILE = 256  # weights a row per loop step: 8 blocks of 32, or one K-quant super-block
GEMV_TYPES = (GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K)
# A tile's words (WORD_BYTES each) of a row as [R, C]
TILE_SHAPE = {GGML_Q4_0: (8, 8), GGML_Q4_1: (8, 4), GGML_Q8_0: (8, 16), GGML_Q4_K: (4, 32),
              GGML_Q5_K: (4, 32), GGML_Q6_K: (8, 8)}
# the widest load a block's alignment allows (Q4_1's 20-byte blocks: 4; Q4_K's and Q5_K's bytes the compiler
# vectorizes itself: 144 and 176 are multiples of 16)
WORD_BYTES = {GGML_Q4_0: 2, GGML_Q4_1: 4, GGML_Q8_0: 2, GGML_Q4_K: 1, GGML_Q5_K: 1, GGML_Q6_K: 2}
_WORD_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
# (N, K, ggml_type) -> (BLOCK_N, num_warps, num_splits) measured best at M = 1; shapes not listed take
# gemv_config's rule. Empty: not yet swept on the H200 (python -m benchmarks.ggml_gemv_bench times the rule).
GEMV_TABLE: dict[tuple[int, int, int], tuple[int, int, int]] = {}
Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K = (tl.constexpr(t) for t in GEMV_TYPES)


@triton.jit
def _f16(h_ptr, byte_off):
    """float32 of the fp16 at even byte offsets (h_ptr: the same blocks viewed as fp16)."""
    return tl.load(h_ptr + (byte_off >> 1)).to(tl.float32)


@triton.jit
def _scale_min_k4(b_ptr, base, s):
    """ggml's get_scale_min_k4: sub-block s's 6-bit scale and min from the 12 bytes at base + 4 (Q4_K, Q5_K)."""
    lo = tl.load(b_ptr + base + 4 + s % 4).to(tl.int32)  # scales[s & 3]
    mid = tl.load(b_ptr + base + 4 + s).to(tl.int32)  # scales[s]
    hi = tl.load(b_ptr + base + 8 + s).to(tl.int32)  # scales[s + 4]
    sc = tl.where(s < 4, mid & 63, (hi & 0xF) | ((lo >> 6) << 4))
    mn = tl.where(s < 4, hi & 63, (hi >> 4) | ((mid >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _blocks32_dot(w_ptr, h_ptr, xm_ptr, row, t, K, GGML_TYPE: tl.constexpr, BB: tl.constexpr, W: tl.constexpr,
                  R: tl.constexpr, C: tl.constexpr):
    """Q4_0, Q4_1, Q8_0: tile t is blocks t R .. t R + R - 1 (r: one block of 32), each's quants C words of W
    bytes (w_ptr: the blocks viewed as such words) -> products [BLOCK_N, R, C]."""
    r = tl.arange(0, R)[None, :, None]  # [1, R, 1]
    c = tl.arange(0, C)[None, None, :]  # [1, 1, C]
    blk = t * R + r  # [1, R, 1]
    k_ok = blk * 32 < K  # a partial last tile: x reads as zero there, and its blocks as the row's last
    base = row + tl.minimum(blk, K // 32 - 1) * BB  # [BLOCK_N, R, 1] byte offsets
    d = _f16(h_ptr, base)
    QS: tl.constexpr = 2 if GGML_TYPE == Q8_0 else BB - 16  # the quants' first byte in a block
    words = tl.load(w_ptr + (base + QS) // W + c).to(tl.int32)  # [BLOCK_N, R, C]
    if GGML_TYPE == Q4_1:
        m = _f16(h_ptr, base + 2)
    prod = tl.zeros(words.shape, dtype=tl.float32)
    for j in tl.static_range(W):  # byte j of word c: weight W c + j (Q4: low nibble, + 16 high)
        k = blk * 32 + c * W + j  # [1, R, C]
        x_lo = tl.load(xm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        if GGML_TYPE == Q8_0:
            prod += d * ((words << (24 - 8 * j)) >> 24).to(tl.float32) * x_lo  # the byte sign-extended
        else:
            x_hi = tl.load(xm_ptr + k + 16, mask=k_ok, other=0.0).to(tl.float32)
            q_lo = ((words >> (8 * j)) & 0xF).to(tl.float32)
            q_hi = ((words >> (8 * j + 4)) & 0xF).to(tl.float32)
            if GGML_TYPE == Q4_0:
                prod += d * (q_lo - 8.0) * x_lo + d * (q_hi - 8.0) * x_hi
            else:
                prod += (d * q_lo + m) * x_lo + (d * q_hi + m) * x_hi
    return prod


@triton.jit
def _q6_k_dot(b_ptr, w_ptr, h_ptr, xm_ptr, row, t):
    """Q6_K super-block t: byte 16 r + 2 c + j of ql (word c of 2 bytes, w_ptr: the blocks as int16) holds
    weight 128 (r // 4) + 16 (r % 4) + 2 c + j (low nibble) and that + 64 (high) -> products [BLOCK_N, 8, 8]."""
    r = tl.arange(0, 8)[None, :, None]  # [1, 8, 1]
    c = tl.arange(0, 8)[None, None, :]  # [1, 1, 8]
    base = row + t * 210  # [BLOCK_N, 1, 1]
    ql = tl.load(w_ptr + (base + r * 16) // 2 + c).to(tl.int32)  # [BLOCK_N, 8, 8]
    # the 2-bit pairs of weights i, + 32, + 64, + 96 (i < 32) share qh's byte i of the half
    qh = tl.load(w_ptr + (base + 128 + (r // 4) * 32 + (r % 2) * 16) // 2 + c).to(tl.int32)
    shift = ((r % 4) // 2) * 2  # [1, 8, 1]
    sub = (r // 4) * 8 + r % 4  # [1, 8, 1]: the low weights' sub-block of 16 (the high ones': + 4)
    d = _f16(h_ptr, base + 208)
    sc_lo = d * tl.load(b_ptr + base + 192 + sub).to(tl.int8, bitcast=True).to(tl.float32)  # [BLOCK_N, 8, 1]
    sc_hi = d * tl.load(b_ptr + base + 196 + sub).to(tl.int8, bitcast=True).to(tl.float32)
    prod = tl.zeros(ql.shape, dtype=tl.float32)
    for j in tl.static_range(2):
        k_lo = t * 256 + (r // 4) * 128 + (r % 4) * 16 + c * 2 + j  # [1, 8, 8]
        x_lo = tl.load(xm_ptr + k_lo).to(tl.float32)
        x_hi = tl.load(xm_ptr + k_lo + 64).to(tl.float32)
        lo = ql >> (8 * j)
        hi = qh >> (8 * j)
        q_lo = ((lo & 0xF) | (((hi >> shift) & 3) << 4)).to(tl.float32) - 32.0
        q_hi = (((lo >> 4) & 0xF) | (((hi >> (shift + 4)) & 3) << 4)).to(tl.float32) - 32.0
        prod += sc_lo * q_lo * x_lo + sc_hi * q_hi * x_hi
    return prod


@triton.jit
def _q45_k_dot(b_ptr, h_ptr, xm_ptr, row, t, GGML_TYPE: tl.constexpr, BB: tl.constexpr):
    """Q4_K, Q5_K super-block t: byte 32 r + c of qs holds weight c of sub-blocks 2 r (low nibble) and 2 r + 1
    (high) -> products [BLOCK_N, 4, 32]."""
    r = tl.arange(0, 4)[None, :, None]  # [1, 4, 1]
    c = tl.arange(0, 32)[None, None, :]  # [1, 1, 32]
    base = row + t * BB  # [BLOCK_N, 1, 1]
    k_lo = t * 256 + r * 64 + c  # [1, 4, 32]
    x_lo = tl.load(xm_ptr + k_lo).to(tl.float32)
    x_hi = tl.load(xm_ptr + k_lo + 32).to(tl.float32)
    qs = tl.load(b_ptr + base + (BB - 128) + r * 32 + c)  # [BLOCK_N, 4, 32]
    q_lo = qs & 0xF
    q_hi = qs >> 4
    if GGML_TYPE == Q5_K:  # bit s of qh[c] is weight c's fifth bit in sub-block s
        qh = tl.load(b_ptr + base + 16 + c)  # [BLOCK_N, 1, 32]
        q_lo = q_lo | (((qh >> (2 * r)) & 1) << 4)
        q_hi = q_hi | (((qh >> (2 * r + 1)) & 1) << 4)
    d = _f16(h_ptr, base)
    dmin = _f16(h_ptr, base + 2)
    sc_lo, mn_lo = _scale_min_k4(b_ptr, base, 2 * r)  # [BLOCK_N, 4, 1]
    sc_hi, mn_hi = _scale_min_k4(b_ptr, base, 2 * r + 1)
    w_lo = (d * sc_lo) * q_lo.to(tl.float32) - dmin * mn_lo
    w_hi = (d * sc_hi) * q_hi.to(tl.float32) - dmin * mn_hi
    return w_lo * x_lo + w_hi * x_hi


@triton.jit(do_not_specialize=["tiles_per_split"])
def _ggml_gemv_kernel(
    x_ptr, b_ptr, w_ptr, h_ptr, out_ptr,  # x [M, K]; blocks uint8 [N, row_bytes], w and h the same as words
    # and as fp16; out [splits, M, N] float32 or [M, N]
    N, K, num_tiles, stride_xm, stride_bn, stride_os, stride_om, tiles_per_split,
    GGML_TYPE: tl.constexpr, BB: tl.constexpr, W: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    """Row m, BLOCK_N outputs, this split's tiles of 256 weights a row."""
    wait_prior(PDL)  # gantry_kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
    m = tl.program_id(0)  # fastest: the rows sharing a weight tile run together and hit L2
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    # rows past N read row N - 1 (no masks on the byte loads) and are not stored
    row = (tl.minimum(offs_n, N - 1) * stride_bn)[:, None, None]  # [BLOCK_N, 1, 1] byte offsets
    xm_ptr = x_ptr + m * stride_xm
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    acc = tl.zeros([BLOCK_N, R, C], dtype=tl.float32)
    for t in range(t_start, t_end):
        if GGML_TYPE == Q6_K:
            acc += _q6_k_dot(b_ptr, w_ptr, h_ptr, xm_ptr, row, t)
        elif GGML_TYPE == Q4_K or GGML_TYPE == Q5_K:
            acc += _q45_k_dot(b_ptr, h_ptr, xm_ptr, row, t, GGML_TYPE, BB)
        else:
            acc += _blocks32_dot(w_ptr, h_ptr, xm_ptr, row, t, K, GGML_TYPE, BB, W, R, C)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BLOCK_N]
    tl.store(out_ptr + pid_s * stride_os + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def gemv_config(n: int, k: int, ggml_type: int, m: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_splits): the table, else 32 rows on 4 warps (a Q4 tile is 4 KB: 32 bytes a
    thread), K split until about 4 programs an SM, each streaming >= MIN_PROGRAM_BYTES of blocks."""
    if (n, k, ggml_type) in GEMV_TABLE:
        return GEMV_TABLE[(n, k, ggml_type)]
    block_n = 32
    num_tiles = triton.cdiv(k, TILE)
    tile_bytes = block_n * BLOCK_BYTES[ggml_type] * (1 if ggml_type in K_QUANTS else TILE // 32)
    max_splits = max(1, num_tiles // triton.cdiv(MIN_PROGRAM_BYTES, tile_bytes))
    return block_n, 4, max(1, min(triton.cdiv(4 * sms, triton.cdiv(n, block_n) * m), max_splits))


def ggml_gemv(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, k: int,
              config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ W.T -> [M, N] in x's dtype (float32 accumulation), W given as blocks
    uint8 [N, row_bytes(ggml_type, K)] (rows may be strided: a tensor-parallel shard's columns)."""
    assert ggml_type in GEMV_TYPES and x.shape[1] == k, (ggml_type, x.shape, k)
    assert blocks.dtype == torch.uint8 and blocks.stride(1) == 1 and blocks.stride(0) % 2 == 0
    assert blocks.storage_offset() % 2 == 0 and blocks.shape[0] * blocks.stride(0) < 2**31, "byte offsets are int32"
    x = x if x.stride(1) == 1 else x.contiguous()
    m, n = x.shape[0], blocks.shape[0]
    block_n, num_warps, num_splits = config or gemv_config(n, k, ggml_type, m, num_sms(x.device))
    num_tiles = triton.cdiv(k, TILE)
    tiles_per_split, num_splits = split_k(num_tiles, num_splits)
    out, part = split_output(m, n, num_splits, x.dtype, x.device)
    r, c = TILE_SHAPE[ggml_type]
    word = WORD_BYTES[ggml_type]
    words = blocks.view(_WORD_DTYPE[word])  # [N, row_bytes / word]: Q4_1's rows are whole 4-byte words
    _ggml_gemv_kernel[(m, triton.cdiv(n, block_n), num_splits)](
        x, blocks, words, blocks.view(torch.float16), part, n, k, num_tiles, x.stride(0), blocks.stride(0),
        part.stride(0) if num_splits > 1 else 0, part.stride(-2), tiles_per_split,
        GGML_TYPE=int(ggml_type), BB=BLOCK_BYTES[ggml_type], W=word, R=r, C=c, BLOCK_N=block_n, num_warps=num_warps,
        **launch_kwargs(x.device))
    if num_splits > 1:
        sum_splits(part, out, None)
    return out
