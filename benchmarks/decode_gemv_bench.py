"""Decode GEMVs (#12's, #13's and #14's one-stream decode): cuBLAS `F.linear` in bf16 against gantry_kernels/weight_gemv.py
on bf16 and on FP8 (e4m3, a scale per row) weights, and gantry_kernels/quant_gemv.py on 4-bit group-128 weights (w4,
compressed-tensors' layout), over W1's shapes. Each call runs on its own copy of the weight (copies rotated
inside one CUDA graph, >= 200 MB in all: quant_bench.rotating_us), so no call finds its weight in L2, as a
decode step never does. Read bandwidth (a plain `sum` over 2 GB) and copy bandwidth are measured beside; one JSON line
per figure. `--sweep` tries every config and prints the best as GEMV_TABLE entries.
    python -m benchmarks.decode_gemv_bench [--sweep] [--dtypes bf16,fp8,w4] [--m 1,2] [--lm-head]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.fp8_bench import W1_LINEARS, emit
from benchmarks.quant_bench import _graph_us, copies_for, rotating_us
from benchmarks.throughput import measure_ceilings

LM_HEAD = {"lm_head": (152064, 3584)}


def read_bandwidth() -> float:
    """Bytes a second a plain reduction reads (no writes): the ceiling a GEMV's weight stream can reach."""
    big = torch.ones(1 << 30, dtype=torch.bfloat16, device="cuda")  # 2 GB
    us = _graph_us(lambda: torch.sum(big, dtype=torch.float32), calls=3, replays=5)
    return big.numel() * 2 / us / 1e-6


