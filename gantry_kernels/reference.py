"""Plain-torch kernels: the CPU path of the engine and the oracle for the Triton kernels.

KV cache layout (shared with gantry_kernels/*.py): per layer one K and one V tensor of shape
[num_blocks, block_size, num_kv_heads, head_dim]; a token's slot is block_id * block_size + offset.
FP8 pages (float8_e4m3fn) hold value / scale with one k_scale and v_scale per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kvcache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int; -1: do not store (padding)
    k_scale: float = 1.0,  # FP8 pages: the stored value is key / k_scale
    v_scale: float = 1.0,
) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key, value = key[valid], value[valid]
    if k_cache.dtype == torch.float8_e4m3fn:  # saturate: e4m3fn has no infinity
        key = (key.float() * (1.0 / k_scale)).clamp(-448.0, 448.0).to(k_cache.dtype).view(torch.uint8)
        value = (value.float() * (1.0 / v_scale)).clamp(-448.0, 448.0).to(v_cache.dtype).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)  # no FP8 index_copy_ on CPU
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def _read_pages(pages: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Gathered page values in `dtype`, times the layer's scale when the pages are FP8."""
    if pages.dtype == torch.float8_e4m3fn:
        return (pages.float() * scale).to(dtype)
    return pages.to(dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence, read through its block table: [seq_len, H, D]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    if cache.dtype == torch.float8_e4m3fn:  # indexed as bytes: no FP8 gather on CPU
        return gather_kv(cache.view(torch.uint8), block_table, seq_len).view(cache.dtype)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], new tokens of every sequence, packed
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], new tokens already stored
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32, offsets of each sequence's tokens in query
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the new tokens
    scale: float,
    max_query_len: int | None = None,  # host-side hints for the Triton path (no GPU sync); unused here
    max_seq_len: int | None = None,
    k_scale: float = 1.0,  # FP8 pages: a page holds key / k_scale, value / v_scale
    v_scale: float = 1.0,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole context in the pages.

    The i-th of q_len new tokens sits at position seq_len - q_len + i and attends to positions
    0..itself. Prefill, chunked prefill, prefix-cache hits and decode (q_len = 1) are all this.
    """
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q = query[starts[i] : starts[i + 1]]  # [q_len, H, D]
        q_len = q.shape[0]
        if q_len == 0:
            continue
        k = _read_pages(gather_kv(k_cache, block_tables[i], seq_len), k_scale, q.dtype)  # [seq_len, Hkv, D]
        v = _read_pages(gather_kv(v_cache, block_tables[i], seq_len), v_scale, q.dtype)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        # [H, q_len, seq_len]
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=query.device).unsqueeze(0)
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[i] : starts[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)
    return out


def decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim], the one new token of each sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], new tokens already stored
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the new token
    scale: float,
    max_seq_len: int | None = None,  # host-side hint for the Triton path; unused here
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """paged_attention with q_len = 1 for every sequence (the CUDA-graph entry point on GPU)."""
    query_start_loc = torch.arange(seq_lens.shape[0] + 1, dtype=torch.int32, device=query.device)
    return paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                           k_scale=k_scale, v_scale=v_scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    orig_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(orig_dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + residual; return (rms_norm(residual), residual)."""
    residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(residual, weight, eps), residual


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotation (the halves of each head are the pairs), as HF Llama/Qwen do."""
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(query), rotate(key)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * d] (gate, up) -> [num_tokens, d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    a_stack: torch.Tensor,  # [num_slots, rank, in_features]: every resident adapter's A
    token_slots: torch.Tensor,  # [>= num_tokens] int: each token's slot, -1 = no adapter
) -> torch.Tensor:
    """LoRA's first matmul per token with its own adapter: [num_tokens, rank] float32 (0 without one)."""
    n = x.shape[0]
    slots = token_slots[:n]
    out = torch.zeros(n, a_stack.shape[1], dtype=torch.float32, device=x.device)
    for s in slots.unique().tolist():  # one matmul per adapter present (punica's grouping, in torch)
        if s >= 0:
            rows = (slots == s).nonzero().squeeze(1)
            out[rows] = x[rows].float() @ a_stack[s].float().t()
    return out


def lora_expand(
    t: torch.Tensor,  # [num_tokens, rank] float32, lora_shrink's output
    b_stack: torch.Tensor,  # [num_slots, out_features, rank]
    token_slots: torch.Tensor,  # [>= num_tokens] int, -1 = no adapter
    y: torch.Tensor,  # [num_tokens, >= offset + out_features], updated in place
    offset: int,  # first column of y this slice adds into
) -> None:
    """y[:, offset:offset + out_features] += t @ B[slot]^T for tokens with an adapter."""
    n, out_features = t.shape[0], b_stack.shape[1]
    slots = token_slots[:n]
    for s in slots.unique().tolist():
        if s >= 0:
            rows = (slots == s).nonzero().squeeze(1)
            delta = t[rows] @ b_stack[s].float().t()  # [rows, out_features]
            y[rows, offset : offset + out_features] += delta.to(y.dtype)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, awq_order: bool = False) -> torch.Tensor:
    """Unsigned values packed little-endian into int32 words along `dim` -> int64, that dim 32 / bits
    times longer. AWQ's order puts value c of a word at nibble c // 2 + 4 * (c % 2)."""
    pack = 32 // bits
    pos = torch.arange(pack, device=packed.device)
    if awq_order:
        pos = pos // 2 + (pos % 2) * 4
    words = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # [..., num_words]
    values = (words.unsqueeze(-1) >> (pos * bits)) & ((1 << bits) - 1)  # [..., num_words, pack]
    return values.flatten(-2).movedim(-1, dim)


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      g_idx: torch.Tensor | None, bits: int, group_size: int, layout: str) -> torch.Tensor:
    """float32 [N, K]: (q - zero) * scale, layouts as gantry_kernels.quant_gemm.dequant_gemm documents."""
    if layout == "compressed-tensors":
        q, scales = unpack_int32(qweight, bits, 1).t(), scales.t()  # q [K, N], scales [num_groups, N]
    elif layout == "gptq":
        q = unpack_int32(qweight, bits, 0)
    else:
        q = unpack_int32(qweight, bits, 1, awq_order=True)
    k = q.shape[0]
    group = group_size if group_size > 0 else k
    groups = g_idx.long() if g_idx is not None else torch.arange(k, device=q.device) // group
    zero = unpack_int32(zeros, bits, 1, awq_order=layout == "awq")[groups] if zeros is not None else 2 ** (bits - 1)
    return ((q - zero).float() * scales.float()[groups]).t()  # [N, K]


def dequant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 g_idx: torch.Tensor | None, bits: int, group_size: int, layout: str,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantized w.T (+ bias) in float32, returned in x's dtype."""
    w = dequantize_packed(qweight, scales, zeros, g_idx, bits, group_size, layout)
    out = x.float() @ w.t()
    return (out if bias is None else out + bias.float()).to(x.dtype)
