"""This rank's KV pool: the bytes one block of pages takes, the bytes a GPU has left for the pool after
a profiling forward, and the pages themselves, one K and one V tensor per attention layer. The
ModelRunner sizes and allocates it (determine_num_blocks, allocate_kv_cache)."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.forward_context import ForwardContext
from engine.layers.attention import Attention
from engine.layers.quant.fp8_kv import bind_kv_scales

logger = logging.getLogger("gantry.engine")


def kv_block_bytes(attn_layers: list[Attention], block_size: int, kv_cache_dtype: torch.dtype) -> int:
    """K and V pages of every layer for block_size tokens."""
    a = attn_layers[0]
    elem = kv_cache_dtype.itemsize  # FP8 pages: half the bytes of bf16, twice the tokens
    return 2 * len(attn_layers) * block_size * a.num_kv_heads * a.head_dim * elem


def gpu_kv_budget(device: torch.device, gpu_memory_utilization: float,
                  profile_run: Callable[[], None]) -> tuple[float, dict[str, int]]:
    """Bytes the pool may take: gpu_memory_utilization of the device less the peak of profile_run (a
    forward at the full token budget, over the weights) and what other processes hold; and the figures
    it is made of (benchmarks read them; a short pool shows there which part grew)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)  # weights (and anything else this process holds)
    profile_run()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = total * gpu_memory_utilization - peak - used_by_others
    torch.cuda.empty_cache()
    figures = {"total": total, "allocated_before_profile": before, "profile_activations": peak - before,
               "used_by_others": used_by_others, "pool_budget": int(budget)}
    logger.info("KV budget: %.2f GiB = %.2f x %.2f GiB total - %.2f GiB allocated (weights) - %.2f GiB profile "
                "run - %.2f GiB outside this process's allocator", budget / 2**30, gpu_memory_utilization,
                total / 2**30, before / 2**30, (peak - before) / 2**30, used_by_others / 2**30)
    return budget, figures


def profile_context(num_tokens: int, max_num_seqs: int, device: torch.device) -> ForwardContext:
    """The profiling forward's context: one prefill of num_tokens that writes no page (slots -1)."""
    z = torch.zeros(1, dtype=torch.int32, device=device)
    return ForwardContext(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=device),
        block_tables=z.view(1, 1), seq_lens=z, query_start_loc=torch.tensor([0, num_tokens], device=device),
        logits_indices=torch.arange(min(num_tokens, max_num_seqs), device=device),
        max_query_len=num_tokens, max_seq_len=num_tokens, is_decode=False,
    )


def allocate_kv_pages(attn_layers: list[Attention], num_blocks: int, block_size: int, kv_cache_dtype: torch.dtype,
                      device: torch.device) -> None:
    """Every layer's k_cache and v_cache, and their FP8 scales."""
    a = attn_layers[0]
    shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
    # Not zeroed on CPU, where that took seconds (a page is written before it is read); on a GPU
    # it takes milliseconds and keeps the rows CUDA graphs pad a batch with finite.
    alloc = torch.zeros if device.type == "cuda" else torch.empty
    for layer in attn_layers:
        layer.k_cache = alloc(shape, dtype=kv_cache_dtype, device=device)
        layer.v_cache = alloc(shape, dtype=kv_cache_dtype, device=device)
    bind_kv_scales(attn_layers, kv_cache_dtype)
