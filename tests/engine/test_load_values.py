"""A checkpoint holding NaN or inf (or a value the model dtype cannot hold) is refused at load with a
ModelLoadError naming the shard file and the tensor, packed ones (q/k/v, gate/up) included; it loaded
silently and generated garbage. Finite values whose sum overflows are no false alarm; dummy weights and
the file behind them are not checked."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import ModelLoadError
from tests.conftest import write_tiny_checkpoint
from tests.engine.test_load_fuzz import _edit_tensors, _set

L0 = "model.layers.0."
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> str:
    """A tiny Llama with q/k/v/o biases and an untied LM head: every kind of float parameter."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("biased")), "LlamaForCausalLM", tie=False,
                                 attention_bias=True)


def _poke(value: float, at: int = 5) -> object:
    """The tensor with one value (its `at`-th, flattened) replaced."""
    def make(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[at] = value
        return t
    return make


def _with(src: str, dst, name: str, make) -> str:
    shutil.copytree(src, dst)
    return _edit_tensors(str(dst), _set(name, make))


@pytest.mark.parametrize("name,value", [
    (f"{L0}self_attn.q_proj.weight", NAN),  # packed into qkv_proj: first of three
    (f"{L0}self_attn.k_proj.weight", INF),  # middle one
    (f"{L0}self_attn.v_proj.bias", -INF),
    (f"{L0}mlp.up_proj.weight", NAN),  # packed into gate_up_proj, after gate
    (f"{L0}self_attn.o_proj.weight", INF),
    (f"{L0}mlp.down_proj.weight", NAN),
    ("model.embed_tokens.weight", NAN),
    ("lm_head.weight", INF),
    ("model.norm.weight", NAN),
    ("model.layers.2.input_layernorm.weight", -INF),
])
def test_nan_or_inf_refused_naming_file_and_tensor(biased: str, tmp_path, name: str, value: float) -> None:
    path = _with(biased, tmp_path / "m", name, _poke(value))
    with pytest.raises(ModelLoadError, match="holds NaN or inf values") as e:
        LLM(path, max_model_len=64)
    assert os.path.join(path, "model.safetensors") in str(e.value) and repr(name) in str(e.value), str(e.value)


def test_the_shard_file_holding_the_tensor_is_named(tmp_path) -> None:
    """Two shard files; the bad tensor (packed with tensors of the other file) named with its own."""
    from safetensors.torch import load_file, save_file

    from tests.engine.test_sharded_load import llama_shapes, write_sharded_checkpoint

    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    write_sharded_checkpoint(tmp_path, config, num_files=2)
    name = "model.layers.1.self_attn.v_proj.weight"
    assert name in llama_shapes(config)
    shard = str(tmp_path / "model-00002-of-00002.safetensors")
    tensors = load_file(shard)
    tensors[name] = _poke(NAN)(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as e:
        LLM(str(tmp_path), max_model_len=64)
    assert str(e.value).startswith(f"{shard}: tensor {name!r} holds NaN or inf values"), str(e.value)


def test_finite_values_whose_sum_overflows_load(biased: str, tmp_path) -> None:
    """Values near float32's largest sum to inf: the exact check then finds every value finite. bfloat16's
    largest, which float32 holds too: float32's own rounds to inf in bfloat16 (a GPU's default dtype), which
    is a value the model dtype cannot hold and rightly refused."""
    name = f"{L0}mlp.down_proj.weight"
    big = torch.finfo(torch.bfloat16).max
    path = _with(biased, tmp_path / "m", name, lambda t: torch.full_like(t, big))
    llm = LLM(path, max_model_len=64)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1), use_tqdm=False)[0].outputs


def test_dummy_weights_skip_the_file_and_the_check(biased: str, tmp_path) -> None:
    path = _with(biased, tmp_path / "m", "model.embed_tokens.weight", _poke(NAN))
    llm = LLM(path, max_model_len=64, load_format="dummy")
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nan_refused_on_the_gpu(biased: str, tmp_path) -> None:
    """The check runs where the weights land (one sum per parameter on the device)."""
    name = f"{L0}self_attn.k_proj.weight"
    path = _with(biased, tmp_path / "m", name, _poke(NAN))
    with pytest.raises(ModelLoadError, match=f"{name!r} holds NaN or inf values as bfloat16"):
        LLM(path, max_model_len=64, device="cuda", dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3)


def test_a_value_beyond_the_model_dtype_refused(biased: str, tmp_path) -> None:
    """1e5 is finite in the float32 checkpoint and inf in float16."""
    name = f"{L0}self_attn.q_proj.weight"
    path = _with(biased, tmp_path / "m", name, _poke(1e5))
    with pytest.raises(ModelLoadError, match=f"{name!r} holds NaN or inf values as float16"):
        LLM(path, max_model_len=64, dtype="float16")
    assert LLM(path, max_model_len=64).generate([[1, 2]], SamplingParams(max_tokens=1), use_tqdm=False)[0].outputs
