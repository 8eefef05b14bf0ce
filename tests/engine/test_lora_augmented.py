"""Augmented LoRA (engine/lora/augmented.py) on CPU, both modes: one GEMM over [x, masked x @ A^T] and [W | B]
(k), or one GEMM over [W; A] and the expand after it (n), equals the SGMV path's base GEMM + shrink + expand
for tokens of several adapters and none; the weight (and bias) parameter is a view of W_aug (no copy); slot
swaps zero the old adapter's columns; base-only batches never read the adapters' part; GANTRY_LORA_PATH picks
the path (augmented by default, each layer's mode by its shape and sharding) and quantized layers stay on SGMV."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from engine.lora.augmented import (
    AugmentedLoRALinear,
    augment_mode,
    can_augment,
    lora_path,
)
from engine.lora.layers import LoRALinear, LoRASlice
from engine.lora.punica import LoRABatch, lora_batch

RANK, MAX_LORAS, HIDDEN, INTER = 16, 3, 32, 24


def _adapter(modules: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [rank, in], B [out, rank]) with random values (PEFT's B = 0 would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g)) for m, (i, o) in modules.items()}


def _layers() -> list[tuple[LinearBase, list[LoRASlice], int, bool]]:
    """(layer, its LoRA slices, in_local, row-parallel) for a gate_up and a down projection, random weights
    (and a random bias on gate_up: mode n carries it in its own buffer)."""
    torch.manual_seed(0)
    gate_up, down = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=True), RowParallelLinear(INTER, HIDDEN)
    for layer in (gate_up, down):
        layer.weight.data.normal_()
    gate_up.bias.data.normal_()
    return [(gate_up, [LoRASlice("gate_proj", 0, INTER, 0), LoRASlice("up_proj", INTER, INTER, 0)], HIDDEN, False),
            (down, [LoRASlice("down_proj", 0, HIDDEN, 0)], INTER, True)]


SHAPES = {"gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}


def _attach(layer: LinearBase, slices: list[LoRASlice], in_local: int, row_parallel: bool, augmented: bool,
            mode: str | None = None) -> None:
    if augmented:
        layer.lora = AugmentedLoRALinear(slices, in_local, 0, row_parallel, MAX_LORAS, RANK, layer, mode)
    else:
        layer.lora = LoRALinear(slices, in_local, 0, row_parallel, MAX_LORAS, RANK, torch.float32,
                                torch.device("cpu"))


@pytest.mark.parametrize("mode", ["k", "n"])
def test_one_gemm_matches_shrink_expand(mode: str) -> None:
    adapters = [_adapter(SHAPES, 8, 1), _adapter({"up_proj": SHAPES["up_proj"]}, 4, 2), _adapter(SHAPES, 16, 3)]
    token_slots = torch.tensor([0, -1, 2, 1, 1, 0, -1, 2, 2], dtype=torch.int32)
    batch = LoRABatch(token_slots, None, None, None, None, False)
    for layer, slices, in_local, row_parallel in _layers():
        weight = layer.weight.detach().clone()
        bias = None if layer.bias is None else layer.bias.detach().clone()
        sgmv = copy.deepcopy(layer)
        _attach(layer, slices, in_local, row_parallel, True, mode)
        _attach(sgmv, slices, in_local, row_parallel, False)
        # the parameter is a view of W_aug: no second copy of the base weight, its values kept
        assert layer.weight.data_ptr() == layer.lora.w_aug.data_ptr() and torch.equal(layer.weight, weight)
        num_cols = MAX_LORAS * len(slices) * RANK
        assert layer.weight.stride() == ((in_local + num_cols, 1) if mode == "k" else (in_local, 1))
        if bias is not None and mode == "n":
            assert layer.bias.data_ptr() == layer.lora.bias_aug.data_ptr() and torch.equal(layer.bias, bias)
        for slot, adapter in enumerate(adapters):
            for lin in (layer, sgmv):
                lin.lora.set_slot(slot, {s.module: adapter[s.module] for s in slices if s.module in adapter})
        x = torch.randn(len(token_slots), in_local)
        with lora_batch(batch):
            got, want = layer(x), sgmv(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        base = F.linear(x, weight, bias)
        assert not torch.allclose(got[token_slots >= 0], base[token_slots >= 0])  # the deltas are there
        torch.testing.assert_close(got[token_slots < 0], base[token_slots < 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["k", "n"])
def test_set_slot_zeroes_previous_adapter(mode: str) -> None:
    layer, slices, in_local, row_parallel = _layers()[0]
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    _attach(layer, slices, in_local, row_parallel, True, mode)
    layer.lora.set_slot(1, _adapter({"gate_proj": SHAPES["gate_proj"]}, 16, 4))
    layer.lora.set_slot(1, _adapter({"up_proj": SHAPES["up_proj"]}, 8, 5))  # evicts the gate-only adapter
    cols = slice(2 * RANK, 3 * RANK)  # slot 1's gate columns of t
    assert not layer.lora.b_all[:, cols].any() and not layer.lora.a_all[cols].any()
    x = torch.randn(4, in_local)
    with lora_batch(LoRABatch(torch.full((4,), 1, dtype=torch.int32), None, None, None, None, False)):
        y = layer(x)
    base = F.linear(x, weight, bias)
    torch.testing.assert_close(y[:, :INTER], base[:, :INTER], rtol=1e-5, atol=1e-5)  # no trace of the old gate B
    assert not torch.allclose(y[:, INTER:], base[:, INTER:])


@pytest.mark.parametrize("mode", ["k", "n"])
def test_base_only_batch_never_reads_the_tail(mode: str) -> None:
    for layer, slices, in_local, row_parallel in _layers():
        weight = layer.weight.detach().clone()
        bias = None if layer.bias is None else layer.bias.detach().clone()
        _attach(layer, slices, in_local, row_parallel, True, mode)
        layer.lora.a_all.fill_(float("nan"))  # any read of the adapters' part would show
        layer.lora.b_all.fill_(float("nan"))
        if layer.lora.bias_aug is not None:
            layer.lora.bias_aug[layer.lora.out_local :] = float("nan")
        x = torch.randn(5, in_local)
        with lora_batch(None):
            y = layer(x)
        assert torch.equal(y, F.linear(x, weight, bias))


def test_augment_mode_by_shape_and_sharding() -> None:
    assert augment_mode("augmented", 4608, 3584, False, 1) == "n"  # qkv
    assert augment_mode("augmented", 3584, 18944, True, 1) == "n"  # down, unsharded
    assert augment_mode("augmented", 1792, 9472, True, 2) == "k"  # down under tp 2: t would be a partial sum
    assert augment_mode("augmented", 37888, 3584, False, 1) == "k"  # gate_up: y is ten times x
    assert augment_mode("augmented-k", 4608, 3584, False, 1) == "k"


def test_lora_path_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GANTRY_LORA_PATH", raising=False)
    assert lora_path() == "augmented"
    for path in ("augmented", "augmented-k", "sgmv"):
        monkeypatch.setenv("GANTRY_LORA_PATH", path)
        assert lora_path() == path
    monkeypatch.setenv("GANTRY_LORA_PATH", "fused")
    with pytest.raises(ValueError, match="GANTRY_LORA_PATH.*'fused'"):
        lora_path()


def test_only_plain_weights_augment() -> None:
    layer = _layers()[0][0]
    assert can_augment(layer, torch.float32)
    assert not can_augment(layer, torch.bfloat16)  # not the model's dtype
    layer.quant_method = object()  # a quantized layer's `weight` is not what its GEMM reads
    assert not can_augment(layer, torch.float32)


# qkv, o, gate_up, down of the tiny Qwen2 below: every plain layer takes the path GANTRY_LORA_PATH names, in
# these modes (gate_up's output is three times its input)
ATTACHED = {"augmented": ["n", "n", "k", "n"], "augmented-k": ["k"] * 4, "sgmv": [None] * 4}


@pytest.mark.parametrize("path", ["augmented", "augmented-k", "sgmv"])
def test_attach_picks_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path, path: str) -> None:
    from transformers import Qwen2Config

    from engine.lora.adapter import ModelDims
    from engine.lora.manager import attach_lora
    from engine.models.registry import get_model_class

    monkeypatch.setenv("GANTRY_LORA_PATH", path)
    hf = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, architectures=["Qwen2ForCausalLM"])
    previous = torch.get_default_dtype()
    try:  # float32 on the CPU, whatever a GPU host's defaults are: the dtype is passed to attach_lora below
        torch.set_default_dtype(torch.float32)
        with torch.device("cpu"):
            model = get_model_class(hf.architectures, str(tmp_path))(hf)
    finally:
        torch.set_default_dtype(previous)
    dtype = model.model.layers["0"].self_attn.qkv_proj.weight.dtype
    attached = attach_lora(model, ModelDims.from_hf(hf), 2, 16, dtype, torch.device("cpu"))
    for loras in attached.values():  # qkv, o, gate_up, down
        assert [getattr(lora, "mode", None) for lora in loras] == ATTACHED[path]
        assert [type(lora) for lora in loras] == [AugmentedLoRALinear if a else LoRALinear for a in ATTACHED[path]]
