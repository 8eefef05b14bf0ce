"""Offline throughput: Gantry's engine vs Hugging Face transformers `generate` on the same GPU,
same workload, one run, with random-weight checkpoints of real shapes (load_format=dummy).

Prints output tokens/s for both, the ratio, and the fraction of the roofline (bytes over the
measured copy bandwidth, FLOPs over the measured matmul rate, both measured in this run).
    python -m benchmarks.throughput --workload w1 [--hf-batch-sizes 64,128,256] [--json out.json]
On several GPUs (`LLM` spawns its other ranks, one GPU each; transformers stays on one GPU, and the roofline is
that of all the engine's GPUs: weights, KV and FLOPs split evenly, communication free):
    python -m benchmarks.throughput --workload w3 --tensor-parallel-size 2 [--pipeline-parallel-size 1] --skip-hf
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
QWEN2_32B = dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                 intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False)
# a Qwen2 of a few hundred thousand parameters: the CPU tests of the benchmarks' plumbing
QWEN2_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1024, tie_word_embeddings=True)


@dataclass
class Workload:
    name: str
    shape: dict
    input_lens: list[int]
    output_lens: list[int]

    @property
    def max_seq_len(self) -> int:
        """The longest request's prompt plus output tokens."""
        return max(p + o for p, o in zip(self.input_lens, self.output_lens))


def make_workload(name: str, seed: int) -> Workload:
    rng = random.Random(seed)
    if name == "w1":  # DeepSeek-R1-Distill-Qwen-7B shape, 256 x (512 in, 512 out)
        return Workload(name, QWEN2_7B, [512] * 256, [512] * 256)
    if name == "w2":  # nano-vllm's: 256 requests, lengths uniform on [100, 1024], Qwen2.5-0.5B shape
        return Workload(name, QWEN2_05B, [rng.randint(100, 1024) for _ in range(256)], [rng.randint(100, 1024) for _ in range(256)])
    if name == "w3":  # DeepSeek-R1-Distill-Qwen-32B shape on one GPU, 64 x (1024 in, 512 out)
        return Workload(name, QWEN2_32B, [1024] * 64, [512] * 64)
    raise SystemExit(f"--workload: unknown {name!r} (w1, w2, w3)")


def write_config(shape: dict, max_len: int) -> str:
    path = tempfile.mkdtemp(prefix="gantry-dummy-")
    config = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=max(max_len, 32768),
                  rms_norm_eps=1e-6, rope_theta=1000000.0, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
                  hidden_act="silu", use_sliding_window=False, **shape)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def measure_ceilings(device: torch.device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), median of repeats."""
    import triton.testing

    src = torch.randn(2**28, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bandwidth = 2 * src.numel() * 4 / (ms / 1e3)
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    flops = 2 * 8192**3 / (ms / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return bandwidth, flops


def num_params(shape: dict) -> int:
    h, i, v, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    hd = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    per_layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return L * per_layer + v * h * (1 if shape["tie_word_embeddings"] else 2) + h


def roofline_seconds(w: Workload, bandwidth: float, flops_rate: float, max_num_seqs: int) -> float:
    """Lower bound: every prompt token costs 2N FLOPs plus attention; every decode step reads the
    weights once and each running sequence's KV once, at the rate-limited of bytes or FLOPs.
    Requests run max_num_seqs at a time (the longest first, as a lower bound on steps)."""
    s = w.shape
    n = num_params(s)
    hd = s["hidden_size"] // s["num_attention_heads"]
    kv_bytes_per_token = 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * hd * 2
    attn_flops_per_pair = 4 * s["num_hidden_layers"] * s["num_attention_heads"] * hd
    prefill = sum(2 * n * p + attn_flops_per_pair * p * p / 2 for p in w.input_lens) / flops_rate
    decode = 0.0
    reqs = sorted(zip(w.input_lens, w.output_lens), key=lambda r: -r[1])
    for start in range(0, len(reqs), max_num_seqs):
        group = reqs[start : start + max_num_seqs]
        for step in range(max(o for _, o in group)):
            live = [(p, o) for p, o in group if o > step]
            kv = sum(p + step for p, _ in live) * kv_bytes_per_token
            step_bytes = n * 2 + kv
            step_flops = 2 * n * len(live) + sum(attn_flops_per_pair * (p + step) for p, _ in live)
            decode += max(step_bytes / bandwidth, step_flops / flops_rate)
    return prefill + decode


def random_prompts(w: Workload, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (n,), generator=g).tolist() for n in w.input_lens]


def engine_kwargs(w: Workload, args: argparse.Namespace) -> dict:
    """The LLM's arguments for this workload and these flags."""
    return dict(load_format="dummy", dtype="bfloat16", max_model_len=max(w.max_seq_len, 2048),
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                # unset: the engine's default (on, except under pipeline parallel, whose lanes overlap steps)
                async_scheduling=False if args.no_async_scheduling else None,
                tensor_parallel_size=args.tensor_parallel_size,
                pipeline_parallel_size=args.pipeline_parallel_size)


