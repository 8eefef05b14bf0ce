"""GGUF blocks on CPU (engine/layers/quant/ggml_cpu): the kept types' matmul straight from the blocks against
dequantizing the whole weight per call and calling BLAS, one JSON line per type and row count, medians of
alternating repeats in one run. Random blocks: the 32-weight types quantized by gguf, the K-quants (which gguf
cannot write) random bytes with sane f16 scales, as tests/engine/test_quant_gguf.py makes them.

    python -m benchmarks.cpu_blocks [--n 3072 --k 768 --rows 1,16 --repeats 30 --threads N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quantize

from engine.gguf_file import GGML_BLOCK_SIZES
from engine.layers.quant import ggml_cpu

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
K_SCALE_BYTES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # offsets of the f16 scales in a super-block


def random_blocks(qtype: Q, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    if qtype not in K_SCALE_BYTES:
        return torch.from_numpy(quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, qtype).copy())
    block_size, block_bytes = GGML_BLOCK_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block_size, block_bytes), dtype=np.uint8)
    for off in K_SCALE_BYTES[qtype]:
        raw[..., off : off + 2] = rng.uniform(1e-3, 3e-3, raw.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(n, -1).copy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(json.dumps({"figure": "setup", "native_kernel": ggml_cpu.cpu_kernel() is not None,
                      "threads": torch.get_num_threads(), "n": args.n, "k": args.k}), flush=True)
    for qtype in TYPES:
        blocks = random_blocks(qtype, args.n, args.k, rng)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, args.k)
            paths = {"blocks": lambda: ggml_cpu.ggml_linear(x, blocks, int(qtype), args.k),  # noqa: B023
                     "dequantize_then_blas": lambda: torch.nn.functional.linear(  # noqa: B023
                         x, ggml_cpu.dequantize_rows(blocks, int(qtype), args.k))}  # noqa: B023
            times: dict[str, list[float]] = {name: [] for name in paths}
            for fn in paths.values():
                fn()  # warm-up
            for _ in range(args.repeats):  # alternating: a shared CPU drifts
                for name, fn in paths.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            print(json.dumps({"figure": "cpu_blocks", "type": qtype.name, "rows": m,
                              "blocks_ms": round(med["blocks"], 3),
                              "dequantize_then_blas_ms": round(med["dequantize_then_blas"], 3),
                              "speedup": round(med["dequantize_then_blas"] / med["blocks"], 2),
                              "weight_bytes_vs_float32": round(blocks.numel() / (args.n * args.k * 4), 3)}),
                  flush=True)


if __name__ == "__main__":
    main()
