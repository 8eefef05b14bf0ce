"""Broken or odd checkpoints fail before serving with a typed error naming the file and the tensor or
field, never loading silently into garbage: a tensor of the wrong shape (torch's copy_ broadcasts a
[1, N] over [M, N] and a bias [1] over [N]; a slice clamps and narrow cuts a longer tensor), an integer
tensor, layers beyond num_hidden_layers, a tensor in two shards, a malformed shard index, config.json
missing a size or holding a field the model would ignore or mis-read. Found by fuzzing LLM(path)."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import pytest
import torch

from engine import LLM
from engine.config import ConfigError
from engine.errors import ModelLoadError
from tests.conftest import edit_config, write_tiny_checkpoint

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> str:
    """A tiny Llama with q/k/v/o biases (Qwen2's layout for q/k/v)."""
    path = str(tmp_path_factory.mktemp("biased"))
    return write_tiny_checkpoint(path, "LlamaForCausalLM", tie=False, attention_bias=True)


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(path: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def _set(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(name, make(tensors[name]))


@pytest.mark.parametrize("name,make,words", [
    (f"{Q}.weight", lambda t: t[:1].clone(), "expected shape (64, 64)"),  # [1, N] broadcast over [M, N]
    (f"{Q}.bias", lambda t: torch.zeros(1), "expected shape (64,)"),
    ("model.layers.0.self_attn.k_proj.bias", lambda t: torch.zeros(1), "expected shape (32,)"),
    ("model.layers.0.self_attn.o_proj.bias", lambda t: torch.zeros(1), "expected shape (64,)"),
    (f"{Q}.weight", lambda t: torch.cat([t, t]), "expected shape (64, 64)"),  # narrow kept the first rows
    ("model.layers.0.mlp.gate_proj.weight", lambda t: torch.cat([t, t]), "expected shape (128, 64)"),
    ("model.layers.0.mlp.down_proj.weight", lambda t: torch.cat([t, t], 1), "expected shape (64, 128)"),
    ("model.layers.0.self_attn.o_proj.weight", lambda t: t[:, :1].clone(), "expected shape (64, 64)"),
    (f"{Q}.weight", lambda t: t[0].clone(), "expected shape (64, 64)"),
    ("model.embed_tokens.weight", lambda t: t[:1].clone(), "expected shape (512, 64)"),
    ("model.embed_tokens.weight", lambda t: torch.cat([t, t]), "expected shape (512, 64)"),
    ("lm_head.weight", lambda t: t[:, :1].clone(), "expected shape (512, 64)"),
    ("model.norm.weight", lambda t: torch.ones(1), "expected shape (64,)"),
    ("model.layers.0.input_layernorm.weight", lambda t: torch.ones(1), "expected shape (64,)"),
    (f"{Q}.weight", lambda t: torch.ones_like(t, dtype=torch.int32), "expected floating-point weights, got I32"),
    ("model.layers.0.mlp.up_proj.weight", lambda t: torch.ones_like(t, dtype=torch.bool), "got BOOL"),
    ("model.norm.weight", lambda t: torch.ones_like(t, dtype=torch.int64), "got I64"),
    ("model.embed_tokens.weight", lambda t: torch.ones_like(t, dtype=torch.int8), "got I8"),
])
def test_tensor_of_wrong_shape_or_dtype_refused(biased: str, tmp_path, name: str, make, words: str) -> None:
    path = _edit_tensors(_copy(biased, tmp_path / "m"), _set(name, make))
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64)
    assert path in str(e.value) and repr(name) in str(e.value) and words in str(e.value), str(e.value)


def test_config_vocab_smaller_than_the_embedding_refused(tiny_llama: str, tmp_path) -> None:
    """The embedding's first 256 rows loaded (and lm_head's) and the rest dropped."""
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), vocab_size=256)
    with pytest.raises(ModelLoadError, match=r"of shape \(512, 64\).*expected shape \(256, 64\)"):
        LLM(path, max_model_len=64)
