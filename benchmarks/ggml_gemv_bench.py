"""GGUF blocks on one GPU (#13): gantry_kernels/ggml_gemv.py's decode GEMV against today's dequantize + matmul
(ggml_cpu._dequant_torch, then F.linear in bf16) for each kept type at W1's linear shapes, M = 1, bf16
activations, random blocks with small fp16 scales. One JSON line per type and shape: us (GPU time a call,
median of 50 replays of a CUDA graph whose calls rotate over enough weight copies to overflow L2), weight
GB/s and its fraction of the device-to-device copy bandwidth measured in the same run. --sweep also
times tiles x splits and prints a GEMV_TABLE line for gantry_kernels/ggml_gemv.py. About a minute on an H200:
    python -m benchmarks.ggml_gemv_bench [--types Q4_1,Q6_K] [--sweep]
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from benchmarks.fp8_bench import W1_LINEARS, emit
from engine.layers.quant.ggml_cpu import GGML_Q4_0, GGML_Q4_1, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K, GGML_Q8_0
from benchmarks.quant_bench import _check, copies_for, rotating_us
from benchmarks.throughput import measure_ceilings

TYPES = {"Q4_0": GGML_Q4_0, "Q4_1": GGML_Q4_1, "Q8_0": GGML_Q8_0, "Q4_K": GGML_Q4_K, "Q5_K": GGML_Q5_K,
         "Q6_K": GGML_Q6_K}
SCALE_OFFSETS = {GGML_Q4_0: (0,), GGML_Q4_1: (0, 2), GGML_Q8_0: (0,), GGML_Q4_K: (0, 2), GGML_Q5_K: (0, 2),
                 GGML_Q6_K: (208,)}  # fp16 fields of a block
SWEEP_TILES = [(bn, nw) for bn in (16, 32, 64) for nw in (2, 4, 8)]  # (BLOCK_N, num_warps)
SWEEP_SPLITS = (1, 2, 4, 8, 16)


def random_blocks(ggml_type: int, n: int, k: int) -> torch.Tensor:
    """uint8 [n, row_bytes] of random quants with fp16 scales (and mins) of 1e-3: finite, sane sums."""
    from engine.layers.quant.ggml_cpu import BLOCK_BYTES, row_bytes

    blocks = torch.randint(0, 256, (n, row_bytes(ggml_type, k)), dtype=torch.uint8, device="cuda")
    per_block = blocks.view(n, -1, BLOCK_BYTES[ggml_type])  # [n, num_blocks, block_bytes]
    for off in SCALE_OFFSETS[ggml_type]:
        per_block[..., off : off + 2] = torch.tensor([1e-3], dtype=torch.float16).view(torch.uint8).cuda()
    return blocks


def bench_type(name: str, ggml_type: int, bandwidth: float, sweep: bool) -> dict:
    from triton.errors import TritonError

    from engine.layers.quant.ggml_cpu import _dequant_torch
    from gantry_kernels.ggml_gemv import gemv_config, ggml_gemv
    from gantry_kernels.quant_gemv import num_sms

    table = {}
    for layer, (n, k) in W1_LINEARS.items():
        blocks = random_blocks(ggml_type, n, k)
        nbytes = blocks.numel()
        copies = [blocks] + [blocks.clone() for _ in range(copies_for(nbytes) - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x, _dequant_torch(blocks, ggml_type, k).to(x.dtype))
        err = _check(f"{name} {layer}", ggml_gemv(x, blocks, ggml_type, k), ref)
        gemv_us = rotating_us(lambda b: ggml_gemv(x, b, ggml_type, k), copies)  # noqa: B023

        def dequant_matmul(b: torch.Tensor) -> torch.Tensor:  # today's path: the whole tensor, then cuBLAS
            return torch.nn.functional.linear(x, _dequant_torch(b, ggml_type, k).to(x.dtype))  # noqa: B023

        old_us = rotating_us(dequant_matmul, copies[:4], replays=10)  # ms a call: 10 replays of 4 copies
        emit("ggml_gemv", type=name, layer=layer, N=n, K=k, weight_bytes=nbytes,
             config=list(gemv_config(n, k, ggml_type, 1, num_sms(x.device))), us=round(gemv_us, 2),
             gb_s=round(nbytes / gemv_us / 1e3, 1), copy_fraction=round(nbytes / (gemv_us * 1e-6) / bandwidth, 3),
             dequant_matmul_us=round(old_us, 1), speedup=round(old_us / gemv_us, 1), rel_err=err)
        if sweep:
            times = {}
            for (block_n, warps), splits in itertools.product(SWEEP_TILES, SWEEP_SPLITS):
                cfg = (block_n, warps, splits)
                try:
                    _check(f"{name} {layer} {cfg}", ggml_gemv(x, blocks, ggml_type, k, cfg), ref)
                except (RuntimeError, TritonError):  # out of registers / shared memory: the next tile
                    continue
                call = lambda b, cfg=cfg: ggml_gemv(x, b, ggml_type, k, cfg)  # noqa: B023, E731
                times[cfg] = rotating_us(call, copies, replays=10)
            best = min(times, key=times.get)
            table[(n, k, ggml_type)] = best
            emit("ggml_gemv_sweep", type=name, layer=layer, best_config=list(best), best_us=round(times[best], 2),
                 best_copy_fraction=round(nbytes / (times[best] * 1e-6) / bandwidth, 3), rule_us=round(gemv_us, 2),
                 top=[[*c, round(times[c], 2)] for c in sorted(times, key=times.get)[:5]])
        del copies, blocks
        torch.cuda.empty_cache()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated ggml types")
    parser.add_argument("--sweep", action="store_true", help="also time BLOCK_N x num_warps x splits (minutes)")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.ggml_gemv_bench needs a CUDA GPU: it times Triton kernels (none found here)")
    torch.manual_seed(0)
    bandwidth, _ = measure_ceilings(torch.device("cuda"))  # copy bytes/s, read + write
    emit("device", name=torch.cuda.get_device_name(), copy_gb_s=round(bandwidth / 1e9, 1))
    table = {}
    for name in opts.types.split(","):
        table.update(bench_type(name, TYPES[name], bandwidth, opts.sweep))
    if opts.sweep:
        emit("ggml_gemv_table", python="GEMV_TABLE = {" + ", ".join(f"{k}: {v}" for k, v in table.items()) + "}")


if __name__ == "__main__":
    main()
