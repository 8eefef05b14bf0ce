"""FP8 accuracy on trained weights (#14): teacher-forced top-1 agreement with the bf16 engine, on CPU.

EMULATED: runs with GANTRY_FP8_EMULATE=1 (the engine's labelled CPU path): the same e4m3 values and
scales as on a GPU (per-row weights, per-token activations, FP8 KV pages with per-layer scales),
accumulated in float32 as torch._scaled_mm does. Emulated because the model, the embedded SmolLM2-135M
GGUF (dequantized to bf16, then quantized to FP8 by us), is 98 MB and cannot travel to the GPU machine.
Beside it, the noise floor: transformers' own bf16 vs float32 on the same weights, and FP8 KV with
per-layer scales calibrated on other text (as an FP8-KV checkpoint would bring them) against scale 1.0.
Measured on the 2-core CPU (2,544 positions): weights 0.902, KV 0.944 (calibrated 0.945), both 0.889;
transformers bf16 vs fp32 0.976. Where the loss comes from (per layer type, K vs V, mantissa bits, top-2
margins): benchmarks/fp8_diagnose.py.
    python -m benchmarks.fp8_accuracy [--num-seqs 16 --seq-len 160]   (>= 2,000 positions by default)
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def corpus_text() -> str:
    """Plain English prose available offline: the standard library's module docstrings."""
    import argparse as a
    import collections
    import contextlib
    import decimal
    import difflib
    import doctest
    import functools
    import heapq
    import json as j
    import logging
    import pathlib
    import pickle
    import subprocess
    import textwrap
    import threading
    import unittest

    # the first eleven make the measured sequences; the rest is calibration text (kv scales)
    return "\n\n".join(m.__doc__ or "" for m in (a, collections, contextlib, functools, j, logging, pathlib,
                                                   subprocess, textwrap, threading, unittest,
                                                   decimal, difflib, doctest, heapq, pickle))


def token_sequences(model_path: str, num_seqs: int, seq_len: int, first_seq: int = 0,
                    at_most: bool = False) -> list[list[int]]:
    """num_seqs sequences of seq_len corpus tokens from sequence first_seq on; at_most: fewer where the corpus
    ends (at least one)."""
    from engine.tokenizer import load_tokenizer

    ids = load_tokenizer(model_path, is_gguf=True).encode(corpus_text())
    if at_most:
        num_seqs = max(1, min(num_seqs, len(ids) // seq_len - first_seq))
    if len(ids) < (first_seq + num_seqs) * seq_len:
        raise SystemExit(f"the corpus has {len(ids)} tokens, {(first_seq + num_seqs) * seq_len} asked")
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(first_seq, first_seq + num_seqs)]


def engine_top1(model_path: str, seqs: list[list[int]], kv_scales: list[tuple[float, float]] | None = None,
                **engine: object) -> list[int]:
    """Teacher-forced top-1 of the engine at every position after the first, flattened; kv_scales:
    per-layer (k_scale, v_scale) as a checkpoint would bring them."""
    from engine import LLM, SamplingParams

    # quantization none: the GGUF dequantized to bf16 (not kept in its blocks), the weights FP8 starts from
    engine = {"quantization": "none", "dtype": "bfloat16", **engine}
    llm = LLM(model_path, enable_prefix_caching=False, max_model_len=1024, **engine)
    for attn, (k_scale, v_scale) in zip(llm.llm_engine.executor.runner.attn_layers, kv_scales or []):
        attn.k_scale, attn.v_scale = k_scale, v_scale  # the CPU path reads them each step (no CUDA graphs)
    outputs = llm.generate(seqs, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    tops = [next(t for t, lp in e.items() if lp.rank == 1) for o in outputs for e in o.prompt_logprobs[1:]]
    llm.llm_engine.shutdown()
    return tops


def calibrate_kv_scales(model_path: str, seqs: list[list[int]]) -> list[tuple[float, float]]:
    """Per-layer max |k| / 448 and max |v| / 448 of the bf16 engine on other text (what an FP8-KV
    checkpoint's k_scale / v_scale hold)."""
    from engine import LLM, SamplingParams

    llm = LLM(model_path, dtype="bfloat16", quantization="none", enable_prefix_caching=False, max_model_len=1024)
    layers = llm.llm_engine.executor.runner.attn_layers
    amax = [[0.0, 0.0] for _ in layers]

    def hook(i: int):
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            amax[i][0] = max(amax[i][0], inputs[1].abs().max().item())
            amax[i][1] = max(amax[i][1], inputs[2].abs().max().item())
        return record

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    llm.generate(seqs, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    for h in handles:
        h.remove()
    llm.llm_engine.shutdown()
    return [(k / 448.0, v / 448.0) for k, v in amax]


def hf_top1(model_path: str, seqs: list[list[int]], dtype: torch.dtype) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path),
                                                 dtype=dtype).eval()
    tops = []
    with torch.no_grad():
        for seq in seqs:
            tops += model(torch.tensor([seq])).logits[0, :-1].float().argmax(-1).tolist()
    return tops


def agreement(a: list[int], b: list[int]) -> float:
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b)) / len(a)


def measure(model_path: str, num_seqs: int, seq_len: int) -> dict[str, float]:
    os.environ["GANTRY_FP8_EMULATE"] = "1"
    seqs = token_sequences(model_path, num_seqs, seq_len)
    bf16 = engine_top1(model_path, seqs)
    results = {"positions": len(bf16)}
    results["fp8_weights_vs_bf16"] = agreement(engine_top1(model_path, seqs, quantization="fp8"), bf16)
    results["fp8_kv_vs_bf16"] = agreement(engine_top1(model_path, seqs, kv_cache_dtype="fp8"), bf16)
    results["fp8_both_vs_bf16"] = agreement(
        engine_top1(model_path, seqs, quantization="fp8", kv_cache_dtype="fp8"), bf16)
    scales = calibrate_kv_scales(model_path, token_sequences(model_path, 4, seq_len, first_seq=num_seqs))
    results["fp8_kv_calibrated_scales_vs_bf16"] = agreement(
        engine_top1(model_path, seqs, kv_scales=scales, kv_cache_dtype="fp8"), bf16)
    results["noise_floor_hf_bf16_vs_fp32"] = agreement(hf_top1(model_path, seqs, torch.bfloat16),
                                                       hf_top1(model_path, seqs, torch.float32))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--num-seqs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=160)
    args = parser.parse_args()
    from engine.model_config import default_model_path

    results = measure(args.model or default_model_path(), args.num_seqs, args.seq_len)
    print(json.dumps({"figure": "fp8_accuracy", "emulated": True, "device": "cpu", **results}), flush=True)


if __name__ == "__main__":
    main()
