"""Triton paged decode attention (one new token per sequence), flash-decoding style.

One program serves all query heads of one KV head (each page is read once) over one split of the
context; with several splits a second kernel merges the partial softmaxes. Shapes alone decide the
launch (no host sync), so a CUDA graph can capture it. FP8 pages are read as value * scale: k_scale
folds into the softmax scale, v_scale into the output.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gantry_kernels.pdl import launch_kwargs, wait_prior

LOG2E = 1.4426950408889634
# Fewest context tokens a split is given. Splits are only added while a batch has fewer programs than SMs, and a
# CUDA graph captured for max_model_len gives a short context only as many splits as it fills (the rest exit at
# once), so this is one token block: H200, one stream, W1's heads, 640-2,048 tokens, graph replays with the merge:
# 5.1-5.8 µs at 32 splits against 7.7-15.1 at 512 tokens a split (benchmarks/RESULTS.md, twenty-fifth session).
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 128
# Programs per SM to aim for when a batch has fewer programs than SMs: one program per SM leaves HBM
# idle between its loads (H200, one stream at 120K: 32 splits 46% of copy bandwidth, 128 splits 87%).
PROGRAMS_PER_SM = 4
# FP8 pages with a bf16 query: widen pages to fp16 rather than bf16 (e4m3 -> bf16 has no single cvt):
# H100, 256 streams x 512 tokens, 12% faster; H200, W1 with FP8 weights and KV, 1.26 -> 1.29x bf16 end to end.
F16_DOT_FOR_FP8 = True


@triton.jit(do_not_specialize=["stride_bt_seq"])  # varies per step outside CUDA graphs
def _decode_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim], written when NUM_SPLITS == 1
    part_m_ptr,  # [num_seqs, num_heads, NUM_SPLITS] fp32, running max (log2 domain)
    part_l_ptr,  # [num_seqs, num_heads, NUM_SPLITS] fp32, softmax denominator
    part_acc_ptr,  # [num_seqs, num_heads, NUM_SPLITS, head_dim] fp32, unnormalised output
    qk_scale,  # softmax scale * log2(e) * k_scale
    v_scale,  # 1.0 unless FP8 pages
    stride_q_seq,
    stride_q_head,
    stride_k_block,
    stride_k_tok,
    stride_k_head,
    stride_v_block,
    stride_v_tok,
    stride_v_head,
    stride_bt_seq,
    stride_o_seq,
    stride_o_head,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P2: tl.constexpr,  # GROUP padded to a power of two >= 16 (the dot's M)
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    BLOCK_N: tl.constexpr,  # context tokens per loop step (may span several pages)
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    F16_DOT: tl.constexpr,  # FP8 pages widen to fp16 (one cvt per pair on sm_89+) and q narrows to fp16
    PDL: tl.constexpr,
):
    wait_prior(PDL)  # gantry_kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens_ptr + seq)
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    rows = tl.arange(0, GROUP_P2)
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    if NUM_SPLITS > 1:  # noqa: SIM102 - a constexpr test apart from the runtime one (Triton)
        if start >= end:  # past this sequence's context (graphs split for max_model_len): the merge skips it
            part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [GROUP_P2]
            tl.store(part_m_ptr + part, tl.full([GROUP_P2], float("-inf"), tl.float32), mask=row_mask)
            return
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )  # [GROUP_P2, HEAD_DIM]
    if F16_DOT:
        q = q.to(tl.float16)

    m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for tok0 in range(start, end, BLOCK_N):
        toks = tok0 + tl.arange(0, BLOCK_N)
        tok_mask = toks < end
        pages = tl.load(block_table + toks // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
        in_page = toks % BLOCK_SIZE
        k_off = pages * stride_k_block + in_page * stride_k_tok + kv_head * stride_k_head
        v_off = pages * stride_v_block + in_page * stride_v_tok + kv_head * stride_v_head
        k = tl.load(k_cache_ptr + k_off[:, None] + dims[None, :], mask=tok_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=tok_mask[:, None], other=0.0)
        k = k.to(q.dtype)  # [BLOCK_N, HEAD_DIM]
        v = v.to(q.dtype)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_P2, BLOCK_N]
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        # An empty context (a padded slot of a captured batch) gives zeros, not NaN.
        out = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [GROUP_P2]
        tl.store(part_m_ptr + part, m_i, mask=row_mask)
        tl.store(part_l_ptr + part, l_i, mask=row_mask)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc * v_scale, mask=row_mask[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    part_m_ptr,  # [num_seqs, num_heads, num_splits]
    part_l_ptr,
    part_acc_ptr,  # [num_seqs, num_heads, num_splits, head_dim]
    stride_o_seq,
    stride_o_head,
    num_splits,
    HEAD_DIM: tl.constexpr,
    SPLITS_P2: tl.constexpr,  # a power of two >= num_splits
    PDL: tl.constexpr,
):
    wait_prior(PDL)  # gantry_kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P2)
    split_mask = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + splits
    m = tl.load(part_m_ptr + part, mask=split_mask, other=float("-inf"))
    used = split_mask & (m > float("-inf"))  # an empty split wrote m = -inf alone: its l and acc are not read
    l = tl.load(part_l_ptr + part, mask=used, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty
    w = tl.exp2(m - m_max)  # [SPLITS_P2]; empty splits have m = -inf, so weight 0
    l_sum = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_o_seq + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty))


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any small number exercises the same paths


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence so that a batch with fewer programs than SMs still keeps PROGRAMS_PER_SM on
    each; shapes only. On an H100 (bf16, head 128) extra splits cost 1-6% once num_seqs * num_kv_heads >= 256."""
    programs = max(num_seqs * num_kv_heads, 1)
    sms = num_sms(device)
    wanted = 1 if programs >= sms else triton.cdiv(PROGRAMS_PER_SM * sms, programs)
    worth = triton.cdiv(max_context, MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, worth, MAX_SPLITS))


def decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim], the one new token of each sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], new tokens already stored
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the new token
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    k_scale: float = 1.0,  # FP8 pages: a page holds key / k_scale
    v_scale: float = 1.0,
    f16_dot: bool | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """paged_attention for q_len = 1 everywhere. max_seq_len (host int) only tunes the split count;
    num_splits, block_n, num_warps, num_stages and f16_dot override the launch heuristics (benchmarks)."""
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and head_dim == triton.next_power_of_2(head_dim)
    assert query.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    if num_splits is None:
        max_context = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context, query.device)
    fp8_pages = k_cache.dtype == torch.float8_e4m3fn
    if block_n is None:  # FP8 pages: half the bytes a step, so twice the tokens (H100, 256 streams: 6-12% faster)
        block_n = 32 if head_dim > 128 or query.dtype == torch.float32 else 128 if fp8_pages else 64
    if f16_dot is None:
        f16_dot = F16_DOT_FOR_FP8 and fp8_pages and query.dtype == torch.bfloat16
    part_m, part_l, part_acc = split_partials(num_seqs, num_heads, num_splits, head_dim, query.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, out, part_m, part_l, part_acc,
        scale * LOG2E * k_scale, v_scale,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group,
        GROUP_P2=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        F16_DOT=f16_dot,
        num_warps=num_warps,
        num_stages=num_stages,
        **launch_kwargs(query.device),
    )
    if num_splits > 1:
        merge_splits(out, part_m, part_l, part_acc, num_splits)
    return out


def split_partials(rows: int, num_heads: int, num_splits: int, head_dim: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty fp32 partials for merge_splits: m, l [rows, num_heads, num_splits] and acc [..., head_dim];
    one-element stand-ins with one split (never read)."""
    shape = (rows, num_heads, num_splits) if num_splits > 1 else (1,)
    acc_shape = (*shape, head_dim) if num_splits > 1 else (1,)
    return (torch.empty(shape, dtype=torch.float32, device=device), torch.empty(shape, dtype=torch.float32, device=device),
            torch.empty(acc_shape, dtype=torch.float32, device=device))


def merge_splits(out: torch.Tensor, part_m: torch.Tensor, part_l: torch.Tensor, part_acc: torch.Tensor,
                 num_splits: int, max_splits: int | None = None) -> None:
    """out [rows, num_heads, head_dim] = the softmax-weighted sum of each row's num_splits partials
    (part_m, part_l [rows, num_heads, num_splits], part_acc [..., head_dim]); a row is a decoding
    sequence here, a new token in prefill_attention. max_splits: one compiled variant for every count
    up to it (prefill picks counts per step; a compile mid-serve is a second's stall)."""
    rows, num_heads, head_dim = out.shape
    _merge_splits_kernel[(rows, num_heads)](
        out, part_m, part_l, part_acc,
        out.stride(0), out.stride(1), num_splits,
        HEAD_DIM=head_dim,
        SPLITS_P2=triton.next_power_of_2(max_splits or num_splits),
        **launch_kwargs(out.device),
    )
