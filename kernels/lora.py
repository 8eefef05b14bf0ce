"""Triton LoRA kernels after punica: shrink (x @ A^T, to the rank) and expand (y += t @ B^T) with
every token's adapter picked from stacked slots. SGMV-style for prefill (a tile of one segment's
tokens against its adapter, tl.dot), BGMV-style for decode (one token per program; CUDA-graph safe);
lora_shrink_augment builds the augmented-K input [x, x @ A^T of each token's own adapter] in one launch
(engine/lora/augmented.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sgmv_kernel(
    x_ptr,  # [num_tokens, K]
    w_ptr,  # [num_slots, N, K]
    y_ptr,  # [num_tokens, >= y_offset + N]
    seg_start_ptr,  # [num_segments + 1] int32: offsets of segments (one adapter each) in token order or in perm
    seg_slot_ptr,  # [num_segments] int32: each segment's slot, -1 = no adapter
    perm_ptr,  # [>= num_tokens] int32 (HAS_PERM): token rows grouped by adapter, segments index into it
    x_col_ptr,  # [cdiv(N, BLOCK_N)] int32 (HAS_X_COL): first column of x each output tile reads (fused slices)
    N, K, stride_x, stride_ws, stride_wn, stride_y, y_offset,
    ADD: tl.constexpr, HAS_PERM: tl.constexpr, HAS_X_COL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    m0 = start + tl.program_id(1) * BLOCK_M
    pid_n = tl.program_id(2) // SPLIT_K
    pid_k = tl.program_id(2) % SPLIT_K
    if slot >= 0 and m0 < end:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        if HAS_PERM:
            rows = tl.load(perm_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        else:
            rows = offs_m.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        w_base = w_ptr + slot.to(tl.int64) * stride_ws
        x_base = x_ptr
        if HAS_X_COL:  # expand of several slices at once: this tile's slice reads its own rank columns of x
            x_base = x_ptr + tl.load(x_col_ptr + pid_n)
        k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # split-K: a small N (the rank) over a long K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * k_per_split, tl.minimum((pid_k + 1) * k_per_split, K), BLOCK_K):
            ks = k0 + offs_k
            xt = tl.load(x_base + rows[:, None] * stride_x + ks[None, :],
                         mask=m_mask[:, None] & (ks[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
            wt = tl.load(w_base + offs_n[:, None] * stride_wn + ks[None, :],
                         mask=(offs_n[:, None] < N) & (ks[None, :] < K), other=0.0)  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(xt.to(wt.dtype), tl.trans(wt), acc, input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + rows[:, None] * stride_y + y_offset + offs_n[None, :]
        mask = m_mask[:, None] & (offs_n[None, :] < N)
        if SPLIT_K > 1:  # partial sums of a float32 output
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
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


@triton.jit
def _shrink_augment_kernel(
    x_ptr,  # [num_tokens, K]
    a_ptr,  # [num_slots * cols_per_slot, K]: every slot's A, slot-major
    out_ptr,  # [num_tokens, K + num_slots * cols_per_slot]
    slots_ptr,  # [>= num_tokens] int32: each token's slot, -1 = no adapter
    num_tokens, K, cols_per_slot, stride_x, stride_a, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # program (slot, token tile, column tile of the slot's cols_per_slot); slot varies fastest, so the
    # programs of one token tile run together and read its x from L2
    slot = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_n = tl.program_id(2)
    m_mask = offs_m < num_tokens
    rows = offs_m.to(tl.int64)
    mine = tl.load(slots_ptr + offs_m, mask=m_mask, other=-1) == slot  # [BLOCK_M]: this slot's tokens
    num_mine = tl.sum(mine.to(tl.int32), axis=0)
    # one program per token tile copies x into the head columns: the one of the tile's first token's slot (a
    # prefill tile is mostly one adapter's: that program reads x for its dot anyway), slot 0 if it has none
    owner = tl.maximum(tl.load(slots_ptr + tl.program_id(1) * BLOCK_M), 0)
    copy = (slot == owner) & (pid_n == 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of the slot's cols_per_slot
    n_mask = offs_n < cols_per_slot
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if (num_mine > 0) | copy:  # else (a token tile without this slot's tokens, most in a prefill): zeros only
        # the scalar conditions as vector masks: rows this program copies, A rows it reads (none if it only copies)
        m_copy = m_mask & ((offs_m * 0 + copy.to(tl.int32)) != 0)
        n_read = n_mask & ((offs_n * 0 + num_mine) > 0)
        a_base = a_ptr + (slot * cols_per_slot + offs_n).to(tl.int64)[:, None] * stride_a
        for k0 in range(0, K, BLOCK_K):  # no branch inside: masks instead, so Triton pipelines the loads
            ks = k0 + offs_k
            k_mask = ks < K
            x_mask = m_mask[:, None] & k_mask[None, :]
            xt = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=x_mask, other=0.0)  # [BM, BK]
            tl.store(out_ptr + rows[:, None] * stride_out + ks[None, :], xt, mask=m_copy[:, None] & k_mask[None, :])
            at = tl.load(a_base + ks[None, :], mask=n_read[:, None] & k_mask[None, :],
                         other=0.0)  # [BLOCK_N, BLOCK_K]; not read by a program that only copies
            acc = tl.dot(xt.to(at.dtype), tl.trans(at), acc, input_precision=DOT_PRECISION)
    # this slot's columns of the tail: t for its own tokens, 0 for every other token (other slots, -1, padding)
    acc = tl.where(mine[:, None], acc, 0.0)
    t_ptrs = out_ptr + rows[:, None] * stride_out + K + (slot * cols_per_slot + offs_n)[None, :]
    tl.store(t_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def lora_shrink_augment(x: torch.Tensor, a_all: torch.Tensor, token_slots: torch.Tensor, cols_per_slot: int,
                        out: torch.Tensor) -> torch.Tensor:
    """out [num_tokens, K + T] = [x, t] in one launch: t = x @ a_all^T [T = num_slots * cols_per_slot, K]^T
    with only each token's own slot's columns (slot s owns s * cols_per_slot ..) computed, the rest 0;
    tokens of slot -1 (and rows past token_slots' batch, -1 too) get x and zeros."""
    n, k = x.shape
    num_t = a_all.shape[0]
    assert x.stride(1) == 1 and a_all.stride(1) == 1 and out.stride(1) == 1 and out.shape == (n, k + num_t)
    assert num_t % cols_per_slot == 0 and token_slots.shape[0] >= n
    # decode: tiles of 16 tokens (more programs over few tokens), each streaming all of K through few rows, so
    # wide K steps and more of them in flight; prefill: tiles of 64 (a slot's A read by fewer tiles)
    decode = n <= 1024
    block_m, block_k, stages = (16, 128, 4) if decode else (64, 64, 3)
    block_n = min(64, max(16, triton.next_power_of_2(cols_per_slot)))
    grid = (num_t // cols_per_slot, triton.cdiv(n, block_m), triton.cdiv(cols_per_slot, block_n))
    _shrink_augment_kernel[grid](x, a_all, out, token_slots, n, k, cols_per_slot, x.stride(0), a_all.stride(0),
                                 out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                 DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_stages=stages)
    return out


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    assert x.stride(-1) == 1 and w.stride(-1) == 1 and w.stride(1) == w.shape[2], "rows must be contiguous"
    assert x.shape[1] == w.shape[2], f"x has {x.shape[1]} features, the adapter stack {w.shape[2]}"


def sgmv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, seg_start: torch.Tensor, seg_slot: torch.Tensor,
         max_seg_len: int, offset: int = 0, add: bool = False, perm: torch.Tensor | None = None,
         split_k: int = 1, block_m: int | None = None, block_n: int | None = None, block_k: int = 32,
         x_col: torch.Tensor | None = None) -> None:
    """Per segment s: y[rows, offset:offset+N] (+)= x[rows] @ w[seg_slot[s]]^T, rows = the segment's tokens
    (perm[seg_start[s]:seg_start[s+1]] with perm, else that range itself); segments of -1 untouched.
    x [num_tokens, K], w [num_slots, N, K]; max_seg_len: host-side, so nothing syncs the device.
    split_k > 1 adds partial sums atomically: y must be float32 and is added to. x_col [cdiv(N, block_n)]:
    output tile j reads x's columns x_col[j]..x_col[j] + K (one expand for q, k and v: K is the rank)."""
    if x_col is None:
        _check(x, w)
    assert split_k == 1 or (add and y.dtype == torch.float32), "split-K accumulates into a float32 output"
    n_out, k = w.shape[1], w.shape[2]
    block_n = block_n or min(64, max(16, triton.next_power_of_2(n_out)))
    block_m = block_m or min(64, max(16, triton.next_power_of_2(max_seg_len)))
    grid = (seg_slot.shape[0], triton.cdiv(max_seg_len, block_m), triton.cdiv(n_out, block_n) * split_k)
    _sgmv_kernel[grid](x, w, y, seg_start, seg_slot, seg_start if perm is None else perm,
                       seg_start if x_col is None else x_col, n_out, k, x.stride(0),
                       w.stride(0), w.stride(1), y.stride(0), offset, ADD=add, HAS_PERM=perm is not None,
                       HAS_X_COL=x_col is not None,
                       SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
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
