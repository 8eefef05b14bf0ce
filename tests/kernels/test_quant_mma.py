"""gantry_kernels/quant_mma.py, the tensor-core kernel for small batches of 4-bit weights: on CUDA its bf16 pairs come
from inline PTX (LOP3 + two bf16x2 FMAs) and must equal the plain-Triton unpacking bit for bit; on CPU the
interpreter runs the plain unpacking in float32 (its bf16 tl.dot is wrong). Weights are packed here (value c of
a word at bits 4c, as compressed-tensors and GPTQ store them) so that the file also runs where
compressed-tensors is not installed (the GPU machine)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gantry_kernels import quant_gemm, quant_mma, reference

Check = Callable[[torch.Tensor, torch.Tensor], None]


def pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Unsigned 4-bit values -> int32 words of 8 along dim, value c at bits 4c."""
    v = values.movedim(dim, -1).to(torch.int64)
    v = v.reshape(*v.shape[:-1], -1, 8)
    word = (v << (torch.arange(8) * 4)).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).movedim(-1, dim).contiguous()


def make(layout: str, n: int, k: int, group: int, asym: bool, device: torch.device) -> dict:
    q = torch.randint(0, 16, (n, k))
    scales = (torch.rand(k // group, n) * 0.02 + 0.005).to(torch.bfloat16).float()  # exact in bf16
    if layout == "compressed-tensors":
        args = {"qweight": pack(q, 1), "scales": scales.t().contiguous(), "zeros": None}
    else:
        zeros = torch.randint(0, 16, (k // group, n)) if asym else None
        args = {"qweight": pack(q.t(), 0), "scales": scales, "zeros": None if zeros is None else pack(zeros, 1)}
    args.update(g_idx=None, bits=4, group_size=group, layout=layout)
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in args.items()}


@pytest.mark.parametrize("layout,asym,group", [("compressed-tensors", False, 128), ("gptq", True, 128),
                                               ("gptq", False, 256)])
@pytest.mark.parametrize("m,num_splits", [(1, 1), (5, 3), (20, None)])
def test_mma_matches_reference(layout: str, asym: bool, group: int, m: int, num_splits: int | None,
                               device: torch.device, assert_close: Check) -> None:
    """20 rows: a 32-row tile; 3 splits: split-K partials summed by quant_gemv's kernel."""
    args = make(layout, 96, 768, group, asym, device)
    w = quant_gemm.prepare(args["qweight"], args["scales"], args["zeros"], None, 4, group, layout, 768)
    cuda = device.type == "cuda"
    x = torch.randn(m, 768, device=device).to(torch.bfloat16 if cuda else torch.float32)
    if cuda:  # bf16 scales, as supports() asks
        scales = args["scales"].to(torch.bfloat16)
        w = quant_gemm.prepare(args["qweight"], scales, args["zeros"], None, 4, group, layout, 768)
        assert quant_mma.supports(w, x.dtype) and not quant_mma.supports(
            quant_gemm.prepare(args["qweight"], args["scales"], args["zeros"], None, 4, group, layout, 768), x.dtype)
        got = quant_mma.mma(x, w, None, 64, 16, 4, num_splits)
        assert torch.equal(got, quant_mma.mma(x, w, None, 64, 16, 4, num_splits, use_asm=False))  # asm == plain
        want = x.float() @ quant_gemm.dequantize(w, torch.bfloat16).float().t()  # the weights dequantize() writes
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
        if quant_gemm.GEMV_MAX_M < m <= quant_gemm.MMA_MAX_M:  # dequant_gemm dispatches here
            assert torch.equal(quant_gemm.dequant_gemm(x, **{**args, "scales": scales}), quant_mma.mma(x, w))
    else:
        got = quant_mma.mma(x, w, None, 64, 16, 4, num_splits, use_asm=False)
        assert_close(got, reference.dequant_gemm(x, **args))
        bias = torch.randn(96, device=device)  # Qwen2's qkv_proj: added by the split-sum kernel, split or not
        got = quant_mma.mma(x, w, bias, 64, 16, 4, num_splits, use_asm=False)
        assert_close(got, reference.dequant_gemm(x, **args, bias=bias))
