"""build_engine_core: an EngineConfig made into a running EngineCore (device, process group, model,
KV pool, scheduler) and the CoreInfo a front end needs about it. No tokenizer: the front end has it.

The same function builds the core of the offline LLM (in this process) and of the server (in the
engine-core process, see engine/core_proc.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine import startup
from engine.block_manager import BlockManager
from engine.config import ConfigError, EngineConfig
from engine.core_messages import CoreInfo
from engine.engine_core import EngineCore
from engine.executor import UniprocExecutor
from engine.kv_pool import check_pool_holds_max_model_len
from engine.loader import weight_bytes
from engine.lora.adapter import ModelDims
from engine.lora.registry import LoRARegistry
from engine.model_config import ModelConfig, resolve_model_config
from engine.model_runner import ModelRunner
from engine.parallel import get_parallel_state, init_distributed
from engine.scheduler import Scheduler
from engine.structured.manager import StructuredOutputManager
from engine.tokenizer import load_tokenizer

logger = logging.getLogger("gantry.engine")


@dataclass
class CoreBuild:
    core: EngineCore
    info: CoreInfo
    model_config: ModelConfig
    device: torch.device


# How much more a prompt token's attention to one earlier token weighs per FLOP than its linear layers'
# GEMMs, in the scheduler's cost of a chunk beside decoding streams. Measured on the H200 (W1, a 120K prompt
# beside 32 streams, --max-prefill-tokens-while-decoding 4096, benchmarks/long_context.py): 1.5 keeps the
# streams' ITL p99 at 143-148 ms with the prompt's TTFT 1.29-1.30x alone; 1.25 gives 206 ms / 1.23x and 1.0
# 193 ms / 1.19x (deep chunks grow, and the slowest steps with them).
ATTENTION_COST = 1.5


def prefill_context_cost(hf_config: Any) -> float:
    """A new token's attention to one earlier token (QK^T and PV: 2 * q_size multiply-adds per layer) over
    its linear layers' multiply-adds, scaled by ATTENTION_COST: the scheduler's per-position cost of a chunk.
    Qwen2-7B: 3.1e-5, so a token 32K deep costs twice one at the start (4.6e-5 with the scaling)."""
    dims = ModelDims.from_hf(hf_config)
    linear = sum(i * o for i, o in map(dims.shape, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj")))
    return ATTENTION_COST * 2 * dims.q_size / linear


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def config_eos_token_ids(mc: ModelConfig) -> set[int]:
    """EOS ids from the model's config and generation_config.json (the tokenizer's own is added by
    the front end, which holds the tokenizer: EngineCore.add_eos_token_ids)."""
    ids: set[int] = set()
    eos = getattr(mc.hf_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    gen_config = os.path.join(mc.path, "generation_config.json")
    if os.path.isfile(gen_config):
        with open(gen_config, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def describe_device(device: torch.device) -> str:
    """`cpu (2 threads, 2 cores)` or `cuda:0 (NVIDIA H200, 139.8 GiB)`, for CoreInfo (the API process logs it)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def build_engine_core(config: EngineConfig, show_progress: bool = True) -> CoreBuild:
    """Everything below the front end; raises ConfigError or ModelLoadError naming what is wrong."""
    start, before = time.monotonic(), startup.recorded()
    device = resolve_device(config)
    init_distributed(config.tensor_parallel_size, config.pipeline_parallel_size, device, config.distributed_timeout_s)
    with startup.phase("model config"):
        mc = resolve_model_config(config, device)
    if config.enable_lora:  # lora_modules checked against the base model before it loads (ConfigError)
        LoRARegistry(config, mc.hf_config, mc.served_model_name)
    runner = ModelRunner(config, mc, device, show_progress and get_parallel_state().is_driver)
    if get_parallel_state().world_size > 1:
        from engine.distributed import MultiprocExecutor

        executor: UniprocExecutor | MultiprocExecutor = MultiprocExecutor(runner)
    else:
        executor = UniprocExecutor(runner)
    num_blocks = executor.determine_num_blocks()
    if num_blocks < 1:
        raise ConfigError("gpu_memory_utilization", "no memory left for the KV cache after loading the weights")
    check_pool_holds_max_model_len(config, mc.max_model_len, num_blocks)
    executor.allocate_kv_cache(num_blocks)
    gib = num_blocks * runner.kv_bytes_per_block() / 2**30
    logger.info("model %s (%s, %s) loaded: weights %.1f MiB on this rank, quantization %s", mc.served_model_name,
                mc.architecture, str(mc.dtype).replace("torch.", ""), weight_bytes(runner.model) / 2**20, mc.quantization)
    tokens = num_blocks * config.block_size
    logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB per rank (%s); maximum concurrency for "
                "%d tokens per request: %.2fx", num_blocks, config.block_size, tokens, gib,
                str(runner.kv_cache_dtype).replace("torch.", ""), mc.max_model_len, tokens / mc.max_model_len)
    block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    max_num_batched_tokens = config.step_token_budget(device.type)
    # with pipeline parallel, one batch in flight per stage keeps every stage busy
    num_lanes = config.pipeline_parallel_size if config.pipeline_parallel_lanes is None else config.pipeline_parallel_lanes
    async_scheduling = config.uses_async_scheduling(device.type)
    # batches in flight at once: one per PP lane; two with async scheduling (the GPU runs one
    # while the CPU schedules the next and processes the previous one's tokens)
    max_in_flight = num_lanes if num_lanes > 1 else 2 if async_scheduling else 1
    scheduler = Scheduler(block_manager, config.max_num_seqs, max_num_batched_tokens,
                          sorted(config_eos_token_ids(mc)), num_lanes, async_scheduling, mc.max_model_len)
    scheduler.max_loras = config.max_loras if config.enable_lora else None
    scheduler.max_prefill_tokens_while_decoding = config.max_prefill_tokens_while_decoding
    scheduler.prefill_context_cost = prefill_context_cost(mc.hf_config)
    core = EngineCore(scheduler, executor, max_in_flight)
    core.max_lora_rank = config.max_lora_rank if config.enable_lora else None
    core.structured_output_manager = StructuredOutputManager(  # loads the tokenizer at the first constrained request
        lambda: load_tokenizer(mc.tokenizer, mc.tokenizer_is_gguf, required=False,
                               trust_remote_code=config.trust_remote_code), mc.hf_config.vocab_size)
    # what the phases recorded inside (model config, weights...) did not cover
    startup.record("model build and KV pool", time.monotonic() - start - (startup.recorded() - before))
    info = CoreInfo(
        model_name=mc.served_model_name, architecture=mc.architecture, max_model_len=mc.max_model_len,
        vocab_size=mc.hf_config.vocab_size, num_total_blocks=num_blocks, block_size=config.block_size,
        max_num_seqs=config.max_num_seqs, default_max_tokens=mc.default_max_tokens,
        device=str(device), device_description=describe_device(device), world_size=config.world_size,
        eos_token_ids=sorted(config_eos_token_ids(mc)),
        lora_dims=list(dataclasses.astuple(ModelDims.from_hf(mc.hf_config))) if config.enable_lora else [],
    )
    return CoreBuild(core, info, mc, device)
