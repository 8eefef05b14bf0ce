"""Packed int4 weights on one GPU (#13), one JSON line per figure, all ratios from this one run:
  gemv    gantry_kernels.quant_gemm's GEMV at W1's linear shapes (M = 1, 4-bit, group 128): us, GB/s and the
          fraction of the copy bandwidth measured here, per-kernel device time, then a sweep of tiles x
          splits (--gemv-budget-s) whose best per shape ends as a `gemv_table` line to paste into
          gantry_kernels/quant_gemv.py; bf16 `x @ w.T` beside it
  rows    GEMV vs quant_mma vs dequantize + cuBLAS at small M (where GEMV_MAX_M and MMA_MAX_M should sit)
  mma     gantry_kernels.quant_mma (bf16 pairs by LOP3 + FMA, tensor cores) at W1's shapes for M = --mma-m: default
          config, a sweep (--mma-budget-s) printed as an MMA_TABLE line, the plain-Triton unpacking beside
          the asm one, the GEMV, dequantize + cuBLAS and bf16 beside it; fraction of copy bandwidth
  gemm    fused GEMM vs dequantize + cuBLAS vs bf16 matmul at M = 256 and 2048
All times are GPU time of calls replayed from a CUDA graph (the engine's decode); eager_us beside.
  w1      W1 (Qwen2-7B shape, 256 x (512 in, 512 out)): bf16 vs compressed-tensors W4A16 group 128
          (random packed weights, load_format=dummy): offline throughput, one-stream TPOT, weight bytes
    python -m benchmarks.quant_bench [--parts gemv,rows,gemm,w1]
`--parts gemv,rows,gemm` takes about 3 minutes on an H200 (100 s of it the GEMV sweep, --gemv-budget-s);
w1 (two engine starts with CUDA graphs) is best run as a separate call.
"""
from __future__ import annotations

import argparse
import ast
import itertools
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


def _graph_us(fn, calls: int = 20, replays: int = 5) -> float:
    """Microseconds a call, GPU time only: `calls` calls captured in one CUDA graph (as the engine's
    decode runs them), the median of `replays` timed replays. Eager timing of a few-us kernel measures
    the Python launch instead."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


L2_OVERFLOW_BYTES = 200 << 20  # weight copies a graph rotates over: 4x the H200's 50 MB L2


def copies_for(nbytes: int) -> int:
    """How many copies of a weight of nbytes add up to L2_OVERFLOW_BYTES (at least one)."""
    return max(1, -(-L2_OVERFLOW_BYTES // nbytes))


def rotating_us(call, copies: list, replays: int = 50) -> float:
    """Microseconds a call of call(copy) from a CUDA graph of one call per copy: with copies of a weight
    adding up to L2_OVERFLOW_BYTES or more, no call finds its weight in L2, as a decode step never does."""
    it = itertools.cycle(copies)
    return _graph_us(lambda: call(next(it)), calls=len(copies), replays=replays)


def _kernel_us(fn, calls: int = 20) -> dict:
    """Device microseconds a call by kernel name (torch.profiler): which of the GEMV's kernels costs what."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key[:40]: round(e.device_time_total / calls, 2) for e in prof.key_averages() if e.device_time_total > 0}