def run_gantry(w: Workload, model_dir: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    from engine import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model_dir, **engine_kwargs(w, args))
    load_s = time.perf_counter() - t0
    log(f"gantry engine up in {load_s:.1f} s")
    # token ids only, as transformers' generate returns them
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=o, detokenize=False) for o in w.output_lens]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up: Triton compiles, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_out == sum(w.output_lens), "every request must produce exactly its output length"
    stats = llm.llm_engine.get_stats()
    result = dict(elapsed_s=elapsed, output_tokens=num_out, output_tok_s=num_out / elapsed,
                  total_tok_s=(num_out + sum(w.input_lens)) / elapsed, load_s=load_s,
                  kv_blocks=stats.num_total_blocks, preemptions=stats.num_preemptions_total)
    llm.llm_engine.shutdown()
    del llm, outputs
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_hf(w: Workload, model_dir: str, prompts: list[list[int]], batch_sizes: list[int], seed: int) -> dict:
    """transformers generate, static batches (left-padded), greedy with EOS off; each batch size
    is timed on its first batch(es) and the workload time extrapolated from batches of that size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    results = {}
    order = sorted(range(len(prompts)), key=lambda i: -w.input_lens[i])  # similar lengths together
    for bs in batch_sizes:
        try:
            batch_times, batch_tokens = [], []
            for start in range(0, min(len(order), bs * num_timed_batches(len(order), bs)), bs):
                idx = order[start : start + bs]
                plen = max(w.input_lens[i] for i in idx)
                ids = torch.zeros(len(idx), plen, dtype=torch.long)
                mask = torch.zeros(len(idx), plen, dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, plen - len(prompts[i]) :] = torch.tensor(prompts[i])
                    mask[r, plen - len(prompts[i]) :] = 1
                new = max(w.output_lens[i] for i in idx)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
                torch.cuda.synchronize()
                batch_times.append(time.perf_counter() - t0)
                batch_tokens.append(sum(w.output_lens[i] for i in idx))
            tok_s = sum(batch_tokens) / sum(batch_times)
            results[bs] = dict(output_tok_s=tok_s, batches_timed=len(batch_times))
        except torch.OutOfMemoryError:
            results[bs] = dict(output_tok_s=0.0, error="out of memory")
        gc.collect()
        torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    best = max(results, key=lambda b: results[b]["output_tok_s"])
    return dict(by_batch_size=results, best_batch_size=best, output_tok_s=results[best]["output_tok_s"])


def num_timed_batches(num_requests: int, bs: int) -> int:
    """Static batches timed per batch size: the first (longest prompts); the rest extrapolated."""
    return min(1, math.ceil(num_requests / bs))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="w1", help="w1 | w2 | w3")
    parser.add_argument("--hf-batch-sizes", default="32,64,128,256", help="static batch sizes to try for transformers")
    parser.add_argument("--skip-hf", action="store_true", help="only run Gantry's engine")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-async-scheduling", action="store_true", help="one step at a time (to compare)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="the engine's GPUs per stage")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="the engine's pipeline stages")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda")
    gpus = args.tensor_parallel_size * args.pipeline_parallel_size
    w = make_workload(args.workload, args.seed)
    bandwidth, flops_rate = measure_ceilings(device)
    log(f"ceilings: copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {flops_rate / 1e12:.0f} TFLOP/s")
    model_dir = write_config(w.shape, w.max_seq_len)
    prompts = random_prompts(w, w.shape["vocab_size"], args.seed)
    roofline_s = roofline_seconds(w, bandwidth * gpus, flops_rate * gpus, args.max_num_seqs)
    out_tokens = sum(w.output_lens)
    hf = None
    if not args.skip_hf:
        hf = run_hf(w, model_dir, prompts, [int(b) for b in args.hf_batch_sizes.split(",")], args.seed)
        log(f"transformers: {json.dumps(hf['by_batch_size'])}")
    ours = run_gantry(w, model_dir, prompts, args)
    log(f"gantry: {json.dumps(ours)}")
    result = dict(
        workload=w.name, device=torch.cuda.get_device_name(), torch=torch.__version__, gpus=gpus,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        copy_bandwidth_GBps=bandwidth / 1e9, matmul_TFLOPs=flops_rate / 1e12,
        roofline_s=roofline_s, roofline_output_tok_s=out_tokens / roofline_s,
        gantry=ours, hf=hf, fraction_of_roofline=roofline_s / ours["elapsed_s"],
        ratio_vs_hf=ours["output_tok_s"] / hf["output_tok_s"] if hf and hf["output_tok_s"] else None,
    )
    print(json.dumps(result, indent=2))
    print(f"\n{w.name} on {result['device']}: copy {bandwidth / 1e9:.0f} GB/s, matmul {flops_rate / 1e12:.0f} TFLOP/s")
    on = f" on {gpus} GPUs (tp {args.tensor_parallel_size}, pp {args.pipeline_parallel_size})" if gpus > 1 else ""
    print(f"  gantry : {ours['output_tok_s']:10.0f} output tok/s{on} ({ours['elapsed_s']:.1f} s, {ours['preemptions']} preemptions)")
    if hf:
        print(f"  hf     : {hf['output_tok_s']:10.0f} output tok/s on one GPU (best static batch {hf['best_batch_size']})")
        print(f"  ratio  : {result['ratio_vs_hf']:.2f}x transformers")
    print(f"  roofline{on}: {result['roofline_output_tok_s']:.0f} output tok/s; gantry reaches {result['fraction_of_roofline']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
