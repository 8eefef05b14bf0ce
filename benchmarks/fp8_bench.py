"""FP8 on one Hopper GPU (#14), one JSON line per figure, all ratios from this one run:
  matmul  bf16 `x @ w.T` vs torch._scaled_mm FP8 (row-wise scales; with and without the per-token
          quantization of x) at W1's shapes (Qwen2-7B K/N, M = 1..256)
  gemm-sweep  gantry_kernels/fp8_gemm.py's tiles swept at W1's and W3's shapes, M = 16..256
          (benchmarks/fp8_gemm_sweep.py); the winners replace GEMM_TABLE for the rest of this process
  w1      W1 offline throughput and one-stream decode TPOT: bf16 vs quantization=fp8 vs kv_cache_dtype=fp8
          (configs ending in _cublas or _unfused turn one FP8 speed-up off, for A/B: fp8_switches)
  w3      W3 (Qwen2-32B shape, 64 x 1024 in / 512 out, one GPU): KV pool tokens, preemptions and
          throughput with bf16 KV, FP8 KV, FP8 weights + FP8 KV
  agree   greedy agreement fp8 vs bf16 on a small real-shaped random model (Qwen2-0.5B shape)
    python -m benchmarks.fp8_bench [--parts matmul,w1,w3,agree]
    python -m benchmarks.fp8_bench --parts w3 --kv-cache-memory-gib 6.9   (W3 with a short KV pool, as on 11-30)
    python -m benchmarks.fp8_bench --pool-only   (KV pool sizes of W1 per config: benchmarks/kv_pools.py)
Each engine start (dummy weights, CUDA graphs) costs ~30 s: all parts take an estimated 5-7 minutes on
an H200; under a 4-minute limit run `--parts matmul,w1,agree` and `--parts w3` as two calls.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time

import torch

from benchmarks.throughput import (
    QWEN2_05B,
    log,
    make_workload,
    random_prompts,
    write_config,
)

# (N, K) of W1's (Qwen2-7B) linear layers
W1_LINEARS = {"qkv_proj": (4608, 3584), "o_proj": (3584, 3584), "gate_up_proj": (37888, 3584),
              "down_proj": (3584, 18944)}


def emit(figure: str, **values: object) -> None:
    print(json.dumps({"figure": figure, **values}), flush=True)


def _timed(fn) -> float:
    """Microseconds, median of repeats."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _bench_shape(name: str, w: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, m: int) -> None:
    from gantry_kernels.fp8_quant import per_token_quant

    n, k = w.shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # [M, K]
    xq, xs = per_token_quant(x)

    def fp8(fast: bool = False) -> torch.Tensor:
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=fast)

    def fp8_with_quant() -> torch.Tensor:
        q, s = per_token_quant(x)
        return torch._scaled_mm(q, wq.t(), scale_a=s, scale_b=ws, out_dtype=torch.bfloat16)

    ref = x @ w.t()
    err = ((fp8().float() - ref.float()).norm() / ref.float().norm()).item()
    if not err < 0.05:
        raise SystemExit(f"matmul {name} M={m}: FP8 result off by {err:.3f} (relative): broken path")
    bf16_us, fp8_us = _timed(lambda: x @ w.t()), _timed(fp8)
    fast_us, quant_us = _timed(lambda: fp8(True)), _timed(fp8_with_quant)
    extra = {}
    if m <= 8:  # decode rows: the weight-only GEMV beside, all three inside CUDA graphs (eager times the launch)
        from benchmarks.quant_bench import _graph_us
        from gantry_kernels.weight_gemv import weight_gemv

        gemv = lambda: weight_gemv(x, wq, ws)  # noqa: E731
        gemv_err = ((gemv().float() - ref.float()).norm() / ref.float().norm()).item()
        if not gemv_err < 0.05:
            raise SystemExit(f"weight_gemv {name} M={m}: off by {gemv_err:.3f} (relative): broken kernel")
        g_bf16, g_gemv, g_quant = (_graph_us(f) for f in (lambda: x @ w.t(), gemv, fp8_with_quant))
        extra = {"graph_bf16_us": round(g_bf16, 2), "graph_gemv_us": round(g_gemv, 2),
                 "graph_fp8_with_quant_us": round(g_quant, 2), "gemv_vs_bf16": round(g_bf16 / g_gemv, 3),
                 "gemv_weight_gb_s": round(n * k / g_gemv / 1e3, 1), "gemv_rel_error": round(gemv_err, 4)}
    emit("matmul", layer=name, M=m, N=n, K=k, bf16_us=round(bf16_us, 2), fp8_us=round(fp8_us, 2),
         fp8_fast_accum_us=round(fast_us, 2), fp8_with_quant_us=round(quant_us, 2),
         speedup_with_quant=round(bf16_us / quant_us, 3), rel_error=round(err, 4), **extra)


