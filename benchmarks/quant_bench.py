"""Packed int4 weights on one GPU (#13), one JSON line per figure, all ratios from this one run:
  gemv    kernels.quant_gemm's GEMV at W1's linear shapes (M = 1, 4-bit, group 128): us, GB/s and the
          fraction of the copy bandwidth measured here; a few block shapes; bf16 `x @ w.T` beside it
  rows    GEMV vs tensor-core GEMM at small M (where GEMV_MAX_M should sit)
  gemm    fused GEMM vs dequantize + cuBLAS vs bf16 matmul at M = 256 and 2048
  w1      W1 (Qwen2-7B shape, 256 x (512 in, 512 out)): bf16 vs compressed-tensors W4A16 group 128
          (random packed weights, load_format=dummy): offline throughput, one-stream TPOT, weight bytes
    python -m benchmarks.quant_bench [--parts gemv,rows,gemm,w1]
Estimated 3-4 minutes on an H200 (not yet run): two engine starts with CUDA graphs dominate, the 4-bit
one compiling its kernels for every captured batch size; under a tight limit run `--parts gemv,rows,gemm`
and `--parts w1` as two calls.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.fp8_bench import (
    W1_LINEARS,
    emit,
    free_cuda,
    offline_run,
    one_stream_tpot,
    start_llm,
)
from benchmarks.throughput import (
    log,
    make_workload,
    measure_ceilings,
    random_prompts,
    write_config,
)

# (block_n, block_kp, num_warps): the default first
GEMV_CONFIGS = [(128, 16, 4), (256, 16, 8), (64, 16, 4), (128, 32, 8), (64, 32, 4), (32, 32, 4)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the fused GEMM, beside the default by M
GEMM_CONFIGS = [(64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 64, 4, 4)]


def _timed(fn) -> float:
    """Microseconds, median of repeats."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def random_w4(n: int, k: int, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors layout: qweight int32 [N, K / 8] of random nibbles, scales bf16 [N, K / group]."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
    scales = (torch.rand(n, k // group_size, device="cuda") * 0.004 + 0.002).to(torch.bfloat16)
    return qweight, scales


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    if not err < 0.02:
        raise SystemExit(f"{name}: off by {err:.4f} (relative) from dequantize + matmul: broken kernel")
    return round(err, 5)


def _gemv_shape(name: str, n: int, k: int, bandwidth: float) -> None:
    from kernels import quant_gemm

    qweight, scales = random_w4(n, k)
    w = quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x @ quant_gemm.dequantize(w, torch.bfloat16).t()
    nbytes = qweight.numel() * 4 + scales.numel() * 2 + x.numel() * 2 + n * 2
    times = {}
    for cfg in GEMV_CONFIGS:
        _check(f"gemv {name} {cfg}", quant_gemm.gemv(x, w, None, *cfg), ref)
        times[cfg] = _timed(lambda cfg=cfg: quant_gemm.gemv(x, w, None, *cfg))
    best = min(times, key=times.get)
    us = _timed(lambda: quant_gemm.dequant_gemm(x, qweight, scales, None, None, 4, 128, "compressed-tensors"))
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bf16_us = _timed(lambda: x @ wb.t())
    emit("gemv", layer=name, N=n, K=k, bytes=nbytes, us=round(us, 2), gb_s=round(nbytes / us / 1e3, 1),
         copy_fraction=round(nbytes / (us * 1e-6) / bandwidth, 3), best_config=list(best),
         best_us=round(times[best], 2), best_copy_fraction=round(nbytes / (times[best] * 1e-6) / bandwidth, 3),
         configs={f"{c[0]}x{c[1]}w{c[2]}": round(t, 2) for c, t in times.items()},
         bf16_us=round(bf16_us, 2), speedup_vs_bf16=round(bf16_us / us, 2))


def bench_gemv(bandwidth: float) -> None:
    for name, (n, k) in W1_LINEARS.items():
        _gemv_shape(name, n, k, bandwidth)
        torch.cuda.empty_cache()


def _rows_shape(name: str, n: int, k: int, m: int) -> None:
    from kernels import quant_gemm

    qweight, scales = random_w4(n, k)
    w = quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x @ quant_gemm.dequantize(w, torch.bfloat16).t()
    _check(f"rows {name} M={m} gemv", quant_gemm.gemv(x, w), ref)
    _check(f"rows {name} M={m} gemm", quant_gemm.gemm(x, w), ref)
    emit("rows", layer=name, M=m, gemv_us=round(_timed(lambda: quant_gemm.gemv(x, w)), 2),
         gemm_us=round(_timed(lambda: quant_gemm.gemm(x, w)), 2))


def bench_rows(ms: list[int]) -> None:
    for name in ("qkv_proj", "down_proj"):
        for m in ms:
            _rows_shape(name, *W1_LINEARS[name], m)


def _gemm_shape(name: str, n: int, k: int, m: int) -> None:
    from kernels import quant_gemm

    qweight, scales = random_w4(n, k)
    w = quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k)
    wb = quant_gemm.dequantize(w, torch.bfloat16)  # [N, K]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    err = _check(f"gemm {name} M={m}", quant_gemm.gemm(x, w), x @ wb.t())
    fused_us = _timed(lambda: quant_gemm.gemm(x, w))
    configs = {f"{c[0]}x{c[1]}x{c[2]}w{c[3]}": round(_timed(lambda c=c: quant_gemm.gemm(x, w, None, c)), 2)
               for c in GEMM_CONFIGS}
    dequant_us = _timed(lambda: x @ quant_gemm.dequantize(w, torch.bfloat16).t())
    bf16_us = _timed(lambda: x @ wb.t())
    emit("gemm", layer=name, M=m, N=n, K=k, fused_us=round(fused_us, 2), dequant_matmul_us=round(dequant_us, 2),
         bf16_us=round(bf16_us, 2), fused_vs_bf16=round(bf16_us / fused_us, 3),
         dequant_vs_bf16=round(bf16_us / dequant_us, 3), rel_error=err, fused_configs_us=configs,
         dispatch="gemv" if m <= quant_gemm.GEMV_MAX_M else "dequant_matmul")


def bench_gemm(ms: list[int]) -> None:
    for name, (n, k) in W1_LINEARS.items():
        for m in ms:
            _gemm_shape(name, n, k, m)
        torch.cuda.empty_cache()


def write_w4_config(shape: dict, max_len: int, bits: int, group_size: int) -> str:
    """A dummy checkpoint directory whose config.json says compressed-tensors pack-quantized."""
    import os

    from engine.layers.quant.dummy import compressed_tensors_config

    path = write_config(shape, max_len)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = compressed_tensors_config(bits, group_size)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def weight_split(llm) -> dict:
    """Bytes of the model's parameters: all, integer-quantized layers (packed words + scales), the rest."""
    model = llm.llm_engine.executor.runner.model
    total = quantized = 0
    for module in model.modules():
        own = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        total += own
        if hasattr(module, "weight_packed"):
            quantized += own
    return {"weight_gb": round(total / 1e9, 3), "quantized_layers_gb": round(quantized / 1e9, 3),
            "float_gb": round((total - quantized) / 1e9, 3)}


def bench_w1(args: argparse.Namespace) -> None:
    w = make_workload("w1", args.seed)
    max_len = max(p + o for p, o in zip(w.input_lens, w.output_lens))
    prompts = random_prompts(w, w.shape["vocab_size"], args.seed)
    dirs = {"bf16": write_config(w.shape, max_len), "w4a16": write_w4_config(w.shape, max_len, 4, args.group_size)}

    def measure(model_dir: str) -> dict:  # the engine is a local: freed on return, before the next starts
        llm, load_s = start_llm(model_dir, max_len, args)
        result = {**weight_split(llm), **offline_run(llm, prompts, w.output_lens), "load_s": round(load_s, 1)}
        result["tpot_ms"] = round(one_stream_tpot(llm, prompts[0]) * 1e3, 3)
        llm.llm_engine.shutdown()
        return result

    results = {}
    for config, model_dir in dirs.items():
        results[config] = result = measure(model_dir)
        free_cuda()
        base = results["bf16"]
        emit("w1", config=config, **result, tok_s_vs_bf16=round(result["output_tok_s"] / base["output_tok_s"], 3),
             tpot_vs_bf16=round(result["tpot_ms"] / base["tpot_ms"], 3),
             weight_vs_bf16=round(result["weight_gb"] / base["weight_gb"], 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="gemv,rows,gemm,w1")
    parser.add_argument("--rows-m", default="1,2,4,8,16")
    parser.add_argument("--gemm-m", default="256,2048")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("quant_bench needs a GPU")
    emit("device", name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
         torch=torch.__version__)
    parts = args.parts.split(",")
    start = time.perf_counter()
    bandwidth, flops = measure_ceilings(torch.device("cuda"))
    emit("ceilings", copy_gb_s=round(bandwidth / 1e9, 1), bf16_tflops=round(flops / 1e12, 1))
    if "gemv" in parts:
        bench_gemv(bandwidth)
        log(f"gemv done at {time.perf_counter() - start:.0f} s")
    if "rows" in parts:
        bench_rows([int(m) for m in args.rows_m.split(",")])
        log(f"rows done at {time.perf_counter() - start:.0f} s")
    if "gemm" in parts:
        bench_gemm([int(m) for m in args.gemm_m.split(",")])
        log(f"gemm done at {time.perf_counter() - start:.0f} s")
    if "w1" in parts:
        bench_w1(args)
        log(f"w1 done at {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
