"""Triton paged prefill / chunked-prefill attention, flash-attention style.

Each sequence's new tokens (packed, query_start_loc) attend causally to each other and to earlier
context, all read from the pages (the new tokens are stored first). A program takes BLOCK_Q new
tokens of one sequence times all query heads of one KV head, so each page is read once per KV head.
FP8 pages are read as value * scale: k_scale folds into the softmax scale, v_scale into the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gantry_kernels.decode_attention import merge_splits, num_sms, split_partials

LOG2E = 1.4426950408889634
# A step whose longest chunk has this many new tokens takes the long-chunk launch (bf16/fp16, head <= 128).
LONG_QUERY = 512
LONG_LAUNCH = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}  # H200 sweep, kernel_bench --long
SHORT_LONG_LAUNCH = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
# split-KV: programs per SM to aim for, the fewest keys worth a split, the most splits and partial bytes
WAVES_PER_SM = 8
MIN_KEYS_PER_SPLIT = 2048
MAX_PREFILL_SPLITS = 16
MAX_SPLIT_BYTES = 512 * 2**20


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning q_block, where sequence i's q-blocks start at query_start_loc[i] // BLOCK_Q + i."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, q_pos, tok0, kv_end,
    k_cache_ptr, v_cache_ptr, block_table, kv_head,
    stride_k_block, stride_k_tok, stride_k_head, stride_v_block, stride_v_tok, stride_v_head,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over context tokens tok0..tok0+BLOCK_N-1."""
    dims = tl.arange(0, HEAD_DIM)
    toks = tok0 + tl.arange(0, BLOCK_N)
    in_page = toks % BLOCK_SIZE
    if CAUSAL_MASK:  # the tile may run past kv_end
        tok_mask = toks < kv_end
        pages = tl.load(block_table + toks // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
    else:  # wholly before the q-block's first position, so before kv_end: no masks
        pages = tl.load(block_table + toks // BLOCK_SIZE).to(tl.int64)
    k_ptrs = k_cache_ptr + (pages * stride_k_block + in_page * stride_k_tok + kv_head * stride_k_head)[:, None] + dims[None, :]
    v_ptrs = v_cache_ptr + (pages * stride_v_block + in_page * stride_v_tok + kv_head * stride_v_head)[:, None] + dims[None, :]
    if CAUSAL_MASK:
        k = tl.load(k_ptrs, mask=tok_mask[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_ptrs, mask=tok_mask[:, None], other=0.0).to(q.dtype)
    else:
        k = tl.load(k_ptrs).to(q.dtype)
        v = tl.load(v_ptrs).to(q.dtype)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if CAUSAL_MASK:
        s = tl.where((toks[None, :] <= q_pos[:, None]) & tok_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = m_new
    if CAUSAL_MASK:  # with split keys a row may see none of them so far: no -inf - -inf (NaN)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# per-step values: specializing on them (== 1, % 16) would compile new variants mid-run
@triton.jit(do_not_specialize=["num_seqs", "num_splits", "part_splits", "part_split0", "stride_bt_seq"])
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    out_ptr,  # [num_tokens, num_heads, head_dim], written without SPLIT_KV
    part_m_ptr,  # [num_tokens, num_heads, num_splits] fp32, running max (log2 domain)
    part_l_ptr,  # [num_tokens, num_heads, num_splits] fp32, softmax denominator
    part_acc_ptr,  # [num_tokens, num_heads, num_splits, head_dim] fp32, unnormalised output
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    num_seqs,
    num_heads,
    num_splits,  # programs sharing one q-block's keys (split-KV), merged by a second kernel
    part_splits,  # partials per (token, head) in the buffers: num_splits, or more when a caller adds its own
    part_split0,  # the first of them this launch writes
    qk_scale,  # softmax scale * log2(e) * k_scale
    v_scale,  # 1.0 unless FP8 pages
    stride_q_tok,
    stride_q_head,
    stride_k_block,
    stride_k_tok,
    stride_k_head,
    stride_v_block,
    stride_v_tok,
    stride_v_head,
    stride_bt_seq,
    stride_o_tok,
    stride_o_head,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P2: tl.constexpr,  # GROUP padded to a power of two
    BLOCK_Q: tl.constexpr,  # new tokens per program
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    BLOCK_N: tl.constexpr,  # context tokens per loop step
    PACK_GQA: tl.constexpr,  # a program takes every query head of one KV head, else one query head
    SPLIT_KV: tl.constexpr,  # num_splits > 1: write partials (a runtime count, so no compile per count)
    DOT_PRECISION: tl.constexpr,
):
    # rows: (new token, query head of this KV head) when packing, else new tokens of one query head
    ROWS_PER_TOKEN: tl.constexpr = GROUP_P2 if PACK_GQA else 1
    HEADS: tl.constexpr = GROUP if PACK_GQA else 1
    BLOCK_M: tl.constexpr = BLOCK_Q * ROWS_PER_TOKEN
    if PACK_GQA:
        q_block = tl.program_id(0)
        kv_head = tl.program_id(1)
        head0 = kv_head * GROUP
    else:  # heads vary fastest: the GROUP programs reading one KV head's tiles run side by side (L2)
        head0 = tl.program_id(0)
        q_block = tl.program_id(1)
        kv_head = head0 // GROUP
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_in_seq = q_block - (q_start // BLOCK_Q + seq)
    if q_block_in_seq * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens before the first new one

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block_in_seq * BLOCK_Q + rows // ROWS_PER_TOKEN  # new-token index within the sequence
    head_in_group = rows % ROWS_PER_TOKEN
    row_mask = (q_idx < q_len) & (head_in_group < HEADS)
    heads = head0 + head_in_group
    dims = tl.arange(0, HEAD_DIM)
    tok_rows = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + tok_rows[:, None] * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM]
    q_pos = context_len + q_idx  # position of each row's token; it sees keys 0..q_pos

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    # Tiles wholly at or before the block's first position need no causal mask.
    first_pos = context_len + q_block_in_seq * BLOCK_Q
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    # this program's share of the keys: whole tiles, the last split ending at kv_end (empty ones write
    # m = -inf, l = 0, which the merge weighs 0)
    split = tl.program_id(2)
    if SPLIT_KV:
        per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, kv_end)
    else:  # loop bounds the compiler sees start at 0 (H200: 384 against 334 TFLOP/s with runtime bounds)
        lo = 0
        hi = kv_end
    for tok0 in range(lo, tl.minimum(hi, unmasked_end), BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, q_pos, tok0, kv_end,
            k_cache_ptr, v_cache_ptr, block_table, kv_head,
            stride_k_block, stride_k_tok, stride_k_head, stride_v_block, stride_v_tok, stride_v_head,
            qk_scale, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
        )
    for tok0 in range(tl.maximum(lo, unmasked_end), hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, q_pos, tok0, kv_end,
            k_cache_ptr, v_cache_ptr, block_table, kv_head,
            stride_k_block, stride_k_tok, stride_k_head, stride_v_block, stride_v_tok, stride_v_head,
            qk_scale, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION,
        )

    if not SPLIT_KV:
        out = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + tok_rows[:, None] * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:  # the decode kernel's partial layout, a token in place of a sequence: one merge kernel serves both
        part = (tok_rows * num_heads + heads) * part_splits + part_split0 + split  # [BLOCK_M]
        tl.store(part_m_ptr + part, m_i, mask=row_mask)
        tl.store(part_l_ptr + part, l_i, mask=row_mask)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc * v_scale, mask=row_mask[:, None])


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], new tokens of every sequence, packed
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], new tokens already stored
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the new tokens
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: float = 1.0,  # FP8 pages: a page holds key / k_scale
    v_scale: float = 1.0,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    pack_gqa: bool | None = None,
    num_splits: int | None = None,
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """reference.paged_attention for any mix of q_len (0 included); launch sized from shapes and the
    host-side max_query_len / max_seq_len only. Long chunks take one query head per program with large
    tiles (the tensor cores' shape on Hopper); short ones pack a KV head's query heads into the rows. A
    chunk with too few programs to fill the GPU over a long context splits the keys (split-KV).
    partials = (m, l, acc, first): write split partials into the caller's split_partials-shaped buffers
    from split `first` on, unmerged (gantry_kernels/cudnn_prefill.py adds its own); out is then left unwritten."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0 and head_dim == triton.next_power_of_2(head_dim)
    assert query.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    long = max_query_len is not None and max_query_len >= LONG_QUERY
    if pack_gqa is None:
        pack_gqa = not long
    small = head_dim > 128 or query.dtype == torch.float32
    if long and not small:
        # a chunk too short to give every SM two programs of 128 rows takes 64-row tiles (H200 at 8,192
        # new tokens: 128 x 128 tiles 384 TFLOP/s, 64 x 64 352, so 64 wins once the second wave is short)
        full = (num_tokens // LONG_LAUNCH["block_m"]) * num_heads >= 2 * num_sms(query.device)
        launch = LONG_LAUNCH if full else SHORT_LONG_LAUNCH
    else:  # tuned on an H100 (bf16, head 128, 32q/8kv): 128 x 32 tiles with 4 warps beat 128 x 64 with 8 by 10%
        launch = {"block_m": 64 if small else 128, "block_n": 32, "num_warps": 4, "num_stages": 2}
    block_m = block_m or launch["block_m"]
    block_n = block_n or launch["block_n"]
    num_warps = num_warps or launch["num_warps"]
    num_stages = num_stages or launch["num_stages"]
    rows_per_token = group_p2 if pack_gqa else 1
    block_q = max(1, block_m // rows_per_token)
    # Every sequence's q-blocks fit in [query_start_loc[i] // block_q + i, ...): no host sync.
    num_q_blocks = num_tokens // block_q + num_seqs
    if num_splits is None:
        chunk_programs = triton.cdiv(max_query_len or num_tokens, block_q) * (num_kv_heads if pack_gqa else num_heads)
        num_splits = choose_prefill_splits(chunk_programs, max_seq_len, num_tokens * num_heads * (head_dim + 2) * 4,
                                           query.device)
    grid = (num_q_blocks, num_kv_heads, num_splits) if pack_gqa else (num_heads, num_q_blocks, num_splits)
    if partials is None:
        part_m, part_l, part_acc = split_partials(num_tokens, num_heads, num_splits, head_dim, query.device)
        part_split0 = 0
    else:
        part_m, part_l, part_acc, part_split0 = partials
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, part_m, part_l, part_acc, block_tables, query_start_loc, seq_lens,
        num_seqs, num_heads, num_splits, num_splits if partials is None else part_m.shape[-1], part_split0,
        scale * LOG2E * k_scale, v_scale,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_Q=block_q,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        PACK_GQA=pack_gqa,
        SPLIT_KV=num_splits > 1 or partials is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1 and partials is None:
        merge_splits(out, part_m, part_l, part_acc, num_splits, MAX_PREFILL_SPLITS)
    return out


def choose_prefill_splits(chunk_programs: int, max_seq_len: int | None, split_bytes: int, device: torch.device) -> int:
    """Key splits per q-block, so that the longest chunk's programs give every SM WAVES_PER_SM of them
    (a 662-token chunk 112K deep: 308 programs of 64 rows, 1.2 waves of two per SM, so 4 splits); none
    below MIN_KEYS_PER_SPLIT keys each, nor partials over MAX_SPLIT_BYTES; shapes only."""
    if max_seq_len is None:
        return 1
    wanted = triton.cdiv(WAVES_PER_SM * num_sms(device), max(chunk_programs, 1))
    worth = max_seq_len // MIN_KEYS_PER_SPLIT
    affordable = MAX_SPLIT_BYTES // max(split_bytes, 1)
    return max(1, min(wanted, worth, affordable, MAX_PREFILL_SPLITS))


def warmup(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, dtype: torch.dtype, scale: float) -> None:
    """Compile every launch variant a step may pick (packed or per-head, 128- or 64-row tiles, split
    keys or not) on a few of the pool's pages, so that no first long prompt stalls the running streams
    for the seconds a compile takes. Reads pages only; its outputs are dropped."""
    num_blocks, block_size, _, head_dim = k_cache.shape
    device = k_cache.device
    for num_tokens, max_query_len in ((64, 64), (LONG_QUERY, LONG_QUERY), (2048, 2048), (8192, 8192)):
        if -(-num_tokens // block_size) > num_blocks:
            continue
        query = torch.zeros(num_tokens, num_heads, head_dim, dtype=dtype, device=device)
        block_tables = torch.arange(-(-num_tokens // block_size), dtype=torch.int32, device=device)[None]
        loc = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
        seq_lens = torch.tensor([num_tokens], dtype=torch.int32, device=device)
        for num_splits in (1, 2):
            prefill_attention(query, k_cache, v_cache, block_tables, loc, seq_lens, scale,
                              max_query_len=max_query_len, num_splits=num_splits)
