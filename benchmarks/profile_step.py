"""Where one engine step's time goes: wraps the scheduler, input preparation, forward,
sampler and output processing with timers (synchronizing the GPU at each boundary), runs a
W1-like load, and prints milliseconds per step by phase for decode-only and mixed steps.
    python -m benchmarks.profile_step [--num-requests 256 --input-len 512 --output-len 128]
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from benchmarks.throughput import QWEN2_7B, write_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    from engine import LLM, SamplingParams

    model_dir = write_config(QWEN2_7B, 4096)
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=2048, enforce_eager=args.enforce_eager)
    engine = llm.llm_engine
    runner = engine.executor.runner
    totals: dict[str, float] = collections.defaultdict(float)
    kind = ["mixed"]

    def timed(name: str, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            totals[f"{kind[0]}:{name}"] += time.perf_counter() - t0
            return out
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    runner.prepare_inputs = timed("prepare_inputs", runner.prepare_inputs)
    runner.update_states = timed("update_states", runner.update_states)
    runner.model.forward = timed("model_eager", runner.model.forward)
    if runner.cuda_graphs is not None:
        runner.cuda_graphs.run = timed("model_graph", runner.cuda_graphs.run)
    runner.model.compute_logits = timed("lm_head", runner.model.compute_logits)
    runner.sampling_metadata = timed("sampling_metadata", runner.sampling_metadata)
    runner.sampler = timed("sampler", runner.sampler)
    engine._process_result = timed("process_result", engine._process_result)
    steps = collections.Counter()
    g = torch.Generator().manual_seed(0)
    for i in range(args.num_requests):
        prompt = torch.randint(10, 150000, (args.input_len,), generator=g).tolist()
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=args.output_len))
    step_time = collections.defaultdict(float)
    while engine.has_unfinished_requests():
        decode_only = all(s.num_computed_tokens == s.num_tokens - 1 for s in engine.scheduler.running) and not engine.scheduler.waiting
        kind[0] = "decode" if decode_only else "mixed"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        step_time[kind[0]] += time.perf_counter() - t0
        steps[kind[0]] += 1
    for k in ("mixed", "decode"):
        n = max(1, steps[k])
        print(f"{k}: {steps[k]} steps, {1e3 * step_time[k] / n:.2f} ms/step")
        for name, t in sorted(totals.items()):
            if name.startswith(k + ":"):
                print(f"    {name.split(':')[1]:20s} {1e3 * t / n:8.3f} ms/step")


if __name__ == "__main__":
    main()
