"""engine/layers/quant/ggml_cpu.c's block matmul: a row's result does not depend on how many rows share
the call (a request's logits do not depend on its batch), and rows far from zero (a large Q4_1 offset,
scaled apart from the quants) stay within float32 accuracy of the dequantized matmul."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine.layers.quant import ggml_cpu
from tests.engine.test_quant_gguf import KEPT, random_blocks


@pytest.fixture(autouse=True)
def _native() -> None:
    if ggml_cpu.cpu_kernel() is None:
        pytest.skip("no AVX2 or no C compiler: the torch fallback runs")


@pytest.mark.parametrize("qtype", KEPT)
def test_a_row_does_not_depend_on_its_batch(qtype: Q) -> None:
    blocks, _ = random_blocks(qtype)
    x = torch.randn(19, 256, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([ggml_cpu.ggml_linear(x[i : i + 1], blocks, qtype, 256) for i in range(19)])
    for m in (2, 3, 8, 9, 19):  # tiles of 8 rows and every remainder size
        assert torch.equal(ggml_cpu.ggml_linear(x[:m], blocks, qtype, 256), alone[:m]), m


@pytest.mark.parametrize("qtype", KEPT)
def test_offset_rows_match_the_dequantized_matmul(qtype: Q) -> None:
    blocks, reference = random_blocks(qtype, offset=3.0)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2)) + 0.5
    want = (x.double() @ reference.double().T).float()
    torch.testing.assert_close(ggml_cpu.ggml_linear(x, blocks, qtype, 256), want, rtol=1e-5, atol=1e-4)
