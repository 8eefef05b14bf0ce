"""Packed int4/int8 dequant-GEMM (gantry_kernels/quant_gemm.py): the reference against the published packings
(compressed-tensors' own packer; AutoGPTQ's and AutoAWQ's pack loops, rewritten here), then every
kernel path (GEMV with and without split-K, tensor-core GEMM, dequantize + matmul) against it."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gantry_kernels import quant_gemm, reference
from gantry_kernels.quant_gemm import dequant_gemm

pack_to_int32 = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers").pack_to_int32
Check = Callable[[torch.Tensor, torch.Tensor], None]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_unsigned(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned values -> int32 words along dim, low bits first (AutoGPTQ's `qweight[row] |= w[j] <<
    (bits * (j - i))`); compressed-tensors' packer, which offsets signed values by 2**(bits-1)."""
    return pack_to_int32((values - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=dim)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[rows, N] 4-bit values -> [rows, N / 8] int32: AutoAWQ's WQLinear_GEMM.from_linear, word `col`
    holds value col * 8 + AWQ_ORDER[i] at bits 4i."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)[:, :, AWQ_ORDER]  # [rows, N / 8, 8]
    word = (v << (torch.arange(8) * 4)).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def make_weight(layout: str, n: int, k: int, bits: int, group_size: int, asym: bool, act_order: bool,
                device: torch.device) -> tuple[dict, torch.Tensor]:
    """Random packed tensors in the layout, and the float32 [N, K] weight they stand for."""
    group = k if group_size <= 0 else group_size
    num_groups = k // group
    q = torch.randint(0, 2**bits, (n, k))  # [N, K] unsigned values
    scales = torch.rand(num_groups, n) * 0.02 + 0.005  # [num_groups, N]
    zeros = torch.randint(0, 2**bits, (num_groups, n)) if asym else None
    g_idx = torch.randperm(k) // group if act_order else None  # desc_act: groups scattered over K
    groups = g_idx if act_order else torch.arange(k) // group
    z = zeros[groups] if asym else 2 ** (bits - 1)  # [K, N]
    w = ((q.t() - z).float() * scales[groups]).t()  # [N, K]
    if layout == "compressed-tensors":
        args = {"qweight": pack_unsigned(q, bits, 1), "scales": scales.t().contiguous(), "zeros": None}
    elif layout == "gptq":
        args = {"qweight": pack_unsigned(q.t(), bits, 0), "scales": scales,
                    "zeros": pack_unsigned(zeros, bits, 1) if asym else None}
    else:
        args = {"qweight": pack_awq(q.t()), "scales": scales, "zeros": pack_awq(zeros) if asym else None}
    args.update(g_idx=g_idx.to(torch.int32) if act_order else None, bits=bits, group_size=group_size, layout=layout)
    moved = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in args.items()}
    return moved, w.to(device)


# (layout, bits, group_size, asymmetric zeros, act_order g_idx)
CASES = [
    ("compressed-tensors", 4, 128, False, False),
    ("compressed-tensors", 8, 64, False, False),
    ("compressed-tensors", 4, -1, False, False),
    ("gptq", 4, 128, True, False),
    ("gptq", 4, 32, False, False),
    ("gptq", 8, 128, True, True),
    ("gptq", 4, 64, True, True),
    ("awq", 4, 128, True, False),
    ("awq", 4, 64, False, False),
]


@pytest.mark.parametrize("layout,bits,group_size,asym,act_order", CASES)
def test_reference_reads_published_packing(layout: str, bits: int, group_size: int, asym: bool,
                                           act_order: bool) -> None:
    args, w = make_weight(layout, 48, 256, bits, group_size, asym, act_order, torch.device("cpu"))
    got = reference.dequantize_packed(args["qweight"], args["scales"], args["zeros"], args["g_idx"], bits,
                                      group_size, layout)
    assert torch.equal(got, w)


