"""This rank's KV pool: the bytes one block of pages takes, the bytes a GPU has left for the pool after
the engine's weights and a profiling forward (memory held before the engine started is not its own), and
the pages themselves, one K and one V tensor per attention layer. The ModelRunner sizes and allocates it
(determine_num_blocks, allocate_kv_cache)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from engine.config import ConfigError, EngineConfig
from engine.forward_context import ForwardContext
from engine.layers.attention import Attention
from engine.layers.quant.fp8_kv import bind_kv_scales

if TYPE_CHECKING:
    from engine.model_config import ModelConfig

logger = logging.getLogger("gantry.engine")


def kv_block_bytes(attn_layers: list[Attention], block_size: int, kv_cache_dtype: torch.dtype) -> int:
    """K and V pages of every layer for block_size tokens."""
    a = attn_layers[0]
    elem = kv_cache_dtype.itemsize  # FP8 pages: half the bytes of bf16, twice the tokens
    return 2 * len(attn_layers) * block_size * a.num_kv_heads * a.head_dim * elem


def check_pool_holds_max_model_len(config: EngineConfig, max_model_len: int, num_blocks: int) -> None:
    """Refuse to start (like vLLM) when one max_model_len sequence cannot fit in the KV pool:
    such a request would pass validation and then never be scheduled."""
    capacity = num_blocks * config.block_size
    if capacity < max_model_len:
        raise ConfigError(
            "max_model_len", f"{max_model_len} tokens do not fit in the KV cache, which holds {capacity} "
            f"tokens ({num_blocks} blocks of {config.block_size}); the largest max_model_len that fits is "
            f"{capacity}. Lower max_model_len, or make the cache larger with num_kv_blocks, kv_cache_memory_gib "
            "or gpu_memory_utilization"
        )


def check_max_model_len_fits_memory(config: EngineConfig, model_config: ModelConfig, kv_cache_dtype: torch.dtype,
                                    tp_size: int, pp_size: int, device: torch.device) -> None:
    """Before anything is sized by max_model_len (the rotary cache, the block table, the CPU pool): a ConfigError
    naming it when one sequence of it needs more KV memory than the pool could ever get: num_kv_blocks,
    kv_cache_memory_gib, the GPU's memory at gpu_memory_utilization (weights not yet counted), or the host's
    available memory on CPU. The exact check follows once the pool is sized (check_pool_holds_max_model_len).
    A config.json max_position_embeddings of 10**9 taken as max_model_len allocated terabytes and the
    process was killed."""
    max_model_len = model_config.max_model_len
    if config.num_kv_blocks is not None:
        check_pool_holds_max_model_len(config, max_model_len, config.num_kv_blocks)
        return
    # the fewest bytes a token takes on any rank, so a pool that could fit is never refused
    per_token = (2 * max(1, model_config.num_layers // pp_size) * max(1, model_config.num_kv_heads // tp_size)
                 * model_config.head_dim * kv_cache_dtype.itemsize)
    if config.kv_cache_memory_gib is not None:
        memory, where = config.kv_cache_memory_gib * 2**30, f"kv_cache_memory_gib ({config.kv_cache_memory_gib})"
    elif device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        memory = total * config.gpu_memory_utilization
        where = f"{config.gpu_memory_utilization} of {device}'s {total / 2**30:.1f} GiB, before the weights"
    else:
        memory, where = host_available_memory(), "this machine's available memory"
    if max_model_len * per_token <= memory:
        return
    fits = int(memory // per_token) // config.block_size * config.block_size
    given = "" if config.max_model_len else " (the model's max_position_embeddings: no max_model_len was given)"
    raise ConfigError("max_model_len", f"{max_model_len} tokens{given} need {max_model_len * per_token / 2**30:.1f} "
                      f"GiB of KV cache for one sequence, more than {where} ({memory / 2**30:.1f} GiB); the largest "
                      f"max_model_len that could fit is {fits}. Set max_model_len")


def host_available_memory() -> int:
    """Bytes the kernel reports available (MemAvailable), else the machine's physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class MemoryAtStart(NamedTuple):
    """What the GPU held before this engine loaded anything: not the engine's, so not counted against its
    gpu_memory_utilization (vLLM v1's per-instance rule: two engines at 0.45 share one GPU)."""

    allocated: int  # this process's torch allocations (an earlier engine in the same process)
    outside_allocator: int  # every other byte in use: other processes, CUDA contexts


def memory_at_start(device: torch.device, gpu_memory_utilization: float) -> MemoryAtStart:
    """Snapshot before the weights load; a ConfigError naming gpu_memory_utilization when the GPU has less free
    than the engine is to take (vLLM refuses to start the same way)."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    wanted = total * gpu_memory_utilization
    if free < wanted:
        raise ConfigError("gpu_memory_utilization", f"{gpu_memory_utilization} of {device}'s {total / 2**30:.1f} GiB "
                          f"is {wanted / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB is free (other processes or "
                          "engines hold the rest): lower gpu_memory_utilization or free the GPU")
    return MemoryAtStart(torch.cuda.memory_allocated(device), total - free - torch.cuda.memory_reserved(device))


def gpu_kv_budget(device: torch.device, gpu_memory_utilization: float, profile_run: Callable[[], None],
                  start: MemoryAtStart) -> tuple[float, dict[str, int]]:
    """Bytes the pool may take: gpu_memory_utilization of the device less what this engine added since `start`:
    its weights, the peak of profile_run (a forward at the full token budget) and memory outside torch's
    allocator that grew (cuBLAS and NCCL workspaces); and the figures it is made of (benchmarks read them; a
    short pool shows there which part grew)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)  # weights (and anything else this process holds)
    profile_run()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    outside_growth = max(0, total - free - torch.cuda.memory_reserved(device) - start.outside_allocator)
    budget = total * gpu_memory_utilization - (peak - start.allocated) - outside_growth
    torch.cuda.empty_cache()
    figures = {"total": total, "weights": before - start.allocated, "profile_activations": peak - before,
               "outside_allocator_growth": outside_growth, "not_this_engine": start.allocated + start.outside_allocator,
               "pool_budget": int(budget)}
    logger.info("KV budget: %.2f GiB = %.2f x %.2f GiB total - %.2f GiB weights - %.2f GiB profile run - %.2f GiB "
                "outside torch's allocator (%.2f GiB held before this engine started is not counted)",
                budget / 2**30, gpu_memory_utilization, total / 2**30, (before - start.allocated) / 2**30,
                (peak - before) / 2**30, outside_growth / 2**30, figures["not_this_engine"] / 2**30)
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
