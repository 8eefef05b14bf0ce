"""Checkpoints broken in ways tests/engine/test_load_fuzz.py does not cover fail with a typed error naming the
file and the field or tensor, never a traceback, garbage text or an allocation of terabytes: rope scaling
values the rotary embedding divides by, tensor names of no layer or of a packed layer, shards the OS cannot
open, config sizes far beyond the weights, tokenizer JSON files of null, quantization_config sections of the
wrong JSON type, and GGUF files with nested arrays, overlong strings, zero or repeated tensors, absurd sizes
or a tokenizer the tokenizers library refuses. Found by fuzzing LLM(path) and `python -m engine.serve`."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from engine import LLM
from engine.config import ConfigError
from engine.errors import ModelLoadError
from engine.gguf_file import open_gguf
from tests.conftest import REPO, edit_config, pythonpath_with_repo

LINEAR = {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}
LLAMA3 = {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _add_tensor(path: str, name: str, tensor: torch.Tensor) -> str:
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors[name] = tensor
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("rope,param", [
    ({**LINEAR, "factor": 0}, "factor"),  # inv_freq / 0: generated token 0 forever
    ({**LINEAR, "factor": float("nan")}, "factor"),
    ({**LINEAR, "factor": -2.0}, "factor"),
    ({**LINEAR, "factor": "x"}, "factor"),  # a TypeError from the rotary embedding
    ({**LINEAR, "factor": None}, "factor"),
    ({**LLAMA3, "factor": 0.0}, "factor"),
    ({**LLAMA3, "low_freq_factor": 0}, "low_freq_factor"),  # a ZeroDivisionError
    ({**LLAMA3, "low_freq_factor": 5.0}, "low_freq_factor"),  # above high_freq_factor: the band is reversed
    ({**LLAMA3, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
])
def test_rope_scaling_value_refused(tiny_llama: str, tmp_path, rope: dict, param: str) -> None:
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), rope_parameters=rope)
    with pytest.raises(ConfigError) as e:
        LLM(path, max_model_len=64)
    assert e.value.param == f"config.json.rope_parameters.{param}", str(e.value)


@pytest.mark.parametrize("rope", [LLAMA3, {**LLAMA3, "low_freq_factor": 4.0}])  # equal factors: transformers warns
def test_rope_scaling_that_is_valid_still_loads(tiny_llama: str, tmp_path, rope: dict) -> None:
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), rope_parameters=rope)
    assert LLM(path, max_model_len=64).llm_engine is not None


@pytest.mark.parametrize("index", ["abc", "", "-1", "1_0", "00", "\u0663"])
def test_tensor_of_no_layer_number_refused(tiny_llama: str, tmp_path, index: str) -> None:
    """model.layers.abc.* escaped as a ValueError; -1 and 1_0 (int() reads 10) were skipped silently."""
    name = f"model.layers.{index}.mlp.up_proj.weight"
    path = _add_tensor(_copy(tiny_llama, tmp_path / "m"), name, torch.zeros(128, 64))
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64)
    assert e.value.path == os.path.join(path, "model.safetensors"), str(e.value)
    assert f"unexpected tensor {name!r}" in str(e.value) and "is not a layer number" in str(e.value), str(e.value)


@pytest.mark.parametrize("name,shape,parts", [
    ("model.layers.0.self_attn.qkv_proj.weight", (128, 64), "q_proj, k_proj, v_proj"),
    ("model.layers.0.mlp.gate_up_proj.weight", (256, 64), "gate_proj, up_proj"),
])
def test_packed_tensor_in_the_checkpoint_refused(tiny_llama: str, tmp_path, name: str, shape: tuple,
                                                 parts: str) -> None:
    """A checkpoint with its own qkv_proj: the packed layer's loader was called without a shard id (TypeError)."""
    path = _add_tensor(_copy(tiny_llama, tmp_path / "m"), name, torch.zeros(shape))
    with pytest.raises(ModelLoadError, match=f"unexpected tensor '{name}' .* holds this layer's {parts} as separate"):
        LLM(path, max_model_len=64)


@pytest.mark.parametrize("make", ["directory", "dangling link"])
def test_shard_the_os_cannot_open_refused(tiny_llama: str, tmp_path, make: str) -> None:
    """An OSError from safetensors escaped as a traceback."""
    path = _copy(tiny_llama, tmp_path / "m")
    shard = os.path.join(path, "z.safetensors")
    os.mkdir(shard) if make == "directory" else os.symlink(str(tmp_path / "nowhere"), shard)
    with pytest.raises(ModelLoadError, match="cannot read the weights file") as e:
        LLM(path, max_model_len=64)
    assert e.value.path == shard


