"""Triton LoRA kernels after punica: shrink (x @ A^T, to the rank) and expand (y += t @ B^T) with
every token's adapter picked from stacked slots. SGMV-style for prefill (a tile of one segment's
tokens against its adapter, tl.dot), BGMV-style for decode (one token per program; CUDA-graph safe)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sgmv_kernel(
    x_ptr,  # [num_tokens, K]
    w_ptr,  # [num_slots, N, K]
    y_ptr,  # [num_tokens, >= y_offset + N]
    seg_start_ptr,  # [num_segments + 1] int32: token offsets of segments (one adapter each)
    seg_slot_ptr,  # [num_segments] int32: each segment's slot, -1 = no adapter
    N, K, stride_x, stride_ws, stride_wn, stride_y, y_offset,
    ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    m0 = start + tl.program_id(1) * BLOCK_M
    if slot >= 0 and m0 < end:
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            xt = tl.load(x_ptr + offs_m[:, None] * stride_x + ks[None, :],
                         mask=(offs_m[:, None] < end) & (ks[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
            wt = tl.load(w_base + offs_n[:, None] * stride_wn + ks[None, :],
                         mask=(offs_n[:, None] < N) & (ks[None, :] < K), other=0.0)  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(xt.to(wt.dtype), tl.trans(wt), acc, input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + offs_m[:, None] * stride_y + y_offset + offs_n[None, :]
        mask = (offs_m[:, None] < end) & (offs_n[None, :] < N)
        if ADD:
            acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bgmv_kernel(
    x_ptr,  # [num_tokens, K]
    w_ptr,  # [num_slots, N, K]
    y_ptr,  # [num_tokens, >= y_offset + N]
    slots_ptr,  # [>= num_tokens] int32: each token's slot, -1 = no adapter
    N, K, stride_x, stride_ws, stride_wn, stride_y, y_offset,
    ADD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + tok)
    if slot >= 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            xk = tl.load(x_ptr + tok * stride_x + ks, mask=ks < K, other=0.0).to(tl.float32)  # [BLOCK_K]
            wt = tl.load(w_base + offs_n[:, None] * stride_wn + ks[None, :],
                         mask=(offs_n[:, None] < N) & (ks[None, :] < K), other=0.0)  # [BLOCK_N, BLOCK_K]
            acc += tl.sum(wt.to(tl.float32) * xk[None, :], axis=1)
        y_ptrs = y_ptr + tok * stride_y + y_offset + offs_n
        if ADD:
            acc += tl.load(y_ptrs, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    assert x.stride(-1) == 1 and w.stride(-1) == 1 and w.stride(1) == w.shape[2], "rows must be contiguous"
    assert x.shape[1] == w.shape[2], f"x has {x.shape[1]} features, the adapter stack {w.shape[2]}"


def sgmv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, seg_start: torch.Tensor, seg_slot: torch.Tensor,
         max_seg_len: int, offset: int = 0, add: bool = False) -> None:
    """Per segment s: y[seg, offset:offset+N] (+)= x[seg] @ w[seg_slot[s]]^T (segments of -1 untouched).
    x [num_tokens, K], w [num_slots, N, K]; max_seg_len: host-side, so nothing syncs the device."""
    _check(x, w)
    n_out, k = w.shape[1], w.shape[2]
    block_n = min(64, max(16, triton.next_power_of_2(n_out)))
    block_m = min(64, max(16, triton.next_power_of_2(max_seg_len)))
    grid = (seg_slot.shape[0], triton.cdiv(max_seg_len, block_m), triton.cdiv(n_out, block_n))
    _sgmv_kernel[grid](x, w, y, seg_start, seg_slot, n_out, k, x.stride(0), w.stride(0), w.stride(1), y.stride(0),
                       offset, ADD=add, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32,
                       DOT_PRECISION="ieee" if w.dtype == torch.float32 else "tf32")


def bgmv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, token_slots: torch.Tensor, offset: int = 0,
         add: bool = False) -> None:
    """Per token i: y[i, offset:offset+N] (+)= x[i] @ w[token_slots[i]]^T (tokens of -1 untouched)."""
    _check(x, w)
    n_out, k = w.shape[1], w.shape[2]
    block_n = min(128, max(16, triton.next_power_of_2(n_out)))
    block_k = min(256, max(16, triton.next_power_of_2(k)))
    grid = (x.shape[0], triton.cdiv(n_out, block_n))
    _bgmv_kernel[grid](x, w, y, token_slots, n_out, k, x.stride(0), w.stride(0), w.stride(1), y.stride(0), offset,
                       ADD=add, BLOCK_N=block_n, BLOCK_K=block_k)