def gemv_sweep_configs() -> list[tuple[int, int, int]]:
    """(BLOCK_N, BLOCK_KP, num_warps) with 4 to 32 words a thread (fewer: too little in flight; more:
    spills), the likeliest first (8-16 words a thread, 64-128-byte row runs) so a cut sweep keeps them."""
    tiles = [(bn, kp, nw) for bn in (16, 32, 64, 128, 256) for kp in (8, 16, 32, 64) for nw in (2, 4, 8)
             if 4 <= bn * kp // (32 * nw) <= 32]
    return sorted(tiles, key=lambda c: (not 8 <= c[0] * c[1] // (32 * c[2]) <= 16, c[1] not in (16, 32), c))


GEMV_SPLITS = (None, 1, 2, 4, 8, 16)  # None: auto_splits


def bench_gemv(bandwidth: float, budget_s: float) -> None:
    """Per W1 shape: the dispatched default (graph and eager time, device time per kernel), then one sweep
    of tiles x splits over all shapes together (a tile compiles once for every shape) until budget_s;
    its best per shape is printed as a GEMV_TABLE line."""
    from triton.errors import TritonError

    from gantry_kernels import quant_gemm, quant_gemv

    shapes = {}
    for name, (n, k) in W1_LINEARS.items():
        qweight, scales = random_w4(n, k)
        w = quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x @ quant_gemm.dequantize(w, torch.bfloat16).t()
        nbytes = qweight.numel() * 4 + scales.numel() * 2 + x.numel() * 2 + n * 2
        shapes[name] = (w, x, ref, nbytes, {}, {})
        _check(f"gemv {name} default", quant_gemm.gemv(x, w), ref)
        call = lambda: quant_gemm.dequant_gemm(x, qweight, scales, None, None, 4, 128, "compressed-tensors")  # noqa: B023
        graph_us = _graph_us(call)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        bf16_us = _graph_us(lambda: x @ wb.t())  # noqa: B023
        emit("gemv", layer=name, N=n, K=k, bytes=nbytes,
             default_config=list(quant_gemv.gemv_config(n, k, 4, 1, quant_gemv.num_sms(x.device))),
             us=round(graph_us, 2), eager_us=round(_timed(call), 2), gb_s=round(nbytes / graph_us / 1e3, 1),
             copy_fraction=round(nbytes / (graph_us * 1e-6) / bandwidth, 3), kernel_us=_kernel_us(call),
             bf16_us=round(bf16_us, 2), speedup_vs_bf16=round(bf16_us / graph_us, 2))
    deadline = time.perf_counter() + budget_s
    tiles = gemv_sweep_configs()
    swept = 0
    for block_n, block_kp, warps in tiles:
        if time.perf_counter() > deadline:
            break
        swept += 1
        for w, x, ref, _, times, failed in shapes.values():
            for splits in GEMV_SPLITS:
                cfg = (block_n, block_kp, warps, splits)
                fn = lambda cfg=cfg, w=w, x=x: quant_gemm.gemv(x, w, None, *cfg)
                try:
                    _check(f"gemv {cfg}", fn(), ref)
                    times[cfg] = _graph_us(fn)
                except (RuntimeError, TritonError) as e:  # out of registers / shared memory: note it, go on
                    failed[str(cfg[:3])] = type(e).__name__
                    break
    table = {}
    for name, (w, x, _, nbytes, times, failed) in shapes.items():
        ranked = sorted(times, key=times.get)
        if not ranked:
            continue
        best = ranked[0]
        splits = best[3] or quant_gemv.auto_splits(w.n, w.k, 4, 1, best[0], best[1], quant_gemv.num_sms(x.device))
        table[(w.n, w.k, 4)] = (*best[:3], splits)
        emit("gemv_sweep", layer=name, best_config=[*best[:3], splits], best_us=round(times[best], 2),
             best_copy_fraction=round(nbytes / (times[best] * 1e-6) / bandwidth, 3),
             top=[[*c, round(times[c], 2)] for c in ranked[:8]], swept_tiles=f"{swept}/{len(tiles)}", failed=failed)
    emit("gemv_table", python="GEMV_TABLE = {" + ", ".join(f"{key}: {val}" for key, val in table.items()) + "}")


MMA_SPLITS = (None, 1, 2, 4, 8, 16, 32)  # None: mma_config's rule


def _mma_shape(name: str, n: int, k: int, ms: list[int], bandwidth: float, deadlines: list[float]) -> dict:
    """One W1 shape at each M: the default config's time against the other paths, then the sweep."""
    from triton.errors import TritonError

    from gantry_kernels import quant_gemm, quant_mma

    qweight, scales = random_w4(n, k)
    w = quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k)
    wb = quant_gemm.dequantize(w, torch.bfloat16)
    nbytes = qweight.numel() * 4 + scales.numel() * 2
    table = {}
    for m, deadline in zip(ms, deadlines):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x @ wb.t()
        err = _check(f"mma {name} M={m}", quant_mma.mma(x, w), ref)
        _check(f"mma plain {name} M={m}", quant_mma.mma(x, w, use_asm=False), ref)
        us = _graph_us(lambda: quant_mma.mma(x, w))  # noqa: B023
        row = {"mma_us": round(us, 2), "copy_fraction": round(nbytes / (us * 1e-6) / bandwidth, 3),
               "plain_us": round(_graph_us(lambda: quant_mma.mma(x, w, use_asm=False)), 2),  # noqa: B023
               "bf16_us": round(_graph_us(lambda: x @ wb.t()), 2)}  # noqa: B023
        if m <= quant_gemm.GEMV_MAX_M:
            row["gemv_us"] = round(_graph_us(lambda: quant_gemm.gemv(x, w)), 2)  # noqa: B023
        else:
            row["dequant_matmul_us"] = round(_graph_us(lambda: x @ quant_gemm.dequantize(w, torch.bfloat16).t()), 2)  # noqa: B023
        times, failed = {}, 0
        for bn in (32, 64, 128, 256):
            for nw in (2, 4, 8):
                for sp in MMA_SPLITS:
                    if time.perf_counter() > deadline:
                        break
                    cfg = (bn, 16, nw, sp)
                    try:
                        if bn == 32 and nw == 2 and sp is None:
                            _check(f"mma {cfg}", quant_mma.mma(x, w, None, *cfg), ref)
                        times[cfg] = _graph_us(lambda cfg=cfg: quant_mma.mma(x, w, None, *cfg), calls=10, replays=3)  # noqa: B023
                    except (TritonError, RuntimeError):
                        failed += 1
        if times:
            best = min(times, key=times.get)
            sp = best[3] or quant_mma.mma_config(n, k, m, quant_mma.num_sms(x.device))[3]
            table[(n, k, quant_mma.block_rows(m))] = (*best[:3], sp)
            row.update(best_config=[*best[:3], sp], best_us=round(times[best], 2),
                       best_copy_fraction=round(nbytes / (times[best] * 1e-6) / bandwidth, 3))
        emit("mma", layer=name, N=n, K=k, M=m, rel_error=err, swept=len(times), failed=failed, **row)
    return table


def bench_mma(bandwidth: float, ms: list[int], budget_s: float) -> None:
    """Each (shape, M) sweeps until its share of budget_s has passed since the start (time left over
    carries to the next)."""
    start, total = time.perf_counter(), len(W1_LINEARS) * len(ms)
    table = {}
    for i, (name, (n, k)) in enumerate(W1_LINEARS.items()):
        deadlines = [start + budget_s * (i * len(ms) + j + 1) / total for j in range(len(ms))]
        table.update(_mma_shape(name, n, k, ms, bandwidth, deadlines))
        torch.cuda.empty_cache()
    emit("mma_table", python="MMA_TABLE = {" + ", ".join(f"{key}: {val}" for key, val in table.items()) + "}")


def _rows_shape(name: str, n: int, k: int, m: int) -> None:
    from gantry_kernels import quant_gemm, quant_mma

    qweight, scales = random_w4(n, k)
    w = quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x @ quant_gemm.dequantize(w, torch.bfloat16).t()
    _check(f"rows {name} M={m} gemv", quant_gemm.gemv(x, w), ref)
    _check(f"rows {name} M={m} mma", quant_mma.mma(x, w), ref)
    emit("rows", layer=name, M=m, gemv_us=round(_graph_us(lambda: quant_gemm.gemv(x, w)), 2),
         mma_us=round(_graph_us(lambda: quant_mma.mma(x, w)), 2),
         dequant_matmul_us=round(_graph_us(lambda: x @ quant_gemm.dequantize(w, torch.bfloat16).t()), 2),
         dispatched_us=round(_graph_us(lambda: quant_gemm.dequant_gemm(x, w.qweight, w.scales, None, None, 4, 128,
                                                                      "compressed-tensors")), 2))


def bench_rows(ms: list[int]) -> None:
    for name in W1_LINEARS:
        for m in ms:
            _rows_shape(name, *W1_LINEARS[name], m)


def _gemm_shape(name: str, n: int, k: int, m: int) -> None:
    from gantry_kernels import quant_gemm

    qweight, scales = random_w4(n, k)
    w = quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k)
    wb = quant_gemm.dequantize(w, torch.bfloat16)  # [N, K]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    err = _check(f"gemm {name} M={m}", quant_gemm.gemm(x, w), x @ wb.t())
    fused_us = _graph_us(lambda: quant_gemm.gemm(x, w), calls=2, replays=3)
    configs = {f"{c[0]}x{c[1]}x{c[2]}w{c[3]}": round(_graph_us(lambda c=c: quant_gemm.gemm(x, w, None, c), 2, 3), 2)
               for c in GEMM_CONFIGS}
    dequant_only_us = _graph_us(lambda: quant_gemm.dequantize(w, torch.bfloat16))
    dequant_us = _graph_us(lambda: x @ quant_gemm.dequantize(w, torch.bfloat16).t())
    bf16_us = _graph_us(lambda: x @ wb.t())
    emit("gemm", layer=name, M=m, N=n, K=k, fused_us=round(fused_us, 2), dequant_matmul_us=round(dequant_us, 2),
         bf16_us=round(bf16_us, 2), fused_vs_bf16=round(bf16_us / fused_us, 3),
         dequant_vs_bf16=round(bf16_us / dequant_us, 3), rel_error=err, dequantize_us=round(dequant_only_us, 2),
         dequantize_gb_s=round((n * k // 2 + n * k * 2) / dequant_only_us / 1e3, 1), fused_configs_us=configs,
         dispatch="gemv" if m <= quant_gemm.GEMV_MAX_M else "dequant_matmul")


def bench_gemm(ms: list[int]) -> None:
    for name, (n, k) in W1_LINEARS.items():
        for m in ms:
            _gemm_shape(name, n, k, m)
        torch.cuda.empty_cache()


def write_w4_config(shape: dict, max_len: int, bits: int, group_size: int) -> str:
    """A dummy checkpoint directory whose config.json says compressed-tensors pack-quantized."""
    from engine.layers.quant.dummy import (
        add_quantization_config,
        compressed_tensors_config,
    )

    return add_quantization_config(write_config(shape, max_len), compressed_tensors_config(bits, group_size))


def weight_split(llm) -> dict:
    """Bytes of the model's parameters: all, integer-quantized layers (packed words + scales), the rest."""
    model = llm.llm_engine.executor.runner.model
    total = quantized = 0
    for module in model.modules():
        own = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        total += own
        if hasattr(module, "weight_packed") or hasattr(module, "qweight"):
            quantized += own
    return {"weight_gb": round(total / 1e9, 3), "quantized_layers_gb": round(quantized / 1e9, 3),
            "float_gb": round((total - quantized) / 1e9, 3)}


def bench_w1(args: argparse.Namespace) -> None:
    w = make_workload("w1", args.seed)
    max_len = w.max_seq_len
    prompts = random_prompts(w, w.shape["vocab_size"], args.seed)[: args.w1_prompts]
    output_lens = w.output_lens[: args.w1_prompts]
    from engine.layers.quant.dummy import GPTQ_4BIT, add_quantization_config, compressed_tensors_config

    makers = {"bf16": lambda: write_config(w.shape, max_len),
              "w4a16": lambda: write_w4_config(w.shape, max_len, 4, args.group_size),
              # compressed-tensors 4-bit with the token embedding and the LM head packed too
              "w4a16_tables": lambda: add_quantization_config(
                  write_config(w.shape, max_len), compressed_tensors_config(4, args.group_size, lm_head=True,
                                                                            embedding=True)),
              # GPTQ 4-bit with the LM head quantized too (GPTQModel's lm_head=True)
              "gptq_head": lambda: add_quantization_config(write_config(w.shape, max_len),
                                                           {**GPTQ_4BIT, "group_size": args.group_size, "lm_head": True})}
    configs = args.w1_configs.split(",")
    if configs[0] != "bf16" or not set(configs) <= set(makers):
        raise SystemExit(f"--w1-configs: bf16 first, then any of {sorted(makers)}; got {args.w1_configs}")
    dirs = {config: makers[config]() for config in configs}

    def measure(model_dir: str) -> dict:  # the engine is a local: freed on return, before the next starts
        llm, load_s = start_llm(model_dir, max_len, args)
        result = {**weight_split(llm), **offline_run(llm, prompts, output_lens), "load_s": round(load_s, 1)}
        result["tpot_ms"] = round(one_stream_tpot(llm, prompts[0]) * 1e3, 3)
        llm.llm_engine.shutdown()
        return result

    from gantry_kernels import quant_gemm, quant_gemv_f16x2

    if args.f16x2_table:  # decode_gemv_bench --sweep's gemv_table line, applied in this process
        quant_gemv_f16x2.F16X2_TABLE.update(ast.literal_eval("{" + args.f16x2_table + "}"))
    if args.f16x2_compare:  # each 4-bit engine on quant_gemv.py's one-row GEMV, then again on quant_gemv_f16x2.py
        dirs.update({f"{config}_f16x2": dirs[config] for config in configs[1:]})
    if args.mma_compare and "w4a16" in dirs:  # the same 4-bit engine with quant_mma off: small batches dequantize + cuBLAS
        dirs["w4a16_without_mma"] = dirs["w4a16"]
    results = {}
    mma_max_m, f16x2_default = quant_gemm.MMA_MAX_M, quant_gemv_f16x2.GEMV_F16X2
    for config, model_dir in dirs.items():
        quant_gemm.MMA_MAX_M = quant_gemm.GEMV_MAX_M if config == "w4a16_without_mma" else mma_max_m
        quant_gemv_f16x2.GEMV_F16X2 = config.endswith("_f16x2") if args.f16x2_compare else f16x2_default
        results[config] = result = measure(model_dir)
        free_cuda()
        base = results["bf16"]
        emit("w1", config=config, **result, tok_s_vs_bf16=round(result["output_tok_s"] / base["output_tok_s"], 3),
             tpot_vs_bf16=round(result["tpot_ms"] / base["tpot_ms"], 3),
             weight_vs_bf16=round(result["weight_gb"] / base["weight_gb"], 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="gemv,rows,gemm,w1")
    parser.add_argument("--gemv-budget-s", type=float, default=100.0, help="seconds for the GEMV config sweep")
    parser.add_argument("--rows-m", default="1,2,4,8,16")
    parser.add_argument("--mma-m", default="1,16,64,256")
    parser.add_argument("--mma-budget-s", type=float, default=90.0, help="seconds for the MMA config sweep")
    parser.add_argument("--gemm-m", default="256,2048")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--w1-prompts", type=int, default=None, help="w1: the workload's first N prompts only")
    parser.add_argument("--w1-configs", default="bf16,w4a16,w4a16_tables,gptq_head",
                        help="w1: bf16 first, then w4a16 (compressed-tensors), w4a16_tables (its embedding and LM "
                        "head packed too), gptq_head (GPTQ, LM head quantized)")
    parser.add_argument("--mma-compare", action="store_true",
                        help="w1: a third engine, 4-bit with gantry_kernels.quant_mma off (MMA_MAX_M = GEMV_MAX_M)")
    parser.add_argument("--f16x2-compare", action="store_true",
                        help="w1: each 4-bit config with one-row GEMVs on gantry_kernels/quant_gemv.py (float32), then again "
                        "on gantry_kernels/quant_gemv_f16x2.py (the default)")
    parser.add_argument("--f16x2-table", help="w1: F16X2_TABLE entries as decode_gemv_bench --sweep prints them")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None,
                        help="KV pool bytes, as fp8_bench's (default: what gpu_memory_utilization leaves)")
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
        bench_gemv(bandwidth, args.gemv_budget_s)
        log(f"gemv done at {time.perf_counter() - start:.0f} s")
    if "mma" in parts:
        bench_mma(bandwidth, [int(m) for m in args.mma_m.split(",")], args.mma_budget_s)
        log(f"mma done at {time.perf_counter() - start:.0f} s")
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
