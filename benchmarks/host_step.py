"""Host cost of one decode step of a full batch, with the model's forward taken out.

A tiny random Qwen2 on the CPU (enforce_eager, async scheduling as on a GPU) runs 256 sequences
whose 512-token prompts are prefilled; the model's forward is replaced by zeros of its output shape
(timed as `forward`, near 0; the LM head as `compute_logits`), so host_total = step_total - both is the
engine's Python: schedule, update_states, prepare_inputs, sampling_metadata, the sampler, collect,
update_from_output, the core's outputs and the output processor. Prints ms per decode step per phase as
JSON lines (best of --repeats runs: the CPU is shared), and what a multi-rank step pickles.
    python3 -m benchmarks.host_step [--num-seqs 256 --input-len 512 --steps 64 --profile]
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pickle
import pstats
import time
from collections.abc import Callable

import torch

from benchmarks.throughput import QWEN2_TINY, write_config


def timed(cpu: dict[str, float], name: str, fn: Callable) -> Callable:
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        cpu[name] += time.perf_counter() - t0
        return out
    return wrapper


def build(args: argparse.Namespace):
    from engine import LLM, SamplingParams

    model_dir = write_config(QWEN2_TINY, 4096)
    llm = LLM(model_dir, load_format="dummy", dtype="float32", device="cpu", max_model_len=4096,
              max_num_seqs=args.num_seqs, max_num_batched_tokens=8192, enforce_eager=True,
              async_scheduling=not args.no_async_scheduling,
              num_kv_blocks=args.num_seqs * (-(-(args.input_len + 4 * args.steps + 64) // 16)))
    engine = llm.llm_engine
    engine.stream_outputs = False  # the offline API's setting (LLM.generate)
    runner = engine.executor.runner
    hidden = QWEN2_TINY["hidden_size"]

    class NoForward(torch.nn.Module):
        """The model's forward taken out: zeros of its output shape (the host path stays the same)."""

        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, positions, intermediate=None):
            return torch.zeros(input_ids.shape[0], hidden)

        def compute_logits(self, h):
            return self.inner.compute_logits(h)

    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=args.input_len + 16 * args.steps,
                            detokenize=False)
    for i in range(args.num_seqs):
        prompt = torch.randint(10, QWEN2_TINY["vocab_size"] - 10, (args.input_len,), generator=g).tolist()
        engine.add_request(str(i), prompt, params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()  # prefill with the real model
    for _ in range(4):
        engine.step()
    runner.model = NoForward(runner.model)
    return engine, runner


def measure(engine, runner, steps: int) -> dict[str, float]:
    cpu: dict[str, float] = collections.defaultdict(float)
    core, sched = engine.engine_core, engine.scheduler
    patched = [(sched, "schedule"), (sched, "update_from_output"), (runner, "update_states"),
               (runner, "prepare_inputs"), (runner, "sampling_metadata"), (runner, "sampler"),
               (runner.model, "forward"), (runner.model, "compute_logits"), (engine.executor, "collect"), (core, "_outputs"), (core, "get_stats"),
               (engine.output_processor, "process_outputs")]
    names = {"get_stats": "core_stats", "_outputs": "core_outputs (incl. stats)"}
    originals = [(obj, attr, obj.__dict__.get(attr)) for obj, attr in patched]
    for obj, attr in patched:
        setattr(obj, attr, timed(cpu, names.get(attr, attr), getattr(obj, attr)))
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - t0
    for obj, attr, original in originals:  # instance attributes (the sampler) back; methods unshadowed
        if original is None:
            delattr(obj, attr)
        else:
            setattr(obj, attr, original)
    out = {k: 1e3 * v / steps for k, v in cpu.items()}
    out["step_total"] = 1e3 * total / steps
    out["host_total"] = out["step_total"] - out.get("forward", 0.0) - out.get("compute_logits", 0.0)
    return out


def pickle_cost(engine) -> dict[str, float]:
    """What the multi-rank executor ships each step: pickle of a decode SchedulerOutput (bytes, ms)."""
    captured = []
    original = engine.scheduler.schedule

    def capture(*a, **k):
        so, scheduled = original(*a, **k)
        captured.append(so)
        return so, scheduled
    engine.scheduler.schedule = capture
    engine.step()
    del engine.scheduler.schedule
    so = captured[-1]
    t0 = time.perf_counter()
    for _ in range(20):
        payload = pickle.dumps(so)
    dumps = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        pickle.loads(payload)
    loads = (time.perf_counter() - t0) / 20
    return {"pickle_bytes": len(payload), "pickle_dumps_ms": 1e3 * dumps, "pickle_loads_ms": 1e3 * loads}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-async-scheduling", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also a cProfile of --steps steps, by tottime")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine, runner = build(args)
    runs = [measure(engine, runner, args.steps) for _ in range(args.repeats)]
    for phase in runs[0]:
        print(json.dumps({"figure": "host_step", "phase": phase, "ms_per_step":
                          round(min(r.get(phase, 0.0) for r in runs), 4),
                          "num_seqs": args.num_seqs, "async_scheduling": engine.engine_core.use_batch_queue}))
    print(json.dumps({"figure": "host_step_pickle", **pickle_cost(engine)}))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            engine.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    engine.shutdown()


if __name__ == "__main__":
    main()
