"""The embedded SmolLM2 Q4_1 GGUF on CPU, kept in its blocks (quantization=gguf) against today's
float32 weights dequantized at load (quantization=none), in one run: 16 concurrent requests,
rounds alternating between the two engines (a shared CPU drifts), median and best tokens/s, weight bytes.

    python -m benchmarks.cpu_quant [--rounds 3] [--max-tokens 64] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from engine import LLM, SamplingParams
from engine.gguf_file import _num_bytes, open_gguf
from engine.loader import weight_bytes
from engine.model_config import default_model_path

TOPICS = ["the sea", "Paris", "prime numbers", "a robot", "tea", "mountains", "rain", "chess",
          "the moon", "bread", "music", "a library", "trains", "winter", "bees", "大型语言模型"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path()
    file_bytes = sum(_num_bytes(t.ggml_type, int(np.prod(t.shape))) for t in open_gguf(path).tensors)
    engines = {q: LLM(dtype="float32", quantization=q, max_num_seqs=16) for q in ("gguf", "none")}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [engines["gguf"].llm_engine.apply_chat_template([{"role": "user", "content": f"Tell me about {t}."}])
               for t in TOPICS]
    for llm in engines.values():  # warm-up: kernel build, first allocations
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    rates: dict[str, list[float]] = {q: [] for q in engines}
    for _ in range(args.rounds):
        for q, llm in engines.items():
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            rates[q].append(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
    result = {
        "threads": torch.get_num_threads(), "requests": len(prompts), "max_tokens": args.max_tokens,
        "file_tensor_bytes": file_bytes,
        **{f"{q}_weight_bytes": weight_bytes(llm.llm_engine.executor.runner.model) for q, llm in engines.items()},
        **{f"{q}_tok_s": round(statistics.median(r), 1) for q, r in rates.items()},
        **{f"{q}_tok_s_best": round(max(r), 1) for q, r in rates.items()},
        **{f"{q}_tok_s_rounds": [round(x, 1) for x in r] for q, r in rates.items()},
    }
    result["weight_ratio_to_file"] = round(result["gguf_weight_bytes"] / file_bytes, 3)
    result["speed_ratio_gguf_over_none"] = round(result["gguf_tok_s"] / result["none_tok_s"], 2)
    result["best_speed_ratio_gguf_over_none"] = round(result["gguf_tok_s_best"] / result["none_tok_s_best"], 2)
    print(json.dumps(result, indent=1))
    for llm in engines.values():
        llm.llm_engine.shutdown()


if __name__ == "__main__":
    main()
