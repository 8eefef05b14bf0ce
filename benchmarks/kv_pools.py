"""KV pool sizes only (#13 Deliver 4, #14 FP8 KV): W1's shape (Qwen2-7B, load_format=dummy, no CUDA graphs:
the pool is sized before they are captured) started once per config in one process, one JSON line each:
pool tokens and GiB, weight GiB, what the previous engines left allocated, and the ratios to bf16 beside
the ratio the pool would have if it got every byte the weights free (`expected`).
    python -m benchmarks.fp8_bench --pool-only [--pool-configs bf16,fp8_kv,...]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.fp8_bench import emit, free_cuda
from benchmarks.throughput import QWEN2_7B, log, write_config


def pool_configs(shape: dict, max_len: int) -> dict[str, tuple[str, dict]]:
    """name -> (model directory, engine arguments)."""
    from engine.layers.quant.dummy import (
        AWQ_4BIT,
        GPTQ_4BIT,
        add_quantization_config,
        compressed_tensors_config,
    )

    plain = write_config(shape, max_len)

    def quantized(quantization_config: dict) -> str:
        return add_quantization_config(write_config(shape, max_len), quantization_config)

    return {
        "bf16": (plain, {}), "bf16_again": (plain, {}), "fp8_kv": (plain, {"kv_cache_dtype": "fp8"}),
        "fp8": (plain, {"quantization": "fp8"}), "fp8_both": (plain, {"quantization": "fp8", "kv_cache_dtype": "fp8"}),
        "w4a16": (quantized(compressed_tensors_config(4, 128)), {}),
        "gptq": (quantized(GPTQ_4BIT), {}), "awq": (quantized(AWQ_4BIT), {}),
    }


def measure_pool(model_dir: str, engine: dict, args: argparse.Namespace) -> dict:
    """One engine's pool; the engine is a local, shut down and freed on return."""
    from engine import LLM
    from engine.loader import weight_bytes

    cuda = torch.cuda.is_available()
    leftover = torch.cuda.memory_allocated() if cuda else 0  # what earlier engines still hold
    t0 = time.perf_counter()
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=8192, gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True,
              **engine)
    runner = llm.llm_engine.executor.runner
    blocks = llm.llm_engine.info.num_total_blocks
    result = {"kv_tokens": blocks * runner.block_size, "kv_gib": round(blocks * runner.kv_bytes_per_block() / 2**30, 3),
              "kv_bytes_per_token": runner.kv_bytes_per_block() // runner.block_size,
              "weight_gib": round(weight_bytes(runner.model) / 2**30, 3),
              "leftover_before_gib": round(leftover / 2**30, 3), "start_s": round(time.perf_counter() - t0, 1)}
    result["kv_plus_weights_gib"] = round(result["kv_gib"] + result["weight_gib"], 3)
    budget = getattr(runner, "kv_budget", {})  # GPU: the profile run's figures, in GiB
    result.update({f"{k}_gib": round(v / 2**30, 3) for k, v in budget.items() if k != "total"})
    result["raw"] = (blocks * runner.kv_bytes_per_block(), weight_bytes(runner.model))  # pool, weight bytes
    llm.llm_engine.shutdown()
    return result


def bench_pools(args: argparse.Namespace) -> None:
    configs = pool_configs(QWEN2_7B, 2048)
    names = args.pool_configs.split(",")
    unknown = [n for n in names if n not in configs]
    if unknown or names[0] != "bf16":
        raise SystemExit(f"--pool-configs: {unknown or names[0]} (names: {','.join(configs)}; bf16 first, the base)")
    base = None
    for name in names:
        model_dir, engine = configs[name]
        result = measure_pool(model_dir, engine, args)
        free_cuda()
        pool, weights = result.pop("raw")
        base = base or (pool, weights, result["kv_tokens"])
        # every byte the weights give back, and the pages' own size, turned into tokens
        expected = (base[0] + base[1] - weights) / result["kv_bytes_per_token"] / base[2]
        ratio = result["kv_tokens"] / base[2]
        emit("kv_pool", config=name, **result, kv_tokens_vs_bf16=round(ratio, 3),
             expected_vs_bf16=round(expected, 3), of_expected=round(ratio / expected, 3))
        log(f"pool {name} done")
