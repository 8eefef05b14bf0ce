"""gantry_kernels/ggml_gemv.py (decode rows times GGUF blocks, dequantized in registers) against gguf's dequantize
and a float64 matmul: every kept type, rows past the last BLOCK_N tile, partial 8-block tiles, split-K or
not, a tensor-parallel shard's strided rows; and ggml_linear's dispatch (Triton's interpreter on CPU, the
GPU where present)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gantry_kernels.ggml_gemv
from engine.layers.quant import ggml_cpu
from gantry_kernels.ggml_gemv import GGML_GEMV_MAX_M, ggml_gemv
from tests.engine.test_quant_gguf import KEPT, random_blocks
from tests.kernels.conftest import rel_error

Check = Callable[[torch.Tensor, torch.Tensor], None]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
N = 40  # not a multiple of BLOCK_N (16 or 32): the last tile's rows past N are read but not stored

# (m, blocks of 32 along K, or super-blocks of 256 for the K-quants, config (BLOCK_N, num_warps, num_splits)
# or the rule's, the weights' offset): 10 blocks are a whole 8-block tile and a partial one
CASES = [(1, 1, 1, (16, 4, 1), 0.0), (2, 3, 3, (32, 4, 3), 0.0), (3, 10, 2, (16, 4, 2), 3.0), (4, 10, 3, None, 0.0)]


@pytest.mark.parametrize("qtype", KEPT)
@pytest.mark.parametrize("m,num_blocks,num_super_blocks,config,offset", CASES)
def test_ggml_gemv_matches_dequantized_matmul(qtype: Q, m: int, num_blocks: int, num_super_blocks: int,
                                              config: tuple | None, offset: float, device: torch.device,
                                              assert_close: Check) -> None:
    k = num_super_blocks * 256 if qtype in ggml_cpu.K_QUANTS else num_blocks * 32
    blocks, reference = random_blocks(qtype, rows=N, cols=k, offset=offset)  # uint8 [N, row_bytes], float32 [N, K]
    x = torch.randn(m, k)
    want = (x.double() @ reference.double().T).float()
    assert_close(ggml_gemv(x.to(device), blocks.to(device), qtype, k, config).cpu(), want)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K])
def test_ggml_gemv_reads_a_shards_strided_rows(qtype: Q, device: torch.device, assert_close: Check) -> None:
    """Columns [1/5, 4/5) of the blocks (rows keep the whole tensor's stride), as a column-parallel shard."""
    k = 5 * (256 if qtype in ggml_cpu.K_QUANTS else 64)
    blocks, reference = random_blocks(qtype, rows=N, cols=k)
    row_bytes = blocks.shape[1]
    shard = blocks.to(device)[:, row_bytes // 5 : row_bytes * 4 // 5]  # uint8 [N, 3/5 row_bytes], strided
    x = torch.randn(2, k * 3 // 5)
    want = (x.double() @ reference[:, k // 5 : k * 4 // 5].double().T).float()
    assert_close(ggml_gemv(x.to(device), shard, qtype, k * 3 // 5, (16, 4, 2)).cpu(), want)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("qtype", KEPT)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4])
def test_ggml_gemv_half_activations(qtype: Q, dtype: torch.dtype, m: int, assert_close: Check) -> None:
    """The engine's case: half-precision x and output, float32 accumulation, a W1-sized K and the rule's config."""
    blocks, reference = random_blocks(qtype, rows=300, cols=3584)
    x = torch.randn(m, 3584).to(dtype)
    want = (x.double() @ reference.double().T).to(dtype)
    assert_close(ggml_gemv(x.cuda(), blocks.cuda(), qtype, 3584).cpu(), want)


def test_ggml_linear_on_cpu_never_calls_the_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("the Triton GEMV ran on CPU")

    monkeypatch.setattr(gantry_kernels.ggml_gemv, "ggml_gemv", fail)
    blocks, reference = random_blocks(Q.Q4_1, rows=N, cols=64)
    x = torch.randn(1, 64)
    torch.testing.assert_close(ggml_cpu.ggml_linear(x, blocks, Q.Q4_1, 64), x @ reference.T, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K])
def test_ggml_linear_on_cuda_takes_the_gemv_for_decode_rows(qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counted(*args: object) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return ggml_gemv(*args)

    monkeypatch.setattr(gantry_kernels.ggml_gemv, "ggml_gemv", counted)
    blocks, reference = random_blocks(qtype, rows=N, cols=512)
    blocks = blocks.cuda()
    for m in range(1, GGML_GEMV_MAX_M + 2):
        x = torch.randn(m, 512, device="cuda")
        y = ggml_cpu.ggml_linear(x, blocks, qtype, 512)
        assert rel_error(y.cpu(), (x.cpu().double() @ reference.double().T).float()) < 1e-3, m  # 1e-3: TF32 if on
    assert calls == list(range(1, GGML_GEMV_MAX_M + 1))  # above GGML_GEMV_MAX_M: dequantize + matmul
