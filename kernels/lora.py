"""Triton LoRA kernels after punica: shrink (x @ A^T, to the rank) and expand (y += t @ B^T) with
every token's adapter picked from stacked slots. SGMV-style for prefill (a tile of one segment's
tokens against its adapter, tl.dot), BGMV-style for decode (one token per program; CUDA-graph safe);
lora_augment builds the augmented-K input [x, t masked to each token's own adapter] (engine/lora/augmented.py)
from t; lora_shrink_augment computes t itself in the same launch (decode-sized batches)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_gemv import num_sms, split_k

MIN_PROGRAM_BYTES = 65536  # x and A bytes a split-K program of lora_shrink_augment streams at least
MAX_REDUCE_BYTES = 131072  # float32 partials the last program of a tile sums at most (its tail latency)
NUM_COUNTERS = 4096  # split-K arrival counters per device: (M block, T block) tiles of one launch at most
# (M bucket, K, T) -> (BLOCK_M, BLOCK_T, BLOCK_K, num_splits, num_warps, num_stages) measured best on the H200
# (python -m benchmarks.lora_bench --sweep-fused); shapes not listed take shrink_augment_config's rule
SHRINK_AUGMENT_TABLE: dict[tuple[int, int, int], tuple[int, int, int, int, int, int]] = {}
_counters: dict[torch.device, torch.Tensor] = {}


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
def _store_tail(out_ptr, slots_ptr, acc, rows, offs_m, offs_t, m_ok, t_ok, K, stride_out, cols_per_slot):
    """out[rows, K + offs_t] = acc [BLOCK_M, BLOCK_T] where the column's slot is the token's own, else 0."""
    slot = tl.load(slots_ptr + offs_m, mask=m_ok, other=-1)  # [BLOCK_M]
    keep = (offs_t[None, :] // cols_per_slot) == slot[:, None]
    tl.store(out_ptr + rows[:, None] * stride_out + K + offs_t[None, :],
             tl.where(keep, acc, 0.0).to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & t_ok[None, :])


@triton.jit
def _tile_mask(offs, end, ks, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[len(offs), BLOCK_K]: rows offs < end, columns ks < K (constant along K when EVEN_K: 16-byte loads)."""
    k_ok = tl.full([BLOCK_K], 1, tl.int1) if EVEN_K else ks < K
    return (offs < end)[:, None] & k_ok[None, :]


@triton.jit(do_not_specialize=["tiles_per_split"])
def _shrink_augment_kernel(
    x_ptr,  # [M, K]
    a_ptr,  # [T, K]: every slot's A
    out_ptr,  # [M, K + T]
    slots_ptr,  # [>= M] int32: each token's slot, -1 = no adapter
    part_ptr,  # [num_splits, M, T] float32 (HAS_SPLITS)
    counters_ptr,  # [>= num M blocks * num T blocks] int32 (HAS_SPLITS): zero before and after every launch
    M, K, T, stride_x, stride_a, stride_out, cols_per_slot, tiles_per_split,
    HAS_SPLITS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Tile (M block, T block) of t = x @ A^T over this split's K range; T block 0 also copies x's tiles."""
    pid_m = tl.program_id(0)  # fastest: the M blocks sharing an A tile run together and hit L2
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_ok = offs_m < M
    t_ok = offs_t < T
    rows = offs_m.to(tl.int64)
    k_start = pid_s * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)
    copy_end = tl.where(pid_t == 0, M, 0)  # rows of x this program copies: T block 0's
    # x's copy comes from loads of its own (never xt: Triton 3.6 miscompiles storing a wgmma operand), one tile
    # ahead so that their latency hides behind the dot's
    ks = k_start + tl.arange(0, BLOCK_K)
    xc = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                 mask=_tile_mask(offs_m, copy_end, ks, K, EVEN_K, BLOCK_K), other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                     mask=_tile_mask(offs_m, M, ks, K, EVEN_K, BLOCK_K), other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_ptr + offs_t[:, None] * stride_a + ks[None, :],
                     mask=_tile_mask(offs_t, T, ks, K, EVEN_K, BLOCK_K), other=0.0)  # [BLOCK_T, BLOCK_K]
        acc = tl.dot(xt, tl.trans(at), acc, input_precision=DOT_PRECISION)
        tl.store(out_ptr + rows[:, None] * stride_out + ks[None, :], xc,
                 mask=_tile_mask(offs_m, copy_end, ks, K, EVEN_K, BLOCK_K))
        ks += BLOCK_K
        xc = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], other=0.0,
                     mask=_tile_mask(offs_m, tl.where(k0 + BLOCK_K < k_end, copy_end, 0), ks, K, EVEN_K, BLOCK_K))
    if HAS_SPLITS:  # partials to scratch; the tile's last program to arrive sums them, then resets its counter
        tile_ok = m_ok[:, None] & t_ok[None, :]
        part = offs_m[:, None] * T + offs_t[None, :]  # [BLOCK_M, BLOCK_T] offsets in one split's [M, T]
        tl.store(part_ptr + pid_s * M * T + part, acc, mask=tile_ok)
        tl.debug_barrier()  # every thread's partial stored before the release below
        counter = counters_ptr + pid_m * tl.num_programs(1) + pid_t
        num_splits = tl.num_programs(2)
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            for s0 in range(0, num_splits, 4):
                for i in tl.static_range(4):  # 4 loads in flight, not one L2 round trip per split
                    rows_end = tl.where(s0 + i == pid_s, 0, tl.where(s0 + i < num_splits, M, 0))  # own: acc
                    acc += tl.load(part_ptr + (s0 + i) * M * T + part, other=0.0, cache_modifier=".cg",
                                   mask=(offs_m < rows_end)[:, None] & t_ok[None, :])  # from L2: other SMs'
            tl.store(counter, 0)  # every split has arrived: zero for the next launch (CUDA graph replays)
            _store_tail(out_ptr, slots_ptr, acc, rows, offs_m, offs_t, m_ok, t_ok, K, stride_out, cols_per_slot)
    else:
        _store_tail(out_ptr, slots_ptr, acc, rows, offs_m, offs_t, m_ok, t_ok, K, stride_out, cols_per_slot)


def lora_counters(device: torch.device) -> torch.Tensor:
    """The device's zeroed int32 split-K counters [NUM_COUNTERS] (every launch leaves them zero); allocate them
    before any CUDA graph capture (the LoRA layer does at attach time)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("lora_counters: first allocated under CUDA graph capture; call it before capturing")
        _counters[device] = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]


