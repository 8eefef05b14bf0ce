"""Run under torchrun by test_sharded_load.py: every rank loads its shard of MODEL (tp = world size,
a tiny KV pool) and writes rank<r>.json to OUT_DIR with its host RSS before loading and its peak after.
"Before loading" is after the imports and config parsing that engine start-up does lazily, so the
difference is what loading costs, not transformers' import.

Usage: torchrun --nproc-per-node TP -m tests.engine.dist_load MODEL OUT_DIR
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys

import torch

from engine import LLM
from engine.config import EngineConfig
from engine.distributed import run_worker
from engine.model_config import resolve_model_config
from engine.tokenizer import load_tokenizer


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    model, out_dir = sys.argv[1], sys.argv[2]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kwargs = {"tensor_parallel_size": world_size, "device": "cpu", "num_kv_blocks": 4, "max_model_len": 64,
              "enable_prefix_caching": False}  # max_model_len: what 4 pages of 16 tokens hold
    config = EngineConfig(model=model, **kwargs)
    resolve_model_config(config, torch.device("cpu"))
    load_tokenizer(model, is_gguf=False)
    gc.collect()
    rss_before = current_rss_bytes()
    if rank == 0:
        LLM(model, **kwargs).llm_engine.shutdown()
    else:
        run_worker(config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rss_before": rss_before, "peak_rss": peak}, f)


if __name__ == "__main__":
    main()
