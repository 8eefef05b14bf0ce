"""Long context (issue 12): one 120K-token prompt alone (TTFT, decode TPOT against the bandwidth
roofline), 4 x 30K at once, the 120K prompt beside 32 decoding streams (their inter-token latency
while it prefills, its TTFT against alone's), and transformers' prefill of the same length, all in
one run on random weights (load_format dummy), every figure one JSON line on stdout.
    python -m benchmarks.long_context [--shape w1|w3|tiny] [--parts alone,four,mixed,hf] [--prompt-len 120000]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import subprocess
import sys
import time
import warnings

import torch

from benchmarks.step_trace import Driver, StepTrace, percentile
from benchmarks.throughput import (
    QWEN2_7B,
    QWEN2_32B,
    QWEN2_TINY,
    measure_ceilings,
    num_params,
    write_config,
)

SHAPES = {"w1": QWEN2_7B, "w3": QWEN2_32B, "tiny": QWEN2_TINY}  # tiny: the CPU test of the plumbing
PARTS = ("alone", "four", "mixed", "hf")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(figure: str, **fields: object) -> None:
    print(json.dumps({"figure": figure, **fields}), flush=True)


def random_ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    """Random token ids: no two prompts share a prefix, so prefix caching could not help anyway."""
    return torch.randint(10, vocab - 10, (n,), generator=gen).tolist()


def prefill_roofline_s(shape: dict, n: int, flops_rate: float, tp: int) -> float:
    """2 x params x tokens plus causal attention (2 x n^2 x heads x head_dim per layer), per rank."""
    hd = shape["hidden_size"] // shape["num_attention_heads"]
    attn = 2 * n * n * shape["num_attention_heads"] * hd * shape["num_hidden_layers"]
    return (2 * num_params(shape) * n + attn) / tp / flops_rate


def decode_bytes(shape: dict, context: float, dtype_bytes: int = 2) -> tuple[float, float]:
    """(weight bytes, KV bytes) one decode step reads at this context, summed over ranks; the input
    embedding table is left out when untied (a step reads one row of it)."""
    weights = num_params(shape) - (0 if shape["tie_word_embeddings"] else shape["vocab_size"] * shape["hidden_size"])
    hd = shape["hidden_size"] // shape["num_attention_heads"]
    kv = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * hd * dtype_bytes * context
    return weights * dtype_bytes, kv


def part_alone(d: Driver, args: argparse.Namespace, shape: dict, gen: torch.Generator,
               ceilings: tuple[float, float] | None) -> float:
    d.add("alone", random_ids(args.prompt_len, shape["vocab_size"], gen), args.decode_tokens)
    d.run_until(lambda: "alone" in d.finished)
    stamps = d.stamps["alone"]
    ttft = d.ttft("alone")
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    fig = {"prompt_len": args.prompt_len, "ttft_s": round(ttft, 4), "decode_tokens": len(stamps),
           "tpot_ms": round(1e3 * tpot, 3) if tpot else None, "decode_tok_s": round(1 / tpot, 1) if tpot else None}
    if ceilings is not None:
        bandwidth, flops_rate = ceilings
        tp = args.tensor_parallel_size
        prefill_s = prefill_roofline_s(shape, args.prompt_len, flops_rate, tp)
        weights, kv = decode_bytes(shape, args.prompt_len + len(stamps) / 2)
        roof_s = (weights + kv) / tp / bandwidth  # per rank: each reads 1/tp of the weights and KV heads
        fig.update(prefill_roofline_s=round(prefill_s, 3), ttft_fraction_of_roofline=round(prefill_s / ttft, 3),
                   decode_weight_GB=round(weights / 1e9, 2), decode_kv_GB=round(kv / 1e9, 2),
                   decode_roofline_ms=round(1e3 * roof_s, 3),
                   decode_roofline_bandwidth="copy GB/s counting read + write bytes (measure_ceilings)",
                   decode_fraction_of_roofline=round(roof_s / tpot, 3) if tpot else None)
    emit("long_context_alone", **fig)
    return ttft


def part_four(d: Driver, args: argparse.Namespace, shape: dict, gen: torch.Generator) -> None:
    n = args.prompt_len // 4
    ids = [f"four-{i}" for i in range(4)]
    prompts = [random_ids(n, shape["vocab_size"], gen) for _ in ids]
    t0 = time.perf_counter()
    for rid, prompt in zip(ids, prompts):
        d.add(rid, prompt, 16)
    d.run_until(lambda: all(d.stamps[r] for r in ids))
    wall = max(d.stamps[r][0] for r in ids) - t0
    d.run_until(lambda: all(r in d.finished for r in ids))
    emit("long_context_four", prompts=4, prompt_len=n, wall_to_all_first_tokens_s=round(wall, 4),
         ttft_s=[round(d.ttft(r), 4) for r in ids])


def part_mixed(d: Driver, args: argparse.Namespace, shape: dict, gen: torch.Generator,
               alone_ttft: float | None) -> None:
    streams = [f"stream-{i}" for i in range(args.num_streams)]
    # ignore_eos, as long as the context allows: they outlast the long prefill and are aborted after
    for rid in streams:
        prompt = random_ids(args.short_prompt_len, shape["vocab_size"], gen)
        d.add(rid, prompt, args.max_model_len - args.short_prompt_len)
    d.run_until(lambda: all(d.stamps[r] for r in streams))  # every stream past its prompt: decoding
    d.step()  # one more step, so each has a token stamped by a decode step before the long prompt comes
    log(f"mixed: {len(streams)} streams decoding, budget {d.engine.scheduler.max_prefill_tokens_while_decoding}")
    preemptions_before = d.engine.get_stats().num_preemptions_total
    d.add("long", random_ids(args.prompt_len, shape["vocab_size"], gen), 1)
    arrival = d.arrival["long"]
    # per step: wall ms, the long prompt's computed tokens once scheduled, then what might stall a step:
    # garbage collections, and the CUDA caching allocator's new device allocations and retries
    step_log = []
    sched = d.engine.scheduler
    num_collections = 0

    def on_gc(phase: str, info: dict) -> None:
        nonlocal num_collections
        num_collections += phase == "start"

    def alloc_counts() -> tuple[int, int]:  # (new device allocations, allocation retries) so far
        stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
        return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)

    def long_chunk(so) -> tuple[int, int, int]:  # (its first position or -1, its new tokens, the other tokens)
        first_pos = next((r.num_computed_tokens for r in [*so.scheduled_new_reqs, *so.scheduled_cached_reqs]
                          if r.req_id == "long"), -1)
        n = so.num_scheduled_tokens.get("long", 0)
        return first_pos, n, sum(so.num_scheduled_tokens.values()) - n

    trace = StepTrace(d.engine, label=long_chunk)  # host ms per phase of each step, device ms of each
    gc.callbacks.append(on_gc)
    if args.sync_debug and torch.cuda.is_available():  # every op that waits for the GPU warns, once per line
        warnings.simplefilter("default")
        torch.cuda.set_sync_debug_mode("warn")
    try:
        while not d.stamps["long"]:
            t0, gcs, (allocs, retries) = time.perf_counter(), num_collections, alloc_counts()
            d.step()
            done = next((q.num_computed_tokens for q in [*sched.running, *sched.waiting] if q.seq_id == "long"), None)
            now_allocs, now_retries = alloc_counts()
            step_log.append((1e3 * (time.perf_counter() - t0), done, num_collections - gcs, now_allocs - allocs,
                             now_retries - retries, {k: round(v, 1) for k, v in trace.take_phases().items()}))
            if len(step_log) % 25 == 0:  # progress on stderr: a stall shows where it began
                log(f"mixed: step {len(step_log)}, long prompt {done} tokens in, {time.perf_counter() - arrival:.1f} s")
    finally:
        if args.sync_debug and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        gc.callbacks.remove(on_gc)
        trace.close()
    steps = len(step_log)
    first = d.stamps["long"][0]
    gaps: list[float] = []
    tokens = 0
    for rid in streams:
        before = [t for t in d.stamps[rid] if t < arrival][-1:]  # its last token before the arrival
        window = [t for t in d.stamps[rid] if arrival <= t <= first]
        tokens += len(window)
        seq = before + window
        gaps.extend(b - a for a, b in itertools.pairwise(seq))
    ttft = first - arrival
    preempted = d.engine.get_stats().num_preemptions_total - preemptions_before
    d.drain(streams + ["long"])
    if not gaps:
        raise SystemExit("mixed: no stream got a token while the long prompt prefilled")
    fig = {"streams": args.num_streams, "short_prompt_len": args.short_prompt_len, "prompt_len": args.prompt_len,
           "max_prefill_tokens_while_decoding": d.engine.scheduler.max_prefill_tokens_while_decoding,
           "steps_during_prefill": steps, "stream_tokens_during_prefill": tokens, "itl_gaps": len(gaps),
           "itl_p50_ms": round(1e3 * percentile(gaps, 50), 2), "itl_p99_ms": round(1e3 * percentile(gaps, 99), 2),
           "itl_max_ms": round(1e3 * max(gaps), 2), "preemptions": preempted, "long_ttft_s": round(ttft, 4),
           "ttft_ratio_vs_alone": round(ttft / alone_ttft, 3) if alone_ttft else None,
           "goal": "itl_p99_ms <= 150, ttft_ratio_vs_alone <= 1.25"}
    emit("long_context_mixed", **fig)
    # async scheduling: a step's wall time is mostly the GPU work of the step scheduled one before it
    slowest = sorted(range(steps), key=lambda i: -step_log[i][0])[:8]
    emit("long_context_mixed_steps", slowest=[
        {"step": i, "ms": round(step_log[i][0], 1), "long_done_before": step_log[i - 1][1] if i else 0,
         "long_done_after": step_log[i][1], "gc": step_log[i][2], "device_allocs": step_log[i][3],
         "alloc_retries": step_log[i][4], "host_ms": step_log[i][5]} for i in sorted(slowest)],
        ms_by_quarter=[round(sum(e[0] for e in part) / max(len(part), 1), 1)
                       for part in (step_log[k * steps // 4 : (k + 1) * steps // 4] for k in range(4))],
        steps_with_gc=sum(e[2] > 0 for e in step_log), steps_with_device_allocs=sum(e[3] > 0 for e in step_log),
        steps_with_alloc_retries=sum(e[4] > 0 for e in step_log))
    device = trace.device_steps()
    if device:  # per step: the long prompt's first position and new tokens, other tokens, device ms, idle ms
        emit("long_context_mixed_device", columns=["long_start", "long_new", "other_tokens", "device_ms", "idle_ms"],
             steps=[[*chunk, round(busy, 2), round(idle, 2)] for chunk, busy, idle in device])


def hf_prefill_child(model_dir: str, prompt_len: int, seed: int) -> None:
    """Run in its own process: transformers' one forward over [1, prompt_len] (SDPA, logits_to_keep=1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(seed)
    short = torch.tensor([random_ids(min(prompt_len, 512), config.vocab_size, gen)], device=device)
    ids = torch.tensor([random_ids(prompt_len, config.vocab_size, gen)], device=device)  # [1, prompt_len]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model(short, logits_to_keep=1)  # warm-up: kernels, allocator
        sync()
        t0 = time.perf_counter()
        logits = model(ids, logits_to_keep=1).logits  # [1, 1, vocab]
        sync()
        elapsed = time.perf_counter() - t0
    assert logits.shape[1] == 1
    print(json.dumps({"hf_prefill_s": elapsed}), flush=True)