def shrink_augment_key(m: int, k: int, t: int) -> tuple[int, int, int]:
    """SHRINK_AUGMENT_TABLE's key: (M rounded up to a power of 2 in 16..512, K, T)."""
    return min(512, max(16, triton.next_power_of_2(m))), k, t


def shrink_augment_config(m: int, k: int, t: int, elem_bytes: int, sms: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_T, BLOCK_K, num_splits, num_warps, num_stages): SHRINK_AUGMENT_TABLE's entry, else 64 T
    columns, the largest BLOCK_M (<= 64) that still reaches one program an SM, K split to about one program an
    SM with each program streaming >= MIN_PROGRAM_BYTES and the last one summing <= MAX_REDUCE_BYTES."""
    key = shrink_augment_key(m, k, t)
    if key in SHRINK_AUGMENT_TABLE:
        return SHRINK_AUGMENT_TABLE[key]
    block_t, block_k = min(64, max(16, triton.next_power_of_2(t))), 128 if elem_bytes <= 2 else 64
    for block_m in (64, 32, 16):
        if block_m > key[0] and block_m > 16:
            continue
        tiles = triton.cdiv(m, block_m) * triton.cdiv(t, block_t)
        by_stream = max(1, k // max(block_k, MIN_PROGRAM_BYTES // ((block_m + block_t) * elem_bytes)))
        max_splits = max(1, min(by_stream, MAX_REDUCE_BYTES // (block_m * block_t * 4), triton.cdiv(k, block_k)))
        if tiles * max_splits >= sms:
            break
    return block_m, block_t, block_k, max(1, min(triton.cdiv(sms, tiles), max_splits)), 4, 3


def lora_shrink_augment(x: torch.Tensor, a_all: torch.Tensor, token_slots: torch.Tensor, cols_per_slot: int,
                        out: torch.Tensor, config: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """out [M, K + T] = [x, t with only each token's own slot's columns kept (slot s owns s * cols_per_slot ..),
    the rest 0], t = x [M, K] @ a_all [T, K]^T, in one launch (lora_augment's output without t in memory).
    Split-K tiles meet through lora_counters(x.device): launches of it must not overlap (one stream)."""
    m, k = x.shape
    num_t = a_all.shape[0]
    assert x.stride(1) == 1 and a_all.stride(1) == 1 and out.stride(1) == 1 and a_all.shape[1] == k
    assert out.shape == (m, k + num_t) and x.dtype == a_all.dtype
    if m == 0:
        return out
    block_m, block_t, block_k, num_splits, num_warps, num_stages = config or shrink_augment_config(
        m, k, num_t, x.element_size(), num_sms(x.device))
    tiles_per_split, num_splits = split_k(triton.cdiv(k, block_k), num_splits)
    grid = (triton.cdiv(m, block_m), triton.cdiv(num_t, block_t), num_splits)
    counters = lora_counters(x.device)
    assert grid[0] * grid[1] <= counters.numel(), f"{grid[0] * grid[1]} tiles over {counters.numel()} counters"
    part = torch.empty((num_splits, m, num_t), dtype=torch.float32, device=x.device) if num_splits > 1 else out
    _shrink_augment_kernel[grid](
        x, a_all, out, token_slots, part, counters, m, k, num_t, x.stride(0), a_all.stride(0), out.stride(0),
        cols_per_slot, tiles_per_split, HAS_SPLITS=num_splits > 1, EVEN_K=k % block_k == 0, BLOCK_M=block_m,
        BLOCK_T=block_t, BLOCK_K=block_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
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
