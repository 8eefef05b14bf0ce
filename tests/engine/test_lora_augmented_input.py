"""Augmented K without the copy of x (CPU): the op before a projection (RMSNorm, SiLU-and-mul) writes x straight
into the x columns of the projection's [x, t] (LinearBase.augmented_input), the shrink writes t into its tail and
a mask zeroes the other slots' columns in place. Same [x, t] and outputs as the copying path (AugmentedLoRALinear
.augment), for a layer alone and for whole decoder layers; no buffer at all without adapters or on SGMV."""
from __future__ import annotations

import pytest
import torch

from engine.layers.activation import SiluAndMul
from engine.layers.linear import LinearBase
from engine.layers.norm import RMSNorm
from engine.lora.augmented import AugmentedLoRALinear
from engine.lora.punica import LoRABatch, lora_batch
from tests.engine.test_lora_augmented import MAX_LORAS, RANK, SHAPES, _adapter, _attach, _layers

TOKEN_SLOTS = torch.tensor([0, -1, 2, 1, 1, 0, -1, 2, 2], dtype=torch.int32)
BATCH = LoRABatch(TOKEN_SLOTS, None, None, None, None, False)


def _fill_slots(layer: LinearBase, slices: list) -> None:
    for slot, (rank, seed) in enumerate([(8, 1), (4, 2), (16, 3)]):
        adapter = _adapter(SHAPES, rank, seed)
        layer.lora.set_slot(slot, {s.module: adapter[s.module] for s in slices})


def test_written_input_matches_copy() -> None:
    """x written into augmented_input(): the same [x, t] as augment() builds (t in place: the mm wrote into the
    buffer's tail, not a copy of it), the same output, and augment() never runs."""
    n = len(TOKEN_SLOTS)
    for layer, slices, in_local, row_parallel in _layers():
        _attach(layer, slices, in_local, row_parallel, True)
        _fill_slots(layer, slices)
        width = in_local + MAX_LORAS * len(slices) * RANK
        x = torch.randn(n, in_local)
        with lora_batch(BATCH):
            want_aug = layer.lora.augment(BATCH, x)
            want = layer(x)  # the copying path
            view = layer.augmented_input(n)
            assert view.shape == (n, in_local) and view.stride() == (width, 1)
            buf = view.lora_augmented_buffer
            assert buf.shape == (n, width) and buf.data_ptr() == view.data_ptr()
            view.copy_(x)  # what the producing op does through out=
            copies = []
            layer.lora.augment = lambda *args: copies.append(args)  # any copy would show here
            got = layer(view)
        assert not copies
        torch.testing.assert_close(buf, want_aug, rtol=1e-6, atol=1e-6)  # t lives in the buffer's tail
        assert not buf[TOKEN_SLOTS < 0, in_local:].any()  # tokens without an adapter: zeros
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_no_buffer_without_adapters_or_augmented_k() -> None:
    layer, slices, in_local, row_parallel = _layers()[0]
    assert layer.augmented_input(4) is None  # LoRA not enabled
    _attach(layer, slices, in_local, row_parallel, False)
    with lora_batch(BATCH):
        assert layer.augmented_input(4) is None  # SGMV adds its deltas after the base GEMM
    _attach(layer, slices, in_local, row_parallel, True)
    with lora_batch(None):
        assert layer.augmented_input(4) is None  # a base-only step: no allocation
    x = torch.randn(4, in_local)
    x.lora_augmented_buffer = torch.zeros(4, 3)  # a tag not of this layer's width: the copying path
    with lora_batch(BATCH):
        torch.testing.assert_close(layer(x), layer(x.clone()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the C kernels; the torch reference
def test_ops_write_into_out(dtype: torch.dtype) -> None:
    """RMSNorm (alone and with the residual add) and SiLU-and-mul with out: a strided view, returned as is
    (the linear recognises that very tensor), the same values as without, the columns past it untouched."""
    n, hidden, extra = 5, 64, 24
    x, residual = torch.randn(n, hidden).to(dtype), torch.randn(n, hidden).to(dtype)
    norm = RMSNorm(hidden).to(dtype)
    norm.weight.data.normal_()
    buf = torch.full((n, hidden + extra), 7.0, dtype=dtype)
    out = buf[:, :hidden]
    assert norm(x, out=out) is out and torch.equal(out, norm(x))
    got, got_res = norm(x, residual, out=out)
    want, want_res = norm(x, residual)
    assert got is out and torch.equal(out, want) and torch.equal(got_res, want_res)
    gate_up = torch.randn(n, 2 * hidden).to(dtype)
    assert SiluAndMul()(gate_up, out=out) is out and torch.equal(out, SiluAndMul()(gate_up))
    assert (buf[:, hidden:] == 7.0).all()


def test_decoder_layers_write_into_augmented_k(tmp_path) -> None:
    """A tiny Qwen2's decoder layers with adapters on every projection: the norms and SiLU-and-mul write into
    qkv's, gate_up's and down's [x, t] (only o_proj's input is copied), outputs as the copying path's."""
    from torch import nn
    from transformers import Qwen2Config

    from engine.lora.adapter import ModelDims
    from engine.lora.manager import attach_lora
    from engine.models.registry import get_model_class

    class NoAttention(nn.Module):  # the layer's attention without a forward context: o = q
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return q

    hf = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, architectures=["Qwen2ForCausalLM"])
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        with torch.device("cpu"):
            model = get_model_class(hf.architectures, str(tmp_path))(hf)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        p.data.normal_(std=0.2)
    attached = attach_lora(model, ModelDims.from_hf(hf), MAX_LORAS, RANK, torch.float32, torch.device("cpu"))
    for loras in attached.values():
        for lora in loras:
            assert isinstance(lora, AugmentedLoRALinear)
            lora.a_all.normal_(std=0.2)
            lora.w_aug[:, lora.in_local :].normal_(std=0.2)
    layers = list(model.model.layers.values())
    for layer in layers:
        layer.self_attn.attn = NoAttention()
    n = len(TOKEN_SLOTS)
    positions, hidden = torch.arange(n), torch.randn(n, 32)
    calls: list[str] = []

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        calls.clear()
        h, residual = hidden, None
        with torch.inference_mode(), lora_batch(BATCH):  # as the model runner (views there keep no _base)
            for layer in layers:
                h, residual = layer(positions, h, residual)
        return h, residual

    for lora in (lora for loras in attached.values() for lora in loras):
        for name in ("augment", "complete"):
            method = getattr(lora, name)
            setattr(lora, name, lambda *args, _m=method, _n=name: calls.append(_n) or _m(*args))
    got = run()
    assert calls == ["complete", "augment", "complete", "complete"] * len(layers)  # qkv, o, gate_up, down
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LinearBase, "augmented_input", lambda self, num_tokens: None)
        want = run()
    assert calls == ["augment"] * 4 * len(layers)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
