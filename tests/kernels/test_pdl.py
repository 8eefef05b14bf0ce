"""kernels/pdl.py: GANTRY_PDL never reaches a CPU launch; on a Hopper GPU a decode chain of our kernels captured in
a CUDA graph with programmatic launches gives the same bits as launched one after another."""
from __future__ import annotations

import pytest
import torch

from kernels import pdl


def test_off_on_cpu_even_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "PDL", True)
    assert pdl.launch_kwargs(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(pdl, "PDL", False)
    assert pdl.launch_kwargs(torch.device("cpu")) == {"PDL": False}


def _decode_chain(x: torch.Tensor, weights: dict) -> torch.Tensor:
    """RMSNorm -> packed 4-bit GEMV (split K: its sum kernel) -> bf16 GEMV -> SiLU-and-mul -> bf16 GEMV."""
    from kernels.activation import silu_and_mul
    from kernels.norm import rms_norm
    from kernels.quant_gemv_f16x2 import gemv_f16x2
    from kernels.weight_gemv import weight_gemv

    h = rms_norm(x, weights["norm"], 1e-6)
    h = gemv_f16x2(h, weights["w4"], config=(64, 16, 2, 4))
    h = weight_gemv(h, weights["up"])
    return weight_gemv(silu_and_mul(h), weights["down"])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a GPU of compute capability 9.0 or more (programmatic dependent launch)")
def test_pdl_chain_in_a_cuda_graph_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.quant_bench import random_w4
    from kernels import quant_gemm

    torch.manual_seed(0)
    k = 2048
    qweight, scales = random_w4(k, k)  # [N, K / 8], [N, K / 128]
    weights = {"norm": torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5,
               "w4": quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k),
               "up": (torch.randn(2 * k, k, device="cuda") * 0.02).to(torch.bfloat16),
               "down": (torch.randn(k, k, device="cuda") * 0.02).to(torch.bfloat16)}
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    want = _decode_chain(x, weights)
    monkeypatch.setattr(pdl, "PDL", True)
    _decode_chain(x, weights)  # compile the PDL variants before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _decode_chain(x, weights)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
