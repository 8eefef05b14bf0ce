"""Triton LoRA kernels after punica: shrink (x @ A^T, to the rank) and expand (y += t @ B^T) with
every token's adapter picked from stacked slots. SGMV-style for prefill (a tile of one segment's
tokens against its adapter, tl.dot), BGMV-style for decode (one token per program; CUDA-graph safe);
lora_augment builds the augmented-K input [x, t masked to each token's own adapter] and lora_mask_ masks the
augmented-N GEMM's t in place (engine/lora/augmented.py)."""
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
def _augment_kernel(
    x_ptr,  # [num_tokens, K]
    t_ptr,  # [num_tokens, T]: x @ A^T of every slot's A
    out_ptr,  # [num_tokens, K + T]
    slots_ptr,  # [>= num_tokens] int32: each token's slot, -1 = no adapter
    K, T, stride_x, stride_t, stride_out, cols_per_slot,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slots_ptr + row)
    head = cols < K
    j = cols - K  # column of t
    keep = (cols >= K) & (cols < K + T) & (j // cols_per_slot == slot)
    v = tl.load(x_ptr + row * stride_x + cols, mask=head, other=0.0)
    v += tl.load(t_ptr + row * stride_t + j, mask=keep, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, v, mask=cols < K + T)


def lora_augment(x: torch.Tensor, t: torch.Tensor, token_slots: torch.Tensor, cols_per_slot: int,
                 out: torch.Tensor) -> torch.Tensor:
    """out [num_tokens, K + T] = [x, t with only each token's own slot's columns (slot s owns
    s * cols_per_slot ..) kept, the rest 0] in one launch; tokens of slot -1 get x and zeros."""
    n, k = x.shape
    num_t = t.shape[1]
    assert x.stride(1) == 1 and t.stride(1) == 1 and out.stride(1) == 1 and out.shape == (n, k + num_t)
    block = 1024
    _augment_kernel[(n, triton.cdiv(k + num_t, block))](x, t, out, token_slots, k, num_t, x.stride(0), t.stride(0),
                                                       out.stride(0), cols_per_slot, BLOCK=block)
    return out


@triton.jit
def _mask_kernel(
    t_ptr,  # [num_tokens, T], rows strided: x @ A^T of every slot's A
    slots_ptr,  # [>= num_tokens] int32: each token's slot, -1 = no adapter
    T, stride_t, cols_per_slot,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    slot = tl.load(slots_ptr + row)
    inside = cols < T
    v = tl.load(t_ptr + row * stride_t + cols, mask=inside & (cols // cols_per_slot == slot), other=0.0)
    tl.store(t_ptr + row * stride_t + cols, v, mask=inside)


def lora_mask_(t: torch.Tensor, token_slots: torch.Tensor, cols_per_slot: int) -> torch.Tensor:
    """Zero t's columns outside each token's own slot (slot s owns s * cols_per_slot ..; slot -1 keeps none),
    in place, in one launch; t [num_tokens, T] may have strided rows."""
    assert t.stride(1) == 1
    _mask_kernel[(t.shape[0],)](t, token_slots, t.shape[1], t.stride(0), cols_per_slot,
                                BLOCK=triton.next_power_of_2(t.shape[1]))
    return t


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
