"""Augmented-K and stacked-A LoRA (engine/lora/augmented.py, stacked.py) on CPU: one GEMM over [x, masked
x @ A^T] and [W, B] (augmented), or [y, t] = x @ [W; A]^T then y += masked t @ B^T (stacked), equals the SGMV
path's base GEMM + shrink + expand for tokens of several adapters and none; the weight parameter (and a
column-parallel bias) is a view of the wider buffer (no copy); slot swaps zero the old adapter; base-only
batches never read the extra columns or rows; GANTRY_LORA_PATH picks the path per layer (auto by default)
and quantized layers stay on SGMV."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine.lora.augmented import AugmentedLoRALinear
from engine.lora.layers import LoRALinear, LoRASlice
from engine.lora.paths import LORA_PATHS, lora_path, plain_weight
from engine.lora.punica import LoRABatch, lora_batch
from engine.lora.stacked import StackedLoRALinear

RANK, MAX_LORAS, HIDDEN, INTER = 16, 3, 32, 24


def _adapter(modules: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [rank, in], B [out, rank]) with random values (PEFT's B = 0 would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g)) for m, (i, o) in modules.items()}


def _layers() -> list[tuple[LinearBase, list[LoRASlice], int, bool]]:
    """(layer, its LoRA slices, in_local, row-parallel) for a gate_up and a down projection, random weights."""
    torch.manual_seed(0)
    gate_up, down = MergedColumnParallelLinear(HIDDEN, [INTER, INTER]), RowParallelLinear(INTER, HIDDEN)
    qkv = QKVParallelLinear(HIDDEN, 8, 2, 1, bias=True)  # q 16, k 8, v 8: a column-parallel layer with a bias
    for layer in (gate_up, down, qkv):
        layer.weight.data.normal_()
    qkv.bias.data.normal_()
    return [(gate_up, [LoRASlice("gate_proj", 0, INTER, 0), LoRASlice("up_proj", INTER, INTER, 0)], HIDDEN, False),
            (down, [LoRASlice("down_proj", 0, HIDDEN, 0)], INTER, True),
            (qkv, [LoRASlice("q_proj", 0, 16, 0), LoRASlice("k_proj", 16, 8, 0), LoRASlice("v_proj", 24, 8, 0)],
             HIDDEN, False)]


SHAPES = {"gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN),
          "q_proj": (HIDDEN, 16), "k_proj": (HIDDEN, 8), "v_proj": (HIDDEN, 8)}
FUSED = {"augmented": AugmentedLoRALinear, "stacked": StackedLoRALinear}


def _attach(layer: LinearBase, slices: list[LoRASlice], in_local: int, row_parallel: bool, kind: str) -> None:
    if kind in FUSED:
        layer.lora = FUSED[kind](slices, in_local, 0, row_parallel, MAX_LORAS, RANK, layer)
    else:
        layer.lora = LoRALinear(slices, in_local, 0, row_parallel, MAX_LORAS, RANK, torch.float32,
                                torch.device("cpu"))


def _wide(layer: LinearBase) -> torch.Tensor:
    """The buffer the fused path keeps the weight in (W_aug or W_stack)."""
    return layer.lora.w_aug if isinstance(layer.lora, AugmentedLoRALinear) else layer.lora.w_stack


@pytest.mark.parametrize("kind", list(FUSED))
def test_one_gemm_matches_shrink_expand(kind: str) -> None:
    adapters = [_adapter(SHAPES, 8, 1), _adapter({"up_proj": SHAPES["up_proj"]}, 4, 2), _adapter(SHAPES, 16, 3)]
    token_slots = torch.tensor([0, -1, 2, 1, 1, 0, -1, 2, 2], dtype=torch.int32)
    batch = LoRABatch(token_slots, None, None, None, None, False)
    for layer, slices, in_local, row_parallel in _layers():
        weight = layer.weight.detach().clone()
        sgmv = copy.deepcopy(layer)
        _attach(layer, slices, in_local, row_parallel, kind)
        _attach(sgmv, slices, in_local, row_parallel, "sgmv")
        # the parameter is a view of the wider buffer: no second copy of the base weight, its values kept
        assert layer.weight.data_ptr() == _wide(layer).data_ptr() and torch.equal(layer.weight, weight)
        extra = MAX_LORAS * len(slices) * RANK
        assert layer.weight.stride() == ((in_local + extra, 1) if kind == "augmented" else (in_local, 1))
        if layer.bias is not None and kind == "stacked":
            assert layer.bias.data_ptr() == layer.lora.bias_stack.data_ptr()
        for slot, adapter in enumerate(adapters):
            for lin in (layer, sgmv):
                lin.lora.set_slot(slot, {s.module: adapter[s.module] for s in slices if s.module in adapter})
        x = torch.randn(len(token_slots), in_local)
        with lora_batch(batch):
            got, want = layer(x), sgmv(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        base = F.linear(x, weight, layer.bias)
        assert not torch.allclose(got[token_slots >= 0], base[token_slots >= 0])  # the deltas are there
        torch.testing.assert_close(got[token_slots < 0], base[token_slots < 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(FUSED))
def test_set_slot_zeroes_previous_adapter(kind: str) -> None:
    layer, slices, in_local, row_parallel = _layers()[0]
    weight = layer.weight.detach().clone()
    _attach(layer, slices, in_local, row_parallel, kind)
    layer.lora.set_slot(1, _adapter({"gate_proj": SHAPES["gate_proj"]}, 16, 4))
    layer.lora.set_slot(1, _adapter({"up_proj": SHAPES["up_proj"]}, 8, 5))  # evicts the gate-only adapter
    gate = slice(2 * RANK, 3 * RANK)  # slot 1's gate columns of t
    if kind == "augmented":
        assert not layer.lora.w_aug[:, in_local + gate.start : in_local + gate.stop].any()
        assert not layer.lora.a_all[gate].any()
    else:
        out = layer.lora.out_local
        assert not layer.lora.w_stack[out + gate.start : out + gate.stop].any() and not layer.lora.b_all[:, gate].any()
    x = torch.randn(4, in_local)
    with lora_batch(LoRABatch(torch.full((4,), 1, dtype=torch.int32), None, None, None, None, False)):
        y = layer(x)
    base = F.linear(x, weight)
    torch.testing.assert_close(y[:, :INTER], base[:, :INTER], rtol=1e-5, atol=1e-5)  # no trace of the old gate B
    assert not torch.allclose(y[:, INTER:], base[:, INTER:])


@pytest.mark.parametrize("kind", list(FUSED))
def test_base_only_batch_never_reads_the_extra(kind: str) -> None:
    for layer, slices, in_local, row_parallel in _layers():
        weight = layer.weight.detach().clone()
        _attach(layer, slices, in_local, row_parallel, kind)
        if kind == "augmented":
            layer.lora.w_aug[:, in_local:] = float("nan")  # any read of the tail would show
        else:
            layer.lora.w_stack[layer.lora.out_local :] = float("nan")  # or of the A rows
        x = torch.randn(5, in_local)
        with lora_batch(None):
            y = layer(x)
        assert torch.equal(y, F.linear(x, weight, layer.bias))


def test_lora_path_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GANTRY_LORA_PATH", raising=False)
    assert lora_path() == "auto"
    for path in LORA_PATHS:
        monkeypatch.setenv("GANTRY_LORA_PATH", path)
        assert lora_path() == path
    monkeypatch.setenv("GANTRY_LORA_PATH", "fused")
    with pytest.raises(ValueError, match="GANTRY_LORA_PATH.*'fused'"):
        lora_path()


def test_only_plain_weights_fuse() -> None:
    layer = _layers()[0][0]
    assert plain_weight(layer, torch.float32)
    assert not plain_weight(layer, torch.bfloat16)  # not the model's dtype
    layer.quant_method = object()  # a quantized layer's `weight` is not what its GEMM reads
    assert not plain_weight(layer, torch.float32)


# qkv, o, gate_up, down of the tiny Qwen2 below (hidden 32, intermediate 48): the path GANTRY_LORA_PATH names,
# auto: gate_up (out 96 > 2 x 32) augmented, the rest stacked
ATTACHED = {"auto": [StackedLoRALinear, StackedLoRALinear, AugmentedLoRALinear, StackedLoRALinear],
            "stacked": [StackedLoRALinear] * 4, "augmented": [AugmentedLoRALinear] * 4, "sgmv": [LoRALinear] * 4}


@pytest.mark.parametrize("path", LORA_PATHS)
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
        assert [type(lora) for lora in loras] == ATTACHED[path]
