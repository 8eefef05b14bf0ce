"""gantry_kernels/pdl.py: GANTRY_PDL never reaches a CPU launch; on a Hopper GPU a decode chain of our kernels captured in
a CUDA graph with programmatic launches gives the same bits as launched one after another."""
from __future__ import annotations

import pytest
import torch

from gantry_kernels import pdl


def test_off_on_cpu_even_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "PDL", True)
    assert pdl.launch_kwargs(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(pdl, "PDL", False)
    assert pdl.launch_kwargs(torch.device("cpu")) == {"PDL": False}


def _decode_chain(x: torch.Tensor, weights: dict) -> torch.Tensor:
    """RMSNorm -> packed 4-bit GEMV (split K: its sum kernel) -> bf16 GEMV -> SiLU-and-mul -> bf16 GEMV."""
    from gantry_kernels.activation import silu_and_mul
    from gantry_kernels.norm import rms_norm
    from gantry_kernels.quant_gemv_f16x2 import gemv_f16x2
    from gantry_kernels.weight_gemv import weight_gemv

    h = rms_norm(x, weights["norm"], 1e-6)
    h = gemv_f16x2(h, weights["w4"], config=(64, 16, 2, 4))
    h = weight_gemv(h, weights["up"])
    return weight_gemv(silu_and_mul(h), weights["down"])


requires_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                   reason="needs a GPU of compute capability 9.0 or more (programmatic dependent launch)")


def _replayed_with_pdl(chain, monkeypatch: pytest.MonkeyPatch) -> None:
    """chain() launched plainly, then with PDL captured in a CUDA graph: every replay gives the same bits."""
    want = chain()
    monkeypatch.setattr(pdl, "PDL", True)
    chain()  # compile the PDL variants before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)


@requires_sm90
def test_pdl_chain_in_a_cuda_graph_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.quant_bench import random_w4
    from gantry_kernels import quant_gemm

    torch.manual_seed(0)
    k = 2048
    qweight, scales = random_w4(k, k)  # [N, K / 8], [N, K / 128]
    weights = {"norm": torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5,
               "w4": quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k),
               "up": (torch.randn(2 * k, k, device="cuda") * 0.02).to(torch.bfloat16),
               "down": (torch.randn(k, k, device="cuda") * 0.02).to(torch.bfloat16)}
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    _replayed_with_pdl(lambda: _decode_chain(x, weights), monkeypatch)


@requires_sm90
def test_pdl_few_rows_chain_in_a_cuda_graph_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four decode rows: RMSNorm -> the few-row 4-bit kernel (split K) -> the GGUF GEMV (Q4_K blocks, split K)."""
    from gguf import GGMLQuantizationType as Q

    from benchmarks.quant_bench import random_w4
    from gantry_kernels import quant_gemm
    from gantry_kernels.ggml_gemv import ggml_gemv
    from gantry_kernels.norm import rms_norm
    from gantry_kernels.quant_mma import mma
    from tests.engine.test_quant_gguf import random_blocks

    torch.manual_seed(0)
    k = 2048
    qweight, scales = random_w4(k, k)  # [N, K / 8], [N, K / 128]
    w4 = quant_gemm.prepare(qweight, scales, None, None, 4, 128, "compressed-tensors", k)
    blocks = random_blocks(Q.Q4_K, rows=k, cols=k)[0].cuda()  # uint8 [N, row_bytes]
    norm = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
    _replayed_with_pdl(lambda: ggml_gemv(mma(rms_norm(x, norm, 1e-6), w4, num_splits=4), blocks, Q.Q4_K, k,
                                         (32, 4, 4)), monkeypatch)