@pytest.mark.parametrize("fields,words", [
    (dict(num_hidden_layers=10**6), "num_hidden_layers is 1000000, but the checkpoint has no tensors of layer 3"),
    (dict(hidden_size=2**20, head_dim=16), "expected shape (512, 1048576)"),
    (dict(intermediate_size=2**34), "'model.layers.0.mlp.down_proj.weight' of shape (64, 128) does not fit"),
    (dict(vocab_size=2**34), "of shape (512, 64) does not fit the model config: expected shape (17179869184, 64)"),
])
def test_config_size_far_beyond_the_weights_refused_before_allocating(tiny_llama: str, tmp_path, fields: dict,
                                                                      words: str) -> None:
    """The model was built from these sizes first: terabytes asked of the allocator, or a kill for memory."""
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), **fields)
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64)
    assert path in str(e.value) and words in str(e.value), str(e.value)


@pytest.mark.parametrize("file,text", [
    ("tokenizer_config.json", "null"), ("tokenizer_config.json", "[1]"), ("tokenizer.json", "null"),
])
def test_tokenizer_json_not_an_object_refused(tiny_llama: str, tmp_path, file: str, text: str) -> None:
    """transformers read them as an AttributeError ('NoneType' object has no attribute 'get')."""
    path = _copy(tiny_llama, tmp_path / "m")
    with open(os.path.join(path, file), "w") as f:
        f.write(text)
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64)
    assert e.value.path == os.path.join(path, file) and "must hold a JSON object" in str(e.value), str(e.value)


_PACKED = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                              "group_size": 32}}
_FLOAT = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}}


@pytest.mark.parametrize("qc,param", [
    ({"config_groups": {"g": None}}, "quantization_config.config_groups.g"),  # AttributeError
    ({"format": "float-quantized", "config_groups": {"g": "x"}}, "quantization_config.config_groups.g"),
    ({"config_groups": [1]}, "quantization_config.config_groups"),
    ({"format": "pack-quantized", "config_groups": {"g": {**_PACKED, "weights": "x"}}},
     "quantization_config.config_groups.g.weights"),
    ({"format": "float-quantized", "config_groups": {"g": {**_FLOAT, "input_activations": "x"}}},
     "quantization_config.config_groups.g.input_activations"),
    ({"format": "pack-quantized", "config_groups": {"g": _PACKED}, "ignore": "lm_head"},  # read as ['l', 'm', '_']
     "quantization_config.ignore"),
    ({"format": "float-quantized", "config_groups": {"g": _FLOAT}, "ignore": "lm_head"}, "quantization_config.ignore"),
])
def test_compressed_tensors_section_of_the_wrong_type_refused(tiny_llama: str, tmp_path, qc: dict, param: str) -> None:
    qc = {"quant_method": "compressed-tensors", **qc}
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), quantization_config=qc)
    with pytest.raises(ConfigError) as e:
        LLM(path, max_model_len=64)
    assert e.value.param == param, str(e.value)


def test_fp8_ignored_layers_string_refused(tiny_llama: str, tmp_path) -> None:
    path = edit_config(_copy(tiny_llama, tmp_path / "m"),
                       quantization_config={"quant_method": "fp8", "ignored_layers": "lm_head"})
    with pytest.raises(ConfigError, match="must be a list of module names, got 'lm_head'") as e:
        LLM(path, max_model_len=64)
    assert e.value.param == "quantization_config.ignored_layers"


# ---- GGUF: the tiny file rewritten with one field broken -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    from tests.engine.test_quant_gguf import write_tiny_gguf

    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _value(value) -> bytes:
    """A metadata value as gguf writes it: str, int (u32), float (f32), or a list of str or int (i32)."""
    if isinstance(value, str):
        return struct.pack("<I", 8) + _string(value)
    if isinstance(value, list):
        strings = bool(value) and isinstance(value[0], str)
        items = b"".join(_string(v) if strings else struct.pack("<i", v) for v in value)
        return struct.pack("<IIQ", 9, 8 if strings else 5, len(value)) + items
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    return struct.pack("<II", 4, value) if isinstance(value, int) else struct.pack("<If", 6, value)