@pytest.mark.parametrize("layout,bits,group_size,asym,act_order", CASES)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_dequant_gemm_matches_reference(layout: str, bits: int, group_size: int, asym: bool, act_order: bool,
                                        m: int, device: torch.device, assert_close: Check,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 to float32's tolerance: one row takes quant_gemv.py here (quant_gemv_f16x2.py's f16 sums have
    their own test, test_gemv_f16x2, and test_gemv_f16x2_dispatch checks which rows go there)."""
    from gantry_kernels import quant_gemv_f16x2

    monkeypatch.setattr(quant_gemv_f16x2, "GEMV_F16X2", False)
    # N = 96: a partial 64-wide tile; K = 384: a partial 256-value GEMV tile
    args, _ = make_weight(layout, 96, 384, bits, group_size, asym, act_order, device)
    x = torch.randn(m, 384, device=device)
    assert_close(dequant_gemm(x, **args), reference.dequant_gemm(x, **args))


@pytest.mark.parametrize("layout,bits,group_size,asym,act_order", [CASES[0], CASES[5], CASES[7]])
@pytest.mark.parametrize("m", [5, 100, 130])
def test_fused_gemm_block_configs(layout: str, bits: int, group_size: int, asym: bool, act_order: bool,
                                  m: int, device: torch.device, assert_close: Check) -> None:
    """The fused tensor-core GEMM (not dispatched today, kept for when it measures faster)."""
    args, _ = make_weight(layout, 136, 256, bits, group_size, asym, act_order, device)
    x = torch.randn(m, 256, device=device)
    w = quant_gemm.prepare(args["qweight"], args["scales"], args["zeros"], args["g_idx"], bits, group_size,
                           layout, 256)
    assert_close(quant_gemm.gemm(x, w), reference.dequant_gemm(x, **args))


@pytest.mark.parametrize("num_splits", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_split_k_with_bias(num_splits: int, m: int, device: torch.device, assert_close: Check) -> None:
    args, _ = make_weight("compressed-tensors", 80, 768, 4, 128, False, False, device)
    x = torch.randn(m, 768, device=device).to(torch.bfloat16)
    bias = torch.randn(80, device=device).to(torch.bfloat16)
    w = quant_gemm.prepare(args["qweight"], args["scales"], None, None, 4, 128, "compressed-tensors", 768)
    got = quant_gemm.gemv(x, w, bias, num_splits=num_splits)
    assert_close(got, reference.dequant_gemm(x, **args, bias=bias))


@pytest.mark.parametrize("layout,bits,group_size,asym,act_order", [CASES[0], CASES[3], CASES[6]])
@pytest.mark.parametrize("config", [(16, 8, 2, 5), (32, 32, 4, 2), (64, 64, 8, 1), (128, 16, 4, None)])
def test_gemv_tile_configs(layout: str, bits: int, group_size: int, asym: bool, act_order: bool,
                           config: tuple, device: torch.device, assert_close: Check) -> None:
    """The tiles quant_bench sweeps: a scale a tile (16 words of 4 bits = one group of 128), a scale a
    word (32 and 64 words), split-K with several tiles a split (the prefetch of the next tile masked
    off at the split's end) and with one."""
    args, _ = make_weight(layout, 80, 1024, bits, group_size, asym, act_order, device)
    w = quant_gemm.prepare(args["qweight"], args["scales"], args["zeros"], args["g_idx"], bits, group_size,
                           layout, 1024)
    x = torch.randn(1, 1024, device=device)
    assert_close(quant_gemm.gemv(x, w, None, *config), reference.dequant_gemm(x, **args))


@pytest.mark.parametrize("config", [(32, 16, 4, 3), (16, 8, 2, None)])
def test_gemv_partial_last_tile(config: tuple, device: torch.device, assert_close: Check) -> None:
    """K = 1000 (125 words: the last tile of 16 or 8 words partial): the masked path, not the EVEN_K one."""
    args, _ = make_weight("compressed-tensors", 40, 1000, 4, -1, False, False, device)
    w = quant_gemm.prepare(args["qweight"], args["scales"], None, None, 4, -1, "compressed-tensors", 1000)
    x = torch.randn(1, 1000, device=device)
    assert_close(quant_gemm.gemv(x, w, None, *config), reference.dequant_gemm(x, **args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_half_types_with_bias(dtype: torch.dtype, device: torch.device, assert_close: Check) -> None:
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw 16-bit integers")
    args, _ = make_weight("gptq", 64, 256, 4, 128, True, False, device)
    x = torch.randn(2, 9, 256, device=device).to(dtype)  # leading dims kept
    bias = torch.randn(64, device=device).to(dtype)
    got = dequant_gemm(x, **args, bias=bias)
    assert got.shape == (2, 9, 64)
    assert_close(got, reference.dequant_gemm(x, **args, bias=bias))


@pytest.mark.parametrize("layout,bits,group_size,asym,act_order", [*CASES[::2], CASES[1], CASES[5]])
def test_dequantize_then_matmul_path(layout: str, bits: int, group_size: int, asym: bool, act_order: bool,
                                     device: torch.device, assert_close: Check,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    args, w = make_weight(layout, 104, 256, bits, group_size, asym, act_order, device)  # a partial 32-row tile
    packed = quant_gemm.prepare(args["qweight"], args["scales"], args["zeros"], args["g_idx"], bits, group_size,
                                layout, 256)
    assert_close(quant_gemm.dequantize(packed, torch.float32), w)
    calls = []
    monkeypatch.setattr(quant_gemm, "gemm", lambda *a: calls.append(a))  # dispatching the fused GEMM would fail
    x = torch.randn(2, 256, device=device)  # the smallest M above the GEMV
    assert_close(dequant_gemm(x, **args), reference.dequant_gemm(x, **args))
    assert not calls


def test_bad_arguments_name_the_field(device: torch.device) -> None:
    args, _ = make_weight("gptq", 64, 256, 4, 128, True, False, device)
    x = torch.randn(1, 256, device=device)
    for change, field in [({"layout": "marlin"}, "layout"), ({"bits": 3}, "bits"),
                          ({"scales": args["scales"][:1]}, "scales"), ({"group_size": 96}, "group_size"),
                          ({"zeros": args["zeros"][:, :2]}, "zeros"), ({"layout": "awq", "bits": 8}, "bits")]:
        with pytest.raises(ValueError, match=f"dequant_gemm: {field}:"):
            dequant_gemm(x, **{**args, **change})
    with pytest.raises(ValueError, match="qweight"):
        dequant_gemm(torch.randn(1, 128, device=device), **args)


@pytest.mark.parametrize("bits,strategy", [(4, "group"), (8, "channel")])
def test_compressed_tensors_layer_agrees(bits: int, strategy: str, device: torch.device, assert_close: Check) -> None:
    """The engine's compressed-tensors layer: on CUDA its forward is this kernel; the kernel, called as
    the layer calls it, equals the layer's own torch dequantization."""
    from engine.layers.linear import ReplicatedLinear
    from engine.layers.quant.compressed_tensors import CompressedTensorsConfig

    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": 128}
    qc = {"format": "pack-quantized", "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    layer = ReplicatedLinear(256, 96, True, CompressedTensorsConfig(qc))
    args, _ = make_weight("compressed-tensors", 96, 256, bits, 128 if strategy == "group" else -1, False, False,
                          torch.device("cpu"))
    layer.weight_packed.data.copy_(args["qweight"])
    layer.weight_scale.data.copy_(args["scales"])
    layer.bias.data.normal_()
    layer.to(device)
    x = torch.randn(3, 256, device=device)
    want = torch.nn.functional.linear(x, layer.quant_method.dequantize(layer), layer.bias)
    got = layer(x) if device.type == "cuda" else dequant_gemm(
        x, layer.weight_packed, layer.weight_scale, None, None, bits, layer.group_size, "compressed-tensors", layer.bias)
    assert_close(got, want)


F16X2_CASES = [("gptq", 4, 128, True, False), ("gptq", 4, 128, False, False), ("compressed-tensors", 4, 128, False, False)]


@pytest.mark.parametrize("layout,bits,group_size,asym,act_order", F16X2_CASES)
@pytest.mark.parametrize("m,x_scale", [(1, 1.0), (3, 1.0), (1, 3e4)])
def test_gemv_f16x2(layout: str, bits: int, group_size: int, asym: bool, act_order: bool, m: int, x_scale: float,
                    device: torch.device) -> None:
    """gantry_kernels/quant_gemv_f16x2.py against the reference: on CPU its float32 stand-in for the PTX (same packed
    operands), on the GPU the PTX and the stand-in. x up to 3e4 (f16 overflows without x scaled by its largest |x|).
    N = 96: a partial row tile; K = 640: five tiles of 16 words (8 values each), in 2 splits."""
    from gantry_kernels import quant_gemv_f16x2

    args, _ = make_weight(layout, 96, 640, bits, group_size, asym, act_order, device)
    w = quant_gemm.prepare(args["qweight"], args["scales"], args["zeros"], args["g_idx"], bits, group_size, layout, 640)
    assert quant_gemv_f16x2.supports(w)
    x = torch.randn(m, 640, device=device) * x_scale
    bias = torch.randn(96, device=device) if m == 3 else None
    want = reference.dequant_gemm(x, **args) + (0 if bias is None else bias)
    for use_ptx in (False, True) if device.type == "cuda" else (False,):
        got = quant_gemv_f16x2.gemv_f16x2(x, w, bias, use_ptx=use_ptx)
        # the PTX sums a word's 8 products in f16: ~5e-4 of the output's norm (a float16 emulation on CPU), under
        # bf16's own rounding; an element near 0 keeps its summands' error, so no per-element rtol
        assert ((got - want).norm() / want.norm()).item() < 2e-3
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * want.abs().max().item())


def test_gemv_f16x2_dispatch(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """GEMV_F16X2 (on unless GANTRY_GEMV_F16X2=0) routes the 4-bit GEMV there; 8-bit weights with g_idx keep
    quant_gemv.py."""
    from gantry_kernels import quant_gemv_f16x2

    calls = []
    monkeypatch.setattr(quant_gemv_f16x2, "GEMV_F16X2", True)
    monkeypatch.setattr(quant_gemv_f16x2, "gemv_f16x2", lambda x, w, bias=None: calls.append(w) or x.new_zeros(1, w.n))
    for case, taken in ((CASES[3], True), (CASES[5], False), (CASES[0], True)):
        before = len(calls)
        args, _ = make_weight(case[0], 64, 256, *case[1:], device)
        dequant_gemm(torch.randn(1, 256, device=device), **args)
        assert len(calls) == before + taken, case