def sweep_configs(elem_bytes: float) -> list[tuple[int, ...]]:
    """bf16/FP8: (BLOCK_N, BLOCK_K, num_warps, splits, num_stages) holding 16-128 weight bytes a thread a tile
    (the range earlier sweeps' winners fell in), tiles pipelined 1-6 deep; 4-bit weights: (BLOCK_N, BLOCK_K,
    num_warps, splits) with BLOCK_K counting int32 words, a thread holding 4-32 of them."""
    if elem_bytes < 1:
        return [(bn, kp, nw, sp) for bn in (4, 8, 16, 32) for kp in (16, 32, 64, 128) for nw in (1, 2, 4)
                for sp in (1, 2, 4) if 4 <= bn * kp // (32 * nw) <= 32]
    return [(bn, bk, nw, sp, ns) for bn in (4, 8, 16, 32) for bk in (128, 256, 512, 1024) for nw in (1, 2, 4, 8)
            for sp in (1, 2, 4) for ns in (1, 3, 4, 6) if 16 <= bn * bk * elem_bytes // (32 * nw) <= 128]


# w4x2: the packed-half GEMV (gantry_kernels/quant_gemv_f16x2.py) on w4's weights; a trailing k: the words and scales stored
# K-major, as compressed-tensors' checkpoints hold them, instead of out-major as the engine stores them after loading
ELEM_BYTES = {"bf16": 2, "fp8": 1, "w4": 0.5, "w4x2": 0.5, "w4k": 0.5, "w4x2k": 0.5}
W4_DTYPES = ("w4", "w4x2", "w4k", "w4x2k")  # 4-bit packed words and group scales (compressed-tensors' values)
# w4x2's sweep: a scale per tile, so 16-word tiles (one group of 128 values)
F16X2_CONFIGS = [(bn, 16, nw, sp) for bn in (32, 64, 128, 256) for nw in (2, 4, 8) for sp in (1, 2, 4, 8, 16)
                 if 4 <= bn * 16 // (32 * nw) <= 32]


def random_weights(n: int, k: int, dtype: str, copies: int) -> list[tuple]:
    """(weight, row scales or None) a copy; w4: (PackedWeight, None)."""
    from benchmarks.quant_bench import random_w4
    from engine.layers.quant.fp8 import quantize_rows
    from gantry_kernels import quant_gemm

    out = []
    for _ in range(copies):
        if dtype in W4_DTYPES:
            qweight, scales = random_w4(n, k)  # [N, K / 8], [N, K / 128], K-major
            if not dtype.endswith("k"):
                qweight, scales = qweight.t().contiguous().t(), scales.t().contiguous().t()
            out.append((quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k), None))
            continue
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        out.append(quantize_rows(w) if dtype == "fp8" else (w, None))
    return out


def gemv_call(dtype: str, x: torch.Tensor, w, scale, cfg: tuple) -> torch.Tensor:
    from gantry_kernels import quant_gemv, quant_gemv_f16x2, weight_gemv

    if dtype.removesuffix("k") == "w4":
        return quant_gemv.gemv(x, w, None, *cfg)
    if dtype.removesuffix("k") == "w4x2":
        return quant_gemv_f16x2.gemv_f16x2(x, w, None, config=cfg)
    return weight_gemv.weight_gemv(x, w, scale, None, cfg)


def default_config(dtype: str, n: int, k: int, m: int) -> tuple[int, int, int, int]:
    from gantry_kernels import quant_gemv, quant_gemv_f16x2, weight_gemv

    sms = quant_gemv.num_sms(torch.device("cuda"))
    if dtype.removesuffix("k") == "w4x2":
        return quant_gemv_f16x2.f16x2_config(n, k, 4, m, sms)
    if dtype.removesuffix("k") == "w4":
        return quant_gemv.gemv_config(n, k, 4, m, sms)
    return weight_gemv.gemv_config(n, k, m, sms, ELEM_BYTES[dtype])


def best_gemv(name: str, n: int, k: int, dtype: str, m: int, sweep: bool) -> dict:
    """The GEMV's time at its rule/table config, or the best of the sweep; wrong output exits."""
    from gantry_kernels import quant_gemm

    elem = ELEM_BYTES[dtype]
    copies = copies_for(int(n * k * elem))
    ws = random_weights(n, k, dtype, copies)  # [(weight, scale)] a copy
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w0, s0 = ws[0]
    if dtype in W4_DTYPES:
        ref = x.float() @ quant_gemm.dequantize(w0, torch.float32).t()
    else:
        ref = x.float() @ (w0.float() * (1 if s0 is None else s0[:, None])).t()
    default = default_config(dtype, n, k, m)
    swept = F16X2_CONFIGS if dtype.removesuffix("k") == "w4x2" else sweep_configs(elem)
    cands = sorted(set(swept) | {default}) if sweep else [default]
    times = {}
    for cfg in cands:
        out = gemv_call(dtype, x, w0, s0, cfg)
        if not ((out.float() - ref).norm() / ref.norm()).item() < 0.01:
            raise SystemExit(f"GEMV {name} {dtype} {cfg}: wrong output")
        times[cfg] = rotating_us(lambda pair, cfg=cfg: gemv_call(dtype, x, *pair, cfg), ws, replays=10)
    best = min(times, key=times.get)
    row = {"gemv_best": list(best), "gemv_us": round(times[best], 2), "default": list(default),
           "default_us": round(times[default], 2), "configs": len(times)}
    if dtype == "bf16":
        row["cublas_us"] = round(rotating_us(lambda pair: F.linear(x, pair[0]), ws, replays=10), 2)
    del ws
    torch.cuda.empty_cache()
    return row


def sweep_table(dtypes: list[str], ms: list[int], sweep: bool, lm_head: bool, read_bw: float,
                copy_bw: float = 0.0, only: list[str] | None = None) -> dict:
    """One line per (shape, dtype, M); the best M = 1 configs, keyed as GEMV_TABLE keys them."""
    table = {}
    shapes = {**W1_LINEARS, **(LM_HEAD if lm_head else {})}
    shapes = {name: shape for name, shape in shapes.items() if not only or name in only}
    for dtype in dtypes:
        elem = ELEM_BYTES[dtype]
        for name, (n, k) in shapes.items():
            for m in ms:
                row = best_gemv(name, n, k, dtype, m, sweep and m == 1)
                frac = {key.replace("_us", "_of_read_bw"): round(n * k * elem / (row[key] * 1e-6) / read_bw, 3)
                        for key in ("gemv_us", "cublas_us") if key in row}
                if dtype in W4_DTYPES:  # the packed weights and their group scales, against copy bandwidth as issue 13 asks
                    frac["gemv_of_copy_bw"] = round((n * k // 2 + n * k // 64) / (row["gemv_us"] * 1e-6) / copy_bw, 3)
                emit("decode_gemv", layer=name, dtype=dtype, M=m, N=n, K=k, MB=round(n * k * elem / 1e6, 1),
                     **row, **frac)
                if m == 1:
                    table[(n, k, 4 if dtype in W4_DTYPES else elem)] = tuple(row["gemv_best"])
    return table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true", help="every config at M = 1, not only the table's/rule's")
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--m", default="1", help="rows, comma-separated")
    p.add_argument("--lm-head", action="store_true", help="also W1's LM head shape (1.09 GB in bf16)")
    p.add_argument("--shapes", help="comma-separated layer names to run (default: all), e.g. lm_head --lm-head")
    args = p.parse_args()
    copy_bw, _ = measure_ceilings(torch.device("cuda"))
    read_bw = read_bandwidth()
    emit("bandwidth", copy_GB_s=round(copy_bw / 1e9), read_GB_s=round(read_bw / 1e9))
    table = sweep_table(args.dtypes.split(","), [int(m) for m in args.m.split(",")], args.sweep, args.lm_head, read_bw,
                        copy_bw, args.shapes.split(",") if args.shapes else None)
    if args.sweep:
        emit("gemv_table", python=", ".join(f"{key}: {val}" for key, val in table.items()))


if __name__ == "__main__":
    main()
