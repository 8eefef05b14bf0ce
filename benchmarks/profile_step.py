"""Where one engine step's time goes, and whether the GPU waits for the CPU.

Runs a W1-like load (Qwen2-7B shape, random weights) and, without synchronizing anything:
- times the CPU phases of each step (scheduling, input preparation, sampling metadata, output
  processing, and the time spent blocked waiting for the device's tokens);
- records a CUDA event where each step's device work is queued to start and one after its
  last kernel, so the gap between a step's end and the next step's start is time the GPU sat
  idle waiting for the CPU to queue work.
Prints milliseconds per step for decode-only and mixed (prefill) steps.
    python -m benchmarks.profile_step [--num-requests 256 --input-len 512 --output-len 128] [--kernels] [--lora]
One stream deep in a long context: --num-requests 1 --input-len 120000 --output-len 64 --kernels.
Where one stream's token goes kernel by kernel: --num-requests 1 --kernels --chain [--quantization fp8].
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from benchmarks.step_trace import StepTrace
from benchmarks.throughput import QWEN2_7B, write_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-async-scheduling", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="also print torch.profiler's top device kernels "
                        "for 2 mixed steps and for decode steps 20-24 (these steps are then not counted)")
    parser.add_argument("--chain", action="store_true", help="with --kernels: attribute the profiled decode steps' time "
                        "kernel by kernel along the chain (each kernel's end minus the latest earlier end), which "
                        "stays right when programmatic dependent launch overlaps a kernel with the one before it")
    parser.add_argument("--lora", action="store_true", help="8 random rank-16 adapters on every projection "
                        "(benchmarks/lora_bench.py's), each request a random one")
    parser.add_argument("--quantization", choices=("none", "fp8", "w4a16", "gptq-head"), default="none",
                        help="fp8: weights quantized at load; w4a16: 4-bit group-128 compressed-tensors (random); "
                        "gptq-head: 4-bit group-128 GPTQ with the LM head quantized too (random)")
    args = parser.parse_args()
    from engine import LLM, SamplingParams
    from engine.lora import LoRARequest

    max_model_len = max(2048, args.input_len + args.output_len)
    model_dir = write_config(QWEN2_7B, max_model_len)
    quant_kwargs = {"quantization": "fp8"} if args.quantization == "fp8" else {}
    if args.quantization in ("w4a16", "gptq-head"):
        from engine.layers.quant.dummy import GPTQ_4BIT, add_quantization_config, compressed_tensors_config

        qc = compressed_tensors_config(4, 128) if args.quantization == "w4a16" else {**GPTQ_4BIT, "lm_head": True}
        add_quantization_config(model_dir, qc)
    lora_kwargs, adapters = {}, [None]
    if args.lora:
        from benchmarks.lora_bench import NUM_ADAPTERS, RANK, write_adapters

        lora_kwargs = {"enable_lora": True, "max_loras": NUM_ADAPTERS, "max_lora_rank": RANK}
        adapters = [LoRARequest(f"adapter{i}", i + 1, p) for i, p in enumerate(write_adapters(QWEN2_7B, 0))]
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=max_model_len,
              enforce_eager=args.enforce_eager, async_scheduling=not args.no_async_scheduling, **lora_kwargs,
              **quant_kwargs)
    warm_up = [torch.randint(10, 150000, (min(args.input_len, 512),)).tolist() for _ in range(8)]
    llm.generate(warm_up, SamplingParams(temperature=0, ignore_eos=True, max_tokens=4), use_tqdm=False,
                 lora_request=(adapters * 8)[:8] if args.lora else None)  # Triton JIT, adapters loaded
    engine = llm.llm_engine
    runner = engine.executor.runner
    cpu: dict[str, float] = collections.defaultdict(float)  # "kind:phase" -> seconds
    kind = ["mixed"]
    profiling = [False]

    def label(so) -> str:  # the device step's kind
        if profiling[0]:
            return "profiled"
        return "decode" if max(so.num_scheduled_tokens.values(), default=1) == 1 else "mixed"

    phases = (("scheduler", "schedule"), ("runner", "submit_model"), ("runner", "update_states"),
              ("runner", "prepare_inputs"), ("runner", "sampling_metadata"), ("executor", "collect"),
              ("scheduler", "update_from_output"), ("output_processor", "process_outputs"))
    trace = StepTrace(engine, phases, label)  # submit_model: update + prepare + launch + sampler
    g = torch.Generator().manual_seed(0)
    for i in range(args.num_requests):
        prompt = torch.randint(10, 150000, (args.input_len,), generator=g).tolist()
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=args.output_len),
                           lora_request=adapters[int(torch.randint(len(adapters), (1,), generator=g))])
    steps = collections.Counter()
    wall = collections.defaultdict(float)
    torch.cuda.synchronize()
    tables: dict[str, str] = {}
    while engine.has_unfinished_requests():
        decode_only = not engine.scheduler.waiting and all(
            s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running)
        kind[0] = "decode" if decode_only else "mixed"
        first, last = {"mixed": (2, 4), "decode": (20, 25)}[kind[0]]
        if args.kernels and kind[0] not in tables and steps[kind[0]] == first and not profiling[0]:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            prof.start()
            profiling[0] = True
        step_kind = kind[0]
        if profiling[0]:
            kind[0] = "profiled"  # keeps the profiled steps' CPU times out of the figures
        t0 = time.perf_counter()
        engine.step()
        for name, ms in trace.take_phases().items():
            cpu[f"{kind[0]}:{name}"] += ms / 1e3
        kind[0] = step_kind
        if profiling[0]:
            steps["profiled " + kind[0]] += 1
            if steps["profiled " + kind[0]] == last - first:
                torch.cuda.synchronize()
                prof.stop()
                profiling[0] = False
                tables[kind[0]] = kernel_table(prof, last - first)
                if args.chain:
                    tables[kind[0]] += "\n" + kernel_chain(prof, last - first)
            continue
        wall[kind[0]] += time.perf_counter() - t0
        steps[kind[0]] += 1
    trace.close()
    for k, table in tables.items():
        print(f"--- device kernels over {steps['profiled ' + k]} {k} steps (not counted below) ---")
        print(table)
    busy, idle, n_gpu = collections.defaultdict(float), collections.defaultdict(float), collections.Counter()
    device = trace.device_steps()
    for i, (k, busy_ms, idle_ms) in enumerate(device):
        if k == "profiled":
            continue
        busy[k] += busy_ms
        n_gpu[k] += 1
        if i + 1 < len(device) and device[i + 1][0] != "profiled":
            idle[k] += idle_ms
    print(f"async scheduling: {engine.config.uses_async_scheduling('cuda')}, CUDA graphs: {runner.cuda_graphs is not None}")
    for k in ("mixed", "decode"):
        n = max(1, steps[k])
        g = max(1, n_gpu[k])
        print(f"{k}: {steps[k]} engine steps, {1e3 * wall[k] / n:.2f} ms wall per engine step; "
              f"{n_gpu[k]} device steps: GPU busy {busy[k] / g:.2f} ms, GPU idle before the next step {idle[k] / g:.2f} ms")
        for name, t in sorted(cpu.items()):
            if name.startswith(k + ":"):
                print(f"    CPU {name.split(':', 1)[1]:42s} {1e3 * t / g:8.3f} ms per device step")


def kernel_table(prof: torch.profiler.profile, num_steps: int, rows: int = 24) -> str:
    """The device kernels taking the most time: µs and calls per step, name (short lines: device logs cut)."""
    events = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / num_steps
    lines = [f"{total:9.1f} us per step in all"]
    lines += [f"{e.self_device_time_total / num_steps:9.1f} us {e.count / num_steps:6.1f}x  {e.key[:90]}"
              for e in events[:rows]]
    return "\n".join(lines)


def kernel_chain(prof: torch.profiler.profile, num_steps: int, rows: int = 32) -> str:
    """Each kernel's share of the device time along the chain: its end minus the latest end of any kernel that
    started before it, summed by name, µs per step. Under programmatic dependent launch a kernel starts while the
    one before it runs and waits inside, so its own duration overstates it; the end-to-end increments do not."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    share: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    latest = kernels[0][0] if kernels else 0.0
    steps = []  # (name, µs added) in order
    for start, end, name in kernels:
        added = max(0.0, end - max(latest, start))
        share[name] += added
        calls[name] += 1
        steps.append((name, added))
        latest = max(latest, end)
    total = sum(share.values()) / num_steps
    lines = [f"{total:9.1f} us per step along the chain (gaps with no kernel running left out)"]
    lines += [f"{t / num_steps:9.1f} us {calls[name] / num_steps:6.1f}x  {name[:90]}"
              for name, t in sorted(share.items(), key=lambda kv: -kv[1])[:rows]]
    middle = len(steps) // (2 * num_steps)  # a run of kernels inside the first step: about one decoder layer
    lines.append("kernels in order from the middle of the first profiled step, µs added each:")
    lines += [f"{added:9.1f} us  {name[:90]}" for name, added in steps[middle:middle + 14]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
