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


def test_layers_beyond_num_hidden_layers_refused(tiny_llama: str, tmp_path) -> None:
    """config.json says 2 layers, the weights hold 3: the third was skipped and the model ran without it."""
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), num_hidden_layers=2)
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.2\..*' is beyond the model's layers: config num_hidden_layers is 2") as e:
        LLM(path, max_model_len=64)
    assert path in str(e.value)


def _shard(path: str, index: Callable[[dict, list[str]], object] | None = None, duplicate: bool = False) -> str:
    """The checkpoint split in two files with a model.safetensors.index.json (index edits its dict)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    files = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, part in files.items():
        extra = names[-1:] if duplicate and file == "a.safetensors" else []
        save_file({n: tensors[n] for n in part + extra}, os.path.join(path, file), metadata={"format": "pt"})
    weight_map = {n: file for file, part in files.items() for n in part}
    data = {"metadata": {}, "weight_map": weight_map}
    if index is not None:
        data = index(data, names)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(data, f)
    return path


@pytest.mark.parametrize("index,words", [
    (lambda d, names: [1, 2], "corrupt index"),
    (lambda d, names: {"weight_map": ["a.safetensors"]}, "weight_map must map tensor names to files, got list"),
    (lambda d, names: {"weight_map": {**d["weight_map"], names[0]: 3}}, "= 3 is not a file name"),
    (lambda d, names: {"weight_map": {**d["weight_map"], names[0]: "../x/model.safetensors"}}, "is not a file name"),
])
def test_malformed_shard_index_refused(tiny_llama: str, tmp_path, index, words: str) -> None:
    path = _shard(_copy(tiny_llama, tmp_path / "m"), index)
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64)
    assert "model.safetensors.index.json" in str(e.value) and words in str(e.value), str(e.value)


def test_tensor_in_two_shards_refused(tiny_llama: str, tmp_path) -> None:
    """The second copy overwrote the first, whichever was right."""
    path = _shard(_copy(tiny_llama, tmp_path / "m"), duplicate=True)
    with pytest.raises(ModelLoadError, match=r"b\.safetensors: tensor '.*' is also in .*a\.safetensors"):
        LLM(path, max_model_len=64)


def test_sharded_checkpoint_loads(tiny_llama: str, tmp_path) -> None:
    path = _shard(_copy(tiny_llama, tmp_path / "m"))
    assert LLM(path, max_model_len=64).llm_engine is not None


def test_sharded_error_names_the_shard(tiny_llama: str, tmp_path) -> None:
    """A wrong-shaped tensor in the second shard: the error names that file, not the model directory."""
    from safetensors.torch import load_file, save_file

    path = _shard(_copy(tiny_llama, tmp_path / "m"))
    file = os.path.join(path, "b.safetensors")
    tensors = load_file(file)
    name = next(n for n in sorted(tensors) if n.endswith("q_proj.weight"))
    tensors[name] = tensors[name][:1]  # [1, hidden]: would broadcast
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64)
    assert e.value.path == file and name in str(e.value), str(e.value)


def _without(path: str, key: str) -> str:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.pop(key)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size"])
def test_missing_size_in_config_refused(tiny_llama: str, tmp_path, key: str) -> None:
    """transformers' LlamaConfig defaults (hidden_size 4096, ...) built a model the weights failed to fit,
    naming a tensor, not the missing field."""
    path = _without(_copy(tiny_llama, tmp_path / "m"), key)
    with pytest.raises(ConfigError) as e:
        LLM(path, max_model_len=64)
    assert e.value.param == f"config.json.{key}" and os.path.join(path, "config.json") in str(e.value)


@pytest.mark.parametrize("fields,param", [
    (dict(hidden_act="gelu"), "config.json.hidden_act"),  # ran SiluAndMul anyway
    (dict(rms_norm_eps=-1.0), "config.json.rms_norm_eps"),
    (dict(rope_parameters={"rope_theta": "x", "rope_type": "default"}), "config.json.rope_parameters"),  # a TypeError
    (dict(rope_parameters={"rope_theta": -5.0, "rope_type": "default"}), "config.json.rope_parameters"),
])
def test_config_field_the_model_would_misread_refused(tiny_llama: str, tmp_path, fields: dict, param: str) -> None:
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), **fields)
    with pytest.raises(ConfigError) as e:
        LLM(path, max_model_len=64)
    assert e.value.param == param, str(e.value)


def test_hf_override_supplies_a_missing_field(tiny_llama: str, tmp_path) -> None:
    path = _without(_copy(tiny_llama, tmp_path / "m"), "intermediate_size")
    assert LLM(path, max_model_len=64, hf_overrides={"intermediate_size": 128}).llm_engine is not None


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    from tests.engine.test_quant_gguf import write_tiny_gguf

    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


def _patch_tensor_info(src: str, dst, tensor: str, field: str, value) -> str:
    """A copy of the GGUF with one field of `tensor`'s table entry rewritten (type, or dims fastest first)."""
    import struct

    data = bytearray(open(src, "rb").read())
    at = data.find(tensor.encode() + b"\x02\x00\x00\x00") + len(tensor)  # name, then n_dims (2) u32
    if field == "type":
        struct.pack_into("<I", data, at + 4 + 16, value)
    else:
        struct.pack_into("<2Q", data, at + 4, *value)
    with open(dst, "wb") as f:
        f.write(data)
    return str(dst)


