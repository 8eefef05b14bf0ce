"""Adapters we cannot serve are refused with an error naming the field and the file, before any
request reaches the engine: rank above max_lora_rank, an unsupported target module, a missing or
corrupt file, a name already taken, LoRA not enabled."""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from engine.config import ConfigError, EngineConfig
from engine.errors import RequestError
from engine.lora import LoRAError, LoRARequest
from engine.lora.registry import LoRARegistry

HF = SimpleNamespace(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_key_value_heads=2)  # head_dim 8: q 32, k/v 16


def write(path: str, rank: int = 4, modules: tuple[str, ...] = ("q_proj", "down_proj"), **config) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": list(modules), **config}, f)
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "down_proj": (64, 32), "lm_head": (32, 100)}
    tensors = {}
    for m in modules:
        kind = "mlp" if m == "down_proj" else "self_attn"
        in_f, out_f = shapes[m]
        tensors[f"base_model.model.model.layers.0.{kind}.{m}.lora_A.weight"] = torch.zeros(rank, in_f)
        tensors[f"base_model.model.model.layers.0.{kind}.{m}.lora_B.weight"] = torch.zeros(out_f, rank)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return path


def registry(enable: bool = True, max_rank: int = 8) -> LoRARegistry:
    return LoRARegistry(EngineConfig(enable_lora=enable, max_lora_rank=max_rank), HF, "base")


def refused(tmp_path, req_path: str, field: str) -> str:
    with pytest.raises(LoRAError) as e:
        registry().check(LoRARequest("a", 1, req_path))
    assert e.value.param == "lora_request.lora_path"
    assert field in str(e.value), str(e.value)
    return str(e.value)


def test_good_adapter_passes(tmp_path) -> None:
    r = registry()
    req = r.add("mine", write(str(tmp_path / "ok")))
    assert req.lora_int_id == 1 and r.by_name["mine"] is req


def test_rank_above_max_lora_rank(tmp_path) -> None:
    message = refused(tmp_path, write(str(tmp_path / "big"), rank=16), "adapter_config.json r")
    assert "max_lora_rank 8" in message


def test_unsupported_target_module(tmp_path) -> None:
    refused(tmp_path, write(str(tmp_path / "head"), modules=("q_proj", "lm_head")), "target_modules: 'lm_head'")


def test_missing_files(tmp_path) -> None:
    refused(tmp_path, str(tmp_path / "nowhere"), "does not exist")
    path = write(str(tmp_path / "noweights"))
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    refused(tmp_path, path, "adapter_model.safetensors is missing")
    path = write(str(tmp_path / "noconfig"))
    os.remove(os.path.join(path, "adapter_config.json"))
    refused(tmp_path, path, "adapter_config.json is missing")


def test_corrupt_files(tmp_path) -> None:
    path = write(str(tmp_path / "corrupt"))
    with open(os.path.join(path, "adapter_model.safetensors"), "r+b") as f:
        f.truncate(20)
    refused(tmp_path, path, "adapter_model.safetensors is corrupt")
    path = write(str(tmp_path / "badjson"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write("{not json")
    refused(tmp_path, path, "adapter_config.json is not readable JSON")


def test_shape_not_of_this_model(tmp_path) -> None:
    src = write(str(tmp_path / "other"), modules=("k_proj",))
    # a k_proj written for another model: [16, 32] lora_B on a 16-wide k_proj is fine; widen A instead
    save_file({"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 48),
               "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(16, 4)},
              os.path.join(src, "adapter_model.safetensors"))
    refused(tmp_path, src, "layers.0.k_proj")


def test_rank_zero_tensors(tmp_path) -> None:
    """config r 4 but tensors of rank 0: the engine core divided by zero on the first request and died (found
    by fuzzing the API)."""
    src = write(str(tmp_path / "zero"), modules=("q_proj",))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(0, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 0)},
              os.path.join(src, "adapter_model.safetensors"))
    assert "has rank 0" in refused(tmp_path, src, "layers.0.q_proj")


def test_files_removed_after_registration_fail_that_request_alone(tiny_llama: str, tmp_path) -> None:
    """The engine core checks an adapter's files when a request arrives (a server registered it earlier): a
    directory removed since fails that request, naming model, and the engine goes on. The core died of it before
    (found by fuzzing the API)."""
    from engine import LLM, SamplingParams
    from engine.core_messages import EngineCoreRequest
    from tests.engine.test_lora import write_adapter

    path = write_adapter(tiny_llama, str(tmp_path / "gone"), 4, 8, ["q_proj"], False, 0)
    core = LLM(tiny_llama, enable_lora=True, max_lora_rank=8, max_model_len=64).llm_engine.engine_core
    shutil.rmtree(path)
    params = SamplingParams(temperature=0, max_tokens=4)
    for rid, lora in (("bad", LoRARequest("gone", 1, path)), ("good", None)):
        core.add_request(EngineCoreRequest(request_id=rid, prompt_token_ids=[5, 6, 7], sampling_params=params,
                                           max_tokens=4, arrival_time=0.0, lora_request=lora))
    outputs = []
    while core.has_work():
        outputs += core.step_fn().outputs
    bad = [o for o in outputs if o.request_id == "bad"]
    assert len(bad) == 1 and bad[0].error[0] == "model" and "does not exist" in bad[0].error[1]
    assert sum(len(o.new_token_ids) for o in outputs if o.request_id == "good") == 4


def test_name_taken_and_unknown_removal(tmp_path) -> None:
    r = registry()
    path = write(str(tmp_path / "a"))
    r.add("a", path)
    shutil.copytree(path, tmp_path / "b")
    for name in ("a", "base"):  # another adapter's name, or the base model's
        with pytest.raises(LoRAError, match="already taken") as e:
            r.add(name, str(tmp_path / "b"))
        assert e.value.param == "lora_name"
    with pytest.raises(RequestError, match="at most 256 characters") as e:  # 100,000 were taken (fuzzing)
        r.add("x" * 257, str(tmp_path / "b"))
    assert e.value.param == "lora_name"
    assert list(r.by_name) == ["a"]  # nothing else disturbed
    with pytest.raises(LoRAError, match="no adapter named 'zzz'"):
        r.remove("zzz")


def test_lora_not_enabled(tmp_path) -> None:
    with pytest.raises(RequestError, match="enable_lora"):
        registry(enable=False).check(LoRARequest("a", 1, write(str(tmp_path / "a"))))


def test_bad_lora_modules_at_start_up(tmp_path) -> None:
    config = EngineConfig(enable_lora=True, max_lora_rank=8, lora_modules={"big": write(str(tmp_path / "b"), rank=16)})
    with pytest.raises(ConfigError) as e:
        LoRARegistry(config, HF, "base")
    assert e.value.param == "lora_modules.big" and "exceeds max_lora_rank 8" in str(e.value)
    with pytest.raises(ConfigError, match="enable_lora is off"):
        EngineConfig(lora_modules={"a": "/x"})