def bench_matmul(ms: list[int]) -> None:
    from engine.layers.quant.fp8 import quantize_rows

    for name, (n, k) in W1_LINEARS.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02  # [N, K]
        wq, ws = quantize_rows(w)
        for m in ms:
            _bench_shape(name, w, wq, ws.view(1, -1), m)  # scale_b [1, N]
        torch.cuda.empty_cache()


def gemv_sweep() -> None:
    """gantry_kernels/weight_gemv's FP8 configs at M = 1 swept per W1 shape (benchmarks/decode_gemv_bench.py); the best go
    into GEMV_TABLE for the rest of this process, so `--parts gemv-sweep,w1` measures the engine with them."""
    from benchmarks.decode_gemv_bench import read_bandwidth, sweep_table
    from gantry_kernels import weight_gemv

    table = sweep_table(["fp8"], [1], True, False, read_bandwidth())
    weight_gemv.GEMV_TABLE.update(table)
    emit("gemv_table", python=", ".join(f"{key}: {val}" for key, val in table.items()))


def start_llm(model_dir: str, max_len: int, args: argparse.Namespace, **engine: object):
    from engine import LLM

    t0 = time.perf_counter()
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", max_model_len=max(max_len, 2048),
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192,
              gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory_gib=args.kv_cache_memory_gib,
              **engine)
    return llm, time.perf_counter() - t0


def free_cuda() -> None:
    """After an engine's last reference is gone: its KV pool and weights back to the device."""
    gc.collect()
    torch.cuda.empty_cache()


def offline_run(llm, prompts: list[list[int]], output_lens: list[int]) -> dict:
    from engine import SamplingParams

    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=o, detokenize=False) for o in output_lens]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up: Triton compiles, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    if num_out != sum(output_lens):
        raise SystemExit(f"{num_out} output tokens, expected {sum(output_lens)}")
    stats = llm.llm_engine.get_stats()
    return {"elapsed_s": round(elapsed, 3), "output_tok_s": round(num_out / elapsed, 1),
            "kv_tokens": stats.num_total_blocks * llm.llm_engine.config.block_size,
            "preemptions": stats.num_preemptions_total}


def one_stream_tpot(llm, prompt: list[int], num_tokens: int = 256) -> float:
    """Seconds per output token of one request: (time for 1 + n tokens - time for 1) / n."""
    from engine import SamplingParams

    def run(n: int) -> float:
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=n, detokenize=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(8)
    return (min(run(1 + num_tokens) for _ in range(2)) - min(run(1) for _ in range(3))) / num_tokens


CONFIGS = {"bf16": {}, "fp8": {"quantization": "fp8"}, "fp8_kv": {"kv_cache_dtype": "fp8"},
           "fp8_both": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}
CONFIGS.update({f"{name}_{switch}": CONFIGS[name] for name in ("fp8", "fp8_both")
                for switch in ("cublas", "unfused", "precise")})
CONFIGS.update({f"{name}_bf16dot": CONFIGS[name] for name in ("fp8_kv", "fp8_both")})


@contextlib.contextmanager
def fp8_switches(config: str):
    """For A/B in one process: configs ending in _cublas run every FP8 GEMM through cuBLASLt (gantry_kernels/fp8_gemm.py's
    table emptied); _unfused quantizes GEMM inputs in a kernel of their own (engine.layers.quant.fp8.FUSE_INPUT_QUANT);
    _bf16dot widens FP8 pages to bf16 in decode attention, as before the fp16 default
    (gantry_kernels.decode_attention.F16_DOT_FOR_FP8); _precise promotes FP8 GEMM sums to float32 every K tile, as before
    fast accumulation became the default (engine.layers.quant.fp8.FAST_ACCUM)."""
    from engine.layers.quant import fp8
    from gantry_kernels import decode_attention, fp8_gemm

    saved = dict(fp8_gemm.GEMM_TABLE)
    if config.endswith("_cublas"):
        fp8_gemm.GEMM_TABLE.clear()
    fp8.FUSE_INPUT_QUANT = not config.endswith("_unfused")
    fp8.FAST_ACCUM = not config.endswith("_precise")
    saved_f16 = decode_attention.F16_DOT_FOR_FP8
    if config.endswith("_bf16dot"):
        decode_attention.F16_DOT_FOR_FP8 = False
    try:
        yield
    finally:
        fp8_gemm.GEMM_TABLE.update(saved)
        fp8.FUSE_INPUT_QUANT = True
        fp8.FAST_ACCUM = True
        decode_attention.F16_DOT_FOR_FP8 = saved_f16


