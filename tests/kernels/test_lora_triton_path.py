"""The engine's CUDA LoRA path (on CPU under Triton's interpreter when there is no GPU): LoRAManager with Triton kernels (decode's
static buffers padded as CUDA graphs pad a batch, the step's shared shrink buffer, prefill segments, two decode
steps in a row) on every path (GANTRY_LORA_PATH augmented: modes n and k by layer; augmented-k; sgmv), every projection against the torch
reference path."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.lora import LoRARequest
from engine.lora.manager import LoRAManager
from engine.lora.punica import lora_batch

# (rank, modules): every projection; attention only; MLP only
ADAPTERS = [(8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
            (16, ("q_proj", "v_proj")), (4, ("gate_proj", "up_proj", "down_proj"))]
MAX_NUM_SEQS = 8


def _write_adapter(path: str, dims, rank: int, modules: tuple[str, ...], seed: int) -> str:
    from benchmarks.lora_bench import write_random_adapter

    return write_random_adapter(path, dims, rank, modules, torch.Generator().manual_seed(seed), 0.3)


def _projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for idx, layer in model.model.layers.items():
        for name in ("qkv_proj", "o_proj"):
            out.append((f"{idx}.{name}", getattr(layer.self_attn, name)))
        for name in ("gate_up_proj", "down_proj"):
            out.append((f"{idx}.{name}", getattr(layer.mlp, name)))
    return out


@pytest.mark.parametrize("path", ["augmented", "augmented-k", "sgmv"])
def test_triton_path_matches_reference(monkeypatch: pytest.MonkeyPatch, tmp_path, device: torch.device,
                                       path: str) -> None:
    from transformers import Qwen2Config

    from engine.lora.adapter import ModelDims
    from engine.models.registry import get_model_class

    hf = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
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
    reference_model = copy.deepcopy(model)  # the CPU engine's torch path, on the CPU
    for _, lin in _projections(model):  # to the GPU when there is one (Triton on CUDA cannot read host tensors);
        lin.to(device)  # the projections only: the model's rotary cache is shared with other tests' models
    dims = ModelDims.from_hf(hf)
    loras = [LoRARequest(f"a{i}", i + 1, _write_adapter(str(tmp_path / f"a{i}"), dims, rank, modules, i))
             for i, (rank, modules) in enumerate(ADAPTERS)]
    monkeypatch.setenv("GANTRY_LORA_PATH", path)
    triton_mgr = LoRAManager(model, hf, 3, 3, 16, MAX_NUM_SEQS, torch.float32, device, use_triton=True)
    monkeypatch.setenv("GANTRY_LORA_PATH", "sgmv")
    cpu = torch.device("cpu")
    reference_mgr = LoRAManager(reference_model, hf, 3, 3, 16, MAX_NUM_SEQS, torch.float32, cpu)
    want = [path != "sgmv"] * 4  # qkv, o, gate_up, down: every plain layer on the path named
    assert all([lin.augmented for lin in lins] == want for lins in triton_mgr.layers.values())
    decode = [loras[1], None, loras[0], loras[2], loras[1]]  # 5 of 8 rows: CUDA graphs pad the rest
    prefill = [loras[2], loras[0], None]
    # a second decode step of fewer requests: stale slots past them, or an un-zeroed shrink buffer, would show
    steps = ((decode, [1] * 5, True), (prefill, [7, 40, 5], False), ([loras[0], loras[2], None], [1] * 3, True))
    for requests, num_tokens, is_decode in steps:
        n = sum(num_tokens)
        rows = MAX_NUM_SEQS if is_decode else n
        batch = triton_mgr.prepare(requests, num_tokens, is_decode)
        ref_batch = reference_mgr.prepare(requests, num_tokens, is_decode)
        assert batch.use_triton and (batch.shrink_out is not None) == (is_decode and path == "sgmv")
        for (name, lin), (_, ref_lin) in zip(_projections(model), _projections(reference_model)):
            x = torch.randn(rows, lin.weight.shape[1], device=device)
            with lora_batch(batch):
                y = lin(x)
            y, x = y.cpu(), x.cpu()
            with lora_batch(ref_batch):
                want = ref_lin(x[:n])
            torch.testing.assert_close(y[:n], want, rtol=1e-4, atol=1e-4, msg=name)
            if rows > n:  # padded rows: the base layer alone
                torch.testing.assert_close(y[n:], ref_lin(x[n:]), rtol=1e-4, atol=1e-4)
