"""Paged attention layer: stores this step's K/V into the pages, then attends over them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import get_forward_context
from engine.layers.ops import ops_for


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale
        # [num_blocks, block_size, num_kv_heads, head_dim]; bound by the model runner once sized
        self.k_cache = self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = 1.0  # FP8 pages hold value / scale (engine.layers.quant.fp8_kv)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        ctx = get_forward_context()
        if self.k_cache.numel() == 0:  # profiling run before the KV pool exists: one causal prompt
            # heads expanded by hand: with enable_gqa SDPA falls back to its O(n^2)-memory path
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            # [1, num_heads, num_tokens, head_dim]: the 4-D layout the flash kernels take
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            return o[0].transpose(0, 1)
        ops = ops_for(q)
        ops.store_kvcache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, self.k_scale, self.v_scale)
        if q.is_cuda:
            return ops.paged_attention(
                q, self.k_cache, self.v_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens,
                self.scale, max_query_len=ctx.max_query_len, max_seq_len=ctx.max_seq_len,
                k_scale=self.k_scale, v_scale=self.v_scale,
                query_start_loc_host=ctx.query_start_loc_host, seq_lens_host=ctx.seq_lens_host,
            )
        return ops.paged_attention(
            q, self.k_cache, self.v_cache, ctx.block_tables, ctx.query_start_loc, ctx.seq_lens, self.scale,
            k_scale=self.k_scale, v_scale=self.v_scale,
        )
