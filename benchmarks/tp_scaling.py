"""Tensor/pipeline-parallel scaling in one invocation: W1 (7B shape) tp1 vs tp2, W3 (32B shape) tp1 vs
tp2 and pp2, offline, random weights (load_format=dummy). Each config runs in a fresh subprocess
(its GPU memory released after it), which spawns its own ranks (engine/spawn.py, no torchrun).
Prints output tok/s, the ratios, and for tp > 1 the all-reduce time of one decode step at batch 256
(NCCL kernels in a torch.profiler trace on rank 0, waits on the peer included) and its share of the step.
    python -m benchmarks.tp_scaling [--json out.json]      # GPU; --smoke: tiny shapes on CPU (plumbing)
    python -m benchmarks.tp_scaling --configs w3:tp1,w3:tp2 --kv-cache-memory-gib 6.9   # W3 with a short pool
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

from benchmarks.throughput import Workload, make_workload, random_prompts, write_config

CONFIGS = "w1:tp1,w1:tp2,w3:tp1,w3:tp2,w3:pp2"
TARGETS = {("w1", "tp2"): 1.5, ("w3", "tp2"): 2.2}  # the acceptance: x the same workload's tp1
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=False)
RESULT_PREFIX = "TP_SCALING_RESULT "


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_config(text: str) -> tuple[str, int, int]:
    """'w3:tp2' -> ('w3', 2, 1); 'w3:pp2' -> ('w3', 1, 2); 'w3:tp2pp2' -> ('w3', 2, 2)."""
    import re

    match = re.fullmatch(r"(w[123]):(?:tp(\d+))?(?:pp(\d+))?", text.strip())
    if not match or not (match.group(2) or match.group(3)):
        raise SystemExit(f"--configs: {text!r} is not WORKLOAD:tpN[ppM] (e.g. w1:tp2, w3:pp2)")
    return match.group(1), int(match.group(2) or 1), int(match.group(3) or 1)


def workload(name: str, smoke: bool, seed: int) -> Workload:
    if not smoke:
        return make_workload(name, seed)
    if name == "w3":
        return Workload(name, TINY, [64] * 8, [24] * 8)
    return Workload(name, TINY, [32] * 16, [24] * 16)


# ---- one config, in its own process ----------------------------------------------------------

def run_child(spec: dict) -> dict:
    import torch

    from engine import LLM, SamplingParams

    smoke = spec["smoke"]
    w = workload(spec["workload"], smoke, spec["seed"])
    max_len = w.max_seq_len
    model_dir = write_config(w.shape, max_len)
    prompts = random_prompts(w, w.shape["vocab_size"], spec["seed"])
    t0 = time.perf_counter()
    llm = LLM(model_dir, load_format="dummy", dtype="float32" if smoke else "bfloat16",
              device="cpu" if smoke else "cuda", max_model_len=max(max_len, 2048),
              tensor_parallel_size=spec["tp"], pipeline_parallel_size=spec["pp"], max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"], enforce_eager=spec["enforce_eager"],
              gpu_memory_utilization=spec["gpu_memory_utilization"], kv_cache_memory_gib=spec.get("kv_cache_memory_gib"),
              distributed_timeout_s=spec["timeout_s"])
    load_s = time.perf_counter() - t0
    engine = llm.llm_engine
    sync = torch.cuda.synchronize if not smoke else (lambda: None)
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=o, detokenize=False) for o in w.output_lens]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up: Triton compiles, allocator
    sync()
    # the prefill phase alone: other prompts of the same lengths (no prefix-cache hits), one token each
    first = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=1, detokenize=False) for _ in prompts]
    t0 = time.perf_counter()
    llm.generate(random_prompts(w, w.shape["vocab_size"], spec["seed"] + 1), first, use_tqdm=False)
    sync()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    if num_out != sum(w.output_lens):
        raise RuntimeError(f"{num_out} output tokens, expected {sum(w.output_lens)}: a request stopped early")
    stats = engine.get_stats()
    result = dict(workload=w.name, tp=spec["tp"], pp=spec["pp"], elapsed_s=elapsed, output_tokens=num_out,
                  output_tok_s=num_out / elapsed, load_s=load_s,
                  prefill_s=prefill_s, prefill_tok_s=sum(w.input_lens) / prefill_s, kv_blocks=stats.num_total_blocks,
                  preemptions=stats.num_preemptions_total, async_scheduling=engine.scheduler.async_scheduling,
                  device=torch.cuda.get_device_name() if not smoke else "cpu")
    if spec["tp"] > 1:
        result["all_reduce"] = profile_all_reduce(engine, w, spec, smoke)
    # the figures leave before the group is torn down (a teardown that hangs must not lose them)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    engine.shutdown()
    return result


def profile_all_reduce(engine, w: Workload, spec: dict, smoke: bool) -> dict:
    """Decode steps at a full batch: mean step wall time and the all-reduce time inside it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams

    batch = min(spec["allreduce_batch"], spec["max_num_seqs"])
    prompt_len, num_steps = (8, 4) if smoke else (128, 20)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=engine.max_model_len - prompt_len,
                            detokenize=False)
    generated_before = engine.get_stats().generation_tokens_total
    vocab = w.shape["vocab_size"]
    for i in range(batch):
        engine.add_request(f"ar-{i}", torch.randint(10, vocab - 10, (prompt_len,), generator=g).tolist(), params)
    for _ in range(1000):  # until every request is past its prefill: each step is then one decode token each
        engine.step()
        st = engine.get_stats()
        decoded = st.generation_tokens_total - generated_before
        if st.num_running == batch and st.num_waiting == 0 and decoded >= 2 * batch:
            break
    else:
        raise RuntimeError(f"the {batch} profiling requests never all ran together (KV pool too small?)")
    for _ in range(3):
        engine.step()
    sync = torch.cuda.synchronize if not smoke else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([] if smoke else [ProfilerActivity.CUDA])
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        sync()
        step_s = (time.perf_counter() - t0) / num_steps
    if smoke:  # gloo: the host-side collective
        events = [e for e in prof.key_averages() if e.key.startswith("gloo:all_reduce")]
        total_us = sum(e.cpu_time_total for e in events)
    else:  # NCCL kernels (inside CUDA graphs too); their time includes waiting for the other rank
        events = [e for e in prof.key_averages() if "allreduce" in e.key.lower().replace("_", "")
                  and e.device_type.name == "CUDA"]
        total_us = sum(e.self_device_time_total for e in events)
    # device time of every kernel on this rank: a step much longer than this is waiting on the host
    busy_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") if not smoke else 0
    if not events:
        names = sorted({e.key for e in prof.key_averages()})[:40]
        raise RuntimeError(f"no all-reduce found in the profile of a tp{spec['tp']} decode step; events: {names}")
    per_step_s = total_us / 1e6 / num_steps
    result = dict(batch=batch, num_steps=num_steps, step_ms=step_s * 1e3, all_reduce_ms=per_step_s * 1e3,
                  fraction_of_step=per_step_s / step_s, gpu_busy_ms=busy_us / 1e3 / num_steps,
                  calls_per_step=sum(e.count for e in events) / num_steps,
                  kernels=sorted({e.key for e in events}))
    # collected now: kineto's trace freed by the collector at interpreter exit segfaults (torch 2.13, seen on CPU)
    del prof, events
    gc.collect()
    engine.abort_request([f"ar-{i}" for i in range(batch)])
    engine.step()
    return result