def _rewrite(src: str, dst, meta: dict | None = None, extra_kv: bytes = b"", tensors=None) -> str:
    """A copy of GGUF `src` with metadata keys set (meta), raw key-value bytes appended, or the tensor table
    edited (tensors: a function of the [name, shape, ggml type, offset] rows)."""
    parsed = open_gguf(src)
    metadata = {**parsed.metadata, **(meta or {})}
    start = min(t.offset for t in parsed.tensors)
    table = [[t.name, t.shape, t.ggml_type, t.offset - start] for t in parsed.tensors]
    table = tensors(table) if tensors else table
    out = b"GGUF" + struct.pack("<IQQ", 3, len(table), len(metadata) + bool(extra_kv))
    out += b"".join(_string(k) + _value(v) for k, v in metadata.items()) + extra_kv
    for name, shape, ggml_type, offset in table:
        dims = tuple(reversed(shape))
        out += _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
    out += b"\0" * (-len(out) % 32)
    with open(src, "rb") as f:
        f.seek(start)
        out += f.read()
    with open(dst, "wb") as f:
        f.write(out)
    return str(dst)


def _duplicate_norm(table: list) -> list:
    return table + [["output_norm.weight", (64,), 0, table[1][3]]]


@pytest.mark.parametrize("edit,words", [
    (dict(extra_kv=_string("x.nested") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 3000
          + struct.pack("<IQ", 4, 0)), "an array of arrays"),  # a RecursionError
    (dict(extra_kv=struct.pack("<Q", 2**62) + b"abc"), "a string of 4611686018427387904 bytes"),
    (dict(tensors=lambda t: [[t[0][0], (0, 64), *t[0][2:]]] + t[1:]), "tensor token_embd.weight of dimensions"),
    (dict(tensors=_duplicate_norm), "tensor output_norm.weight listed twice"),  # the second loaded over the first
    (dict(meta={"llama.block_count": 10**6}), "config num_hidden_layers is 1000000, but the checkpoint has no"),
    (dict(meta={"llama.embedding_length": 2**31}), "of shape (49152, 64): expected (49152, 2147483648)"),
    (dict(meta={"tokenizer.ggml.tokens": "abc"}), "tokenizer.ggml.tokens must be a non-empty array of strings"),
    (dict(meta={"tokenizer.ggml.merges": [1, 2]}), "cannot build the tokenizer from the GGUF metadata"),
    (dict(meta={"tokenizer.ggml.bos_token_id": "x"}), "tokenizer.ggml.bos_token_id must be a token id, got 'x'"),
])
def test_corrupt_gguf_refused(tiny_gguf: str, tmp_path, edit: dict, words: str) -> None:
    path = _rewrite(tiny_gguf, tmp_path / "m.gguf", **edit)
    with pytest.raises(ModelLoadError) as e:
        LLM(path, max_model_len=64)
    assert e.value.path == path and words in str(e.value), str(e.value)


def test_gguf_head_count_zero_names_the_field(tiny_gguf: str, tmp_path) -> None:
    """hidden_size // head_count was a ZeroDivisionError building the config."""
    path = _rewrite(tiny_gguf, tmp_path / "m.gguf", meta={"llama.attention.head_count": 0})
    with pytest.raises(ConfigError) as e:
        LLM(path, max_model_len=64)
    assert e.value.param == "gguf.num_attention_heads", str(e.value)


def test_rewritten_gguf_still_loads(tiny_gguf: str, tmp_path) -> None:
    """The rewrite itself breaks nothing: the cases above fail for their one edit."""
    assert LLM(_rewrite(tiny_gguf, tmp_path / "m.gguf"), max_model_len=64).llm_engine is not None


def test_serve_cli_prints_the_error_without_a_traceback(tiny_llama: str, tmp_path) -> None:
    """The engine core's check of the sizes against the weights reaches the CLI as one line, exit 2."""
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), num_hidden_layers=10**6)
    r = subprocess.run([sys.executable, "-m", "engine.serve", "--model", path, "--max-model-len", "64", "--port", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": pythonpath_with_repo()})
    output = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in output, output
    assert "config num_hidden_layers is 1000000, but the checkpoint has no tensors of layer 3" in output, output


def test_index_json_config_sizes_checked_across_shards(tiny_llama: str, tmp_path) -> None:
    """The sizes are checked against every shard the index names (here the embedding in the second)."""
    from safetensors.torch import load_file, save_file

    path = edit_config(_copy(tiny_llama, tmp_path / "m"), vocab_size=2**34)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    weight_map = {n: "a.safetensors" if "layers" in n else "b.safetensors" for n in names}
    for file in ("a.safetensors", "b.safetensors"):
        save_file({n: tensors[n] for n in names if weight_map[n] == file}, os.path.join(path, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(ModelLoadError, match="expected shape") as e:
        LLM(path, max_model_len=64)
    assert e.value.path == os.path.join(path, "b.safetensors"), str(e.value)