@pytest.mark.parametrize("quantization", ["auto", "none"])
def test_gguf_tensor_running_into_the_next_refused(tiny_gguf: str, tmp_path, quantization: str) -> None:
    """A Q4_1 tensor relabelled F32 read its neighbours' bytes as its weights and generated garbage."""
    path = _patch_tensor_info(tiny_gguf, tmp_path / "m.gguf", "blk.0.attn_q.weight", "type", 0)
    with pytest.raises(ModelLoadError, match="tensor blk.0.attn_q.weight runs .* bytes into tensor blk.0.attn_k.weight's data") as e:
        LLM(path, max_model_len=64, quantization=quantization)
    assert path in str(e.value)


@pytest.mark.parametrize("quantization", ["auto", "none"])
def test_gguf_tensor_of_wrong_shape_refused(tiny_gguf: str, tmp_path, quantization: str) -> None:
    """attn_q [1, 64] for [64, 64] escaped as a RuntimeError from the q/k row un-permute."""
    path = _patch_tensor_info(tiny_gguf, tmp_path / "m.gguf", "blk.0.attn_q.weight", "dims", (64, 1))
    with pytest.raises(ModelLoadError, match=r"tensor blk.0.attn_q.weight \(model.layers.0.self_attn.q_proj.weight\) "
                                             r"of shape \(1, 64\): expected \(64, 64\)") as e:
        LLM(path, max_model_len=64, quantization=quantization)
    assert path in str(e.value)


def test_gguf_vocab_larger_than_the_quantized_embedding_refused(tiny_gguf: str, tmp_path) -> None:
    """vocab_size 10 rows past token_embd's (kept in Q8_0 blocks) loaded and generated from rows of nothing."""
    path = str(tmp_path / "m.gguf")
    shutil.copy(tiny_gguf, path)
    with pytest.raises(ModelLoadError, match=r"tensor token_embd.weight \(model.embed_tokens.weight\) of shape \(49152, 64\): "
                                             r"expected \(49162, 64\)"):
        LLM(path, max_model_len=64, hf_overrides={"vocab_size": 49162})


@pytest.mark.parametrize("text,words", [
    ("null", "must hold a JSON object, got NoneType"),  # a TypeError escaped
    ('"x"', "must hold a JSON object, got str"),
])
def test_config_json_not_an_object_refused(tiny_llama: str, tmp_path, text: str, words: str) -> None:
    path = _copy(tiny_llama, tmp_path / "m")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(text)
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64)
    assert f"{os.path.join(path, 'config.json')}: {words}" in str(e.value), str(e.value)


@pytest.mark.parametrize("fields,words", [
    (dict(quantization_config="fp8"), "quantization_config must be a JSON object, got 'fp8'"),  # an AttributeError
    (dict(quantization_config=[1]), "quantization_config must be a JSON object, got [1]"),
    (dict(architectures="LlamaForCausalLM"), "architectures must be a list of class names, got 'LlamaForCausalLM'"),
])
def test_config_field_of_the_wrong_json_type_refused(tiny_llama: str, tmp_path, fields: dict, words: str) -> None:
    """architectures "LlamaForCausalLM" was read a letter at a time: 'LlamaForCausalLM not supported'."""
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), **fields)
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64)
    assert f"{os.path.join(path, 'config.json')}: {words}" in str(e.value), str(e.value)


@pytest.mark.parametrize("make,words", [
    (lambda t: t[:1].clone(), "expected shape (64, 64)"),
    (lambda t: torch.cat([t, t]), "expected shape (64, 64)"),
    (lambda t: torch.ones_like(t, dtype=torch.int32), "expected floating-point weights, got I32"),
])
def test_wrong_weight_refused_when_quantized_at_load(biased: str, tmp_path, monkeypatch, make, words: str) -> None:
    """quantization='fp8' on float weights: the layer's weight belongs to the FP8 method, and a broadcast,
    cut or integer q_proj loaded silently."""
    monkeypatch.setenv("GANTRY_FP8_EMULATE", "1")
    path = _edit_tensors(_copy(biased, tmp_path / "m"), _set(f"{Q}.weight", make))
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64, quantization="fp8")
    assert repr(f"{Q}.weight") in str(e.value) and words in str(e.value), str(e.value)