def run_hf(model_dir: str, args: argparse.Namespace) -> float:
    """transformers in a subprocess, so none of its memory stays beside the engine's."""
    cmd = [sys.executable, "-m", "benchmarks.long_context", "--hf-child", model_dir,
           "--prompt-len", str(args.prompt_len), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"hf: transformers' prefill failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["hf_prefill_s"]


def build_llm(model_dir: str, args: argparse.Namespace, on_gpu: bool):
    from engine import LLM

    extra = {}
    if not on_gpu:  # the CPU pool's default (max_model_len tokens) is too small for 32 streams beside the long prompt
        extra["num_kv_blocks"] = -(-(args.num_streams + 2) * args.max_model_len // 16)
    return LLM(model_dir, load_format="dummy", dtype="bfloat16" if on_gpu else "float32",
               max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
               max_num_batched_tokens=args.max_num_batched_tokens,
               max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding,
               tensor_parallel_size=args.tensor_parallel_size, enable_prefix_caching=False,
               enforce_eager=args.enforce_eager, block_size=16, **extra)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="w1", choices=sorted(SHAPES), help="w1: Qwen2-7B, w3: Qwen2-32B, tiny: CPU test")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--prompt-len", type=int, default=120000)
    p.add_argument("--decode-tokens", type=int, default=128, help="max_tokens of the alone request")
    p.add_argument("--warmup-len", type=int, default=16500,
                   help="prompt tokens of the untimed warm-up request (capped at --prompt-len): two chunks at the "
                   "default budget, so kernels over a prefix already in the cache compile too")
    p.add_argument("--num-streams", type=int, default=32, help="decoding streams of the mixed part")
    p.add_argument("--short-prompt-len", type=int, default=256, help="prompt tokens of each mixed stream")
    p.add_argument("--max-model-len", type=int, default=131072)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-prefill-tokens-while-decoding", type=int)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--mixed-budgets", type=lambda v: [int(x) for x in v.split(",")],
                   help="comma-separated max_prefill_tokens_while_decoding values: the mixed part once with each, "
                   "on the same engine (default: once, with --max-prefill-tokens-while-decoding)")
    p.add_argument("--piece-batches", type=lambda v: tuple(int(x) for x in v.split(",")),
                   help="gantry_kernels/cudnn_prefill.py's PIECE_BATCHES for this run, e.g. 4,2,1 (must include 1)")
    p.add_argument("--sync-debug", action="store_true",
                   help="mixed part: warn at every operation that waits for the GPU (torch's sync debug mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-child", metavar="MODEL_DIR", help=argparse.SUPPRESS)  # the hf part's subprocess
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in args.parts if s not in PARTS]
    if unknown or not args.parts:
        p.error(f"--parts: unknown {unknown[0]!r} (choose from {', '.join(PARTS)})" if unknown else "--parts: empty")
    for name in ("prompt_len", "decode_tokens", "num_streams", "short_prompt_len", "max_model_len", "warmup_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.prompt_len + args.decode_tokens > args.max_model_len:
        p.error(f"--prompt-len {args.prompt_len} + --decode-tokens {args.decode_tokens} exceed --max-model-len "
                f"{args.max_model_len}")
    if args.piece_batches is not None and 1 not in args.piece_batches:
        p.error(f"--piece-batches: must include 1, got {args.piece_batches}")
    if args.mixed_budgets is not None and (not args.mixed_budgets or min(args.mixed_budgets) < 0):
        p.error(f"--mixed-budgets: each must be >= 0, got {args.mixed_budgets}")
    if args.short_prompt_len >= args.max_model_len:
        p.error(f"--short-prompt-len {args.short_prompt_len}: must be below --max-model-len {args.max_model_len}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.hf_child:
        hf_prefill_child(args.hf_child, args.prompt_len, args.seed)
        return
    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    shape = SHAPES[args.shape]
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    ceilings = measure_ceilings(torch.device("cuda")) if on_gpu else None
    setup = {"device": device, "argv": ["-m", "benchmarks.long_context", *sys.argv[1:]], "shape": args.shape,
             "parts": args.parts, "torch": torch.__version__}
    if ceilings:
        setup.update(copy_GBps_read_plus_write=round(ceilings[0] / 1e9, 1), matmul_TFLOPs=round(ceilings[1] / 1e12, 1))
    emit("long_context_setup", **setup)
    model_dir = write_config(shape, args.max_model_len)
    hf_s = None
    if "hf" in args.parts:  # before the engine: the GPU is all transformers', and nothing of it stays
        log(f"hf: transformers' prefill of {args.prompt_len} tokens in a subprocess")
        hf_s = run_hf(model_dir, args)
        emit("long_context_hf_prefill", prompt_len=args.prompt_len, hf_prefill_s=round(hf_s, 4))
    alone_ttft = None
    engine_parts = [p for p in args.parts if p != "hf"]
    if engine_parts:
        t0 = time.perf_counter()
        from engine.config import ConfigError
        from engine.errors import ModelLoadError, RankFailedError

        if args.piece_batches:  # read by the cuDNN warm-up at start and by every long chunk (this process)
            import gantry_kernels.cudnn_prefill

            gantry_kernels.cudnn_prefill.PIECE_BATCHES = args.piece_batches
        try:
            llm = build_llm(model_dir, args, on_gpu)
        except (ConfigError, ModelLoadError, RankFailedError) as e:  # e.g. max_model_len does not fit
            raise SystemExit(f"the engine did not start: {e}") from None
        sched = llm.llm_engine.scheduler
        emit("long_context_engine", load_s=round(time.perf_counter() - t0, 1), max_model_len=args.max_model_len,
             max_num_batched_tokens=sched.max_num_batched_tokens,
             max_prefill_tokens_while_decoding=sched.max_prefill_tokens_while_decoding,
             tensor_parallel_size=args.tensor_parallel_size, kv_blocks=llm.llm_engine.get_stats().num_total_blocks)
        d = Driver(llm.llm_engine)
        gen = torch.Generator().manual_seed(args.seed)
        d.add("warmup", random_ids(min(args.warmup_len, args.prompt_len), shape["vocab_size"], gen), 8)
        d.run_until(lambda: "warmup" in d.finished)
        log("warm-up done")
        for part in engine_parts:
            log(f"{part} ...")
            if part == "alone":
                alone_ttft = part_alone(d, args, shape, gen, ceilings)
            elif part == "four":
                part_four(d, args, shape, gen)
            else:
                for budget in args.mixed_budgets or [sched.max_prefill_tokens_while_decoding]:
                    sched.max_prefill_tokens_while_decoding = budget  # the engine's, or each of the sweep's
                    part_mixed(d, args, shape, gen, alone_ttft)
        llm.llm_engine.shutdown()
        del llm, d
        gc.collect()
    if hf_s is not None and alone_ttft is not None:
        emit("long_context_vs_hf", prompt_len=args.prompt_len, ttft_s=round(alone_ttft, 4), hf_prefill_s=round(hf_s, 4),
             ratio=round(alone_ttft / hf_s, 3), goal="ratio <= 0.93")
    emit("long_context_done", wall_s=round(time.perf_counter() - started, 1))


if __name__ == "__main__":
    main()