# ---- the driver: one subprocess per config ---------------------------------------------------

def run_config(spec: dict, timeout_s: float) -> dict:
    """The child's result, or a dict with 'error' (its exit and last lines): never a silent gap."""
    env = dict(os.environ)
    if spec["smoke"]:
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "benchmarks.tp_scaling", "--child", json.dumps(spec)]
    log(f"{spec['workload']} tp{spec['tp']} pp{spec['pp']}: {' '.join(cmd[:3])} --child ...")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]
        return dict(error=f"timed out after {timeout_s:.0f} s", tail=str(tail))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        return dict(error=f"exit code {proc.returncode}", tail=tail)
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def report(results: dict[str, dict]) -> list[str]:
    """One line per config, ratios against the same workload's tp1; returns the failures."""
    failures = []
    print("\nconfig      output tok/s   vs tp1   prefill tok/s  vs tp1  preempt  kv blocks  all-reduce/step (batch)   "
          "share of step")
    for name, r in results.items():
        if "error" in r:
            failures.append(name)
            print(f"{name:<11} FAILED: {r['error']}")
            continue
        base_name = f"{r['workload']}:tp1"
        base = results.get(base_name, {})
        ratio = r["output_tok_s"] / base["output_tok_s"] if base.get("output_tok_s") and name != base_name else None
        target = TARGETS.get((r["workload"], name.split(":")[1]))
        ratio_text = f"{ratio:5.2f}x" if ratio else "    - "
        if ratio and target:
            ratio_text += " ok" if ratio >= target else f" <{target}"
        ar = r.get("all_reduce")
        ar_text = (f"{ar['all_reduce_ms']:7.3f} ms ({ar['batch']})      {ar['fraction_of_step']:6.1%} of "
                   f"{ar['step_ms']:.2f} ms") if ar else ""
        prefill = r["prefill_tok_s"] / base["prefill_tok_s"] if base.get("prefill_tok_s") and name != base_name else None
        prefill_text = f"{prefill:5.2f}x" if prefill else "    - "
        print(f"{name:<11} {r['output_tok_s']:12.0f}   {ratio_text:<9} {r['prefill_tok_s']:13.0f}  {prefill_text}  "
              f"{r['preemptions']:6d}  {r['kv_blocks']:9d}  {ar_text}")
        r["ratio_vs_tp1"] = ratio
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=CONFIGS, help=f"comma-separated WORKLOAD:tpNppM (default {CONFIGS})")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on CPU (gloo): checks the plumbing")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None,
                        help="a fixed KV pool per rank (the same per GPU: tp2 holds twice tp1's tokens); 6.9 GiB is "
                        "W3's pool of 2026-11-30, where tp1 preempts, as issue 19's W3 line assumes")
    parser.add_argument("--allreduce-batch", type=int, default=256, help="decode batch of the all-reduce profile")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per config, start-up included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every config's result here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(json.loads(args.child))  # prints its result line itself
        return
    results: dict[str, dict] = {}
    for text in args.configs.split(","):
        name, tp, pp = parse_config(text)
        spec = dict(workload=name, tp=tp, pp=pp, smoke=args.smoke, seed=args.seed, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                    gpu_memory_utilization=args.gpu_memory_utilization, allreduce_batch=args.allreduce_batch,
                    kv_cache_memory_gib=args.kv_cache_memory_gib,
                    timeout_s=60.0 if args.smoke else 300.0)
        key = text.strip()
        results[key] = r = run_config(spec, args.timeout_s)
        if "error" in r:
            log(f"{key}: FAILED ({r['error']}); its last lines:\n{r['tail']}")
        else:
            log(f"{key}: {r['output_tok_s']:.0f} output tok/s in {r['elapsed_s']:.1f} s")
    failures = report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if failures:
        raise SystemExit(f"FAILED: {', '.join(failures)} (their output is above)")


if __name__ == "__main__":
    main()