def bench_workload(name: str, configs: list[str], args: argparse.Namespace, tpot: bool) -> None:
    w = make_workload(name, args.seed)
    max_len = w.max_seq_len
    model_dir = write_config(w.shape, max_len)
    prompts = random_prompts(w, w.shape["vocab_size"], args.seed)
    results = {}

    def measure(config: str) -> dict:  # the engine is a local: freed on return, before the next starts
        with fp8_switches(config):
            llm, load_s = start_llm(model_dir, max_len, args, **CONFIGS[config])
            result = offline_run(llm, prompts, w.output_lens)
            result["load_s"] = round(load_s, 1)
            if tpot:
                result["tpot_ms"] = round(one_stream_tpot(llm, prompts[0]) * 1e3, 3)
            llm.llm_engine.shutdown()
        return result

    for config in configs:
        results[config] = result = measure(config)
        free_cuda()
        base = results[configs[0]]
        ratios = {"tok_s_ratio": round(result["output_tok_s"] / base["output_tok_s"], 3),
                  "kv_tokens_ratio": round(result["kv_tokens"] / base["kv_tokens"], 3)}
        if tpot:
            ratios["tpot_ratio"] = round(result["tpot_ms"] / base["tpot_ms"], 3)
        emit(name, config=config, **result, **{f"{k}_vs_{configs[0]}": v for k, v in ratios.items()})


def bench_agreement(args: argparse.Namespace, num_prompts: int = 32, num_tokens: int = 64) -> None:
    """Greedy fp8 (weights; weights + KV) vs bf16 on random Qwen2-0.5B-shape weights: the fraction of
    requests identical over the first num_tokens and the mean length of the common prefix."""
    from engine import SamplingParams

    model_dir = write_config(QWEN2_05B, 512 + num_tokens)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(10, QWEN2_05B["vocab_size"] - 10, (128,), generator=g).tolist() for _ in range(num_prompts)]
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=num_tokens, detokenize=False)
    tokens = {}

    def greedy(config: str) -> list[list[int]]:
        llm, _ = start_llm(model_dir, 512 + num_tokens, args, **CONFIGS[config])
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.shutdown()
        return out

    for config in ("bf16", "fp8", "fp8_both"):
        tokens[config] = greedy(config)
        free_cuda()
    for config in ("fp8", "fp8_both"):
        prefix = []
        for a, b in zip(tokens["bf16"], tokens[config]):
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            prefix.append(n)
        emit("agree", config=config, num_prompts=num_prompts, first_n=num_tokens,
             identical_fraction=round(sum(n == num_tokens for n in prefix) / num_prompts, 3),
             mean_common_prefix=round(sum(prefix) / num_prompts, 1),
             first_token_equal=round(sum(n > 0 for n in prefix) / num_prompts, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="matmul,w1,w3,agree")
    parser.add_argument("--matmul-m", default="1,16,64,128,256")
    parser.add_argument("--w1-configs", default="bf16,fp8,fp8_kv")
    parser.add_argument("--w3-configs", default="bf16,fp8_kv,fp8_both")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None,
                        help="a fixed KV pool for every engine (the same bytes: FP8 pages hold twice the tokens); "
                        "6.9 GiB is the W3 pool of 2026-11-30 (1,765 pages of 16 bf16 tokens), which preempted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-only", action="store_true", help="only the KV pool sizes (W1 shape, no CUDA graphs, "
                        "about 15 s an engine): bf16, FP8 KV, FP8 / 4-bit weights (benchmarks/kv_pools.py)")
    parser.add_argument("--pool-configs", default="bf16,fp8_kv,fp8,fp8_both,w4a16,gptq,awq,bf16_again")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_bench needs a GPU (compute capability >= 8.9)")
    emit("device", name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
         torch=torch.__version__)
    parts = args.parts.split(",")
    start = time.perf_counter()
    if args.pool_only:
        from benchmarks.kv_pools import bench_pools

        bench_pools(args)
        log(f"pools done at {time.perf_counter() - start:.0f} s")
        return
    if "gemv-sweep" in parts:
        gemv_sweep()
    if "gemm-sweep" in parts:
        from benchmarks.fp8_gemm_sweep import sweep
        from gantry_kernels import fp8_gemm

        fp8_gemm.GEMM_TABLE.update(sweep(["w1", "w3"], [16, 32, 64, 128, 256]))
        log(f"gemm-sweep done at {time.perf_counter() - start:.0f} s")
    if "matmul" in parts:
        bench_matmul([int(m) for m in args.matmul_m.split(",")])
        log(f"matmul done at {time.perf_counter() - start:.0f} s")
    if "w1" in parts:
        bench_workload("w1", args.w1_configs.split(","), args, tpot=True)
        log(f"w1 done at {time.perf_counter() - start:.0f} s")
    if "w3" in parts:
        bench_workload("w3", args.w3_configs.split(","), args, tpot=False)
        log(f"w3 done at {time.perf_counter() - start:.0f} s")
    if "agree" in parts:
        bench_agreement(args)
        log(f"agree done at {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
