"""PyTorch's own int4 GEMM (`torch._weight_int4pack_mm`, gpt-fast's tinygemm) against the engine's one-row 4-bit
GEMV (gantry_kernels/quant_gemv_f16x2.py, its split sums included) and bf16 cuBLAS at W1's shapes, M = 1, group
128: would a well-kept kernel beat ours (issue 13's TPOT line)? Weights rotated out of L2 as a decode step finds
them (quant_bench.rotating_us); each kernel's output checked against float32 dequantize + matmul. One JSON line
a layer, then the sum a layer.
    python -m benchmarks.torch_int4_bench
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.decode_gemv_bench import read_bandwidth
from benchmarks.fp8_bench import W1_LINEARS, emit
from benchmarks.quant_bench import _check, copies_for, random_w4, rotating_us

GROUP = 128
INNER_K_TILES = (2, 4, 8)  # tinygemm's packing choices


def tinygemm_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nibbles int32 [N, K], uint8 [N, K / 2] two a byte, scales-and-zeros bf16 [K / GROUP, N, 2])."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    scale = torch.rand(k // GROUP, n, device="cuda") * 0.004 + 0.002
    zero = (torch.rand(k // GROUP, n, device="cuda") - 0.5) * 0.01
    return q, packed, torch.stack([scale, zero], dim=-1).to(torch.bfloat16).contiguous()


def tinygemm_us(x: torch.Tensor, n: int, k: int, inner_k_tiles: int) -> tuple[float, int]:
    """(µs a call, weight bytes); the first copy's output checked: w = (q - 8) * scale + zero, tinygemm's rule."""
    nbytes = n * k // 2 + (k // GROUP) * n * 4
    ws = []
    for c in range(copies_for(nbytes)):
        q, packed, sz = tinygemm_weight(n, k)
        w = torch._convert_weight_to_int4pack(packed, inner_k_tiles)
        if c == 0:
            deq = (q.float() - 8) * sz[..., 0].float().repeat_interleave(GROUP, 0).t() \
                + sz[..., 1].float().repeat_interleave(GROUP, 0).t()  # [N, K]
            _check(f"tinygemm {n}x{k}", torch._weight_int4pack_mm(x, w, GROUP, sz), x.float() @ deq.t())
            del deq
        ws.append((w, sz))
        del q, packed
    us = rotating_us(lambda p: torch._weight_int4pack_mm(x, p[0], GROUP, p[1]), ws, replays=10)
    return us, nbytes


def engine_us(x: torch.Tensor, n: int, k: int) -> tuple[float, int]:
    """(µs a call, weight bytes) of the engine's one-row 4-bit GEMV on words stored out-major, as it loads them."""
    from gantry_kernels import quant_gemm, quant_gemv_f16x2

    nbytes = n * k // 2 + (k // GROUP) * n * 2
    ws = []
    for c in range(copies_for(nbytes)):
        qweight, scales = random_w4(n, k, GROUP)
        w = quant_gemm.prepare(qweight.t().contiguous().t(), scales.t().contiguous().t(), None, None, 4, GROUP,
                               "compressed-tensors", k)
        if c == 0:
            _check(f"gemv_f16x2 {n}x{k}", quant_gemv_f16x2.gemv_f16x2(x, w),
                   x.float() @ quant_gemm.dequantize(w, torch.float32).t())
        ws.append(w)
    return rotating_us(lambda w: quant_gemv_f16x2.gemv_f16x2(x, w), ws, replays=10), nbytes


def main() -> None:
    torch.manual_seed(0)
    bw = read_bandwidth()
    emit("read_bandwidth", gb_s=round(bw / 1e9), torch=torch.__version__, device=torch.cuda.get_device_name())
    layer: dict[str, float] = {}
    for name, (n, k) in W1_LINEARS.items():
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row: dict[str, object] = {}
        runs = {f"tinygemm_ikt{t}": lambda t=t: tinygemm_us(x, n, k, t) for t in INNER_K_TILES}
        runs["engine_f16x2"] = lambda: engine_us(x, n, k)
        for kernel, run in runs.items():
            us, nbytes = run()
            row[kernel] = {"us": round(us, 2), "of_read_bw": round(nbytes / us / 1e-6 / bw, 3)}
            layer[kernel] = layer.get(kernel, 0.0) + us
            torch.cuda.empty_cache()
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(n * k * 2))]
        row["bf16_cublas"] = {"us": round(rotating_us(lambda w: F.linear(x, w), wb, replays=10), 2)}
        layer["bf16_cublas"] = layer.get("bf16_cublas", 0.0) + row["bf16_cublas"]["us"]
        del wb
        torch.cuda.empty_cache()
        emit("int4_gemv", layer=name, **row)
    emit("int4_gemv_layer_us", **{kernel: round(us, 2) for kernel, us in layer.items()})


if __name__ == "__main__":
    main()
