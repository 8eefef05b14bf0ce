"""Bad input raises a typed error naming the parameter or file; other requests are unharmed."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from engine import LLM, SamplingParams
from engine.config import ConfigError
from engine.errors import ModelLoadError, RequestError, UnsupportedArchitectureError
from engine.sampling_params import SamplingParamsError


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"),
    (dict(min_p=2.0), "min_p"),
    (dict(stop=["x"] * 100), "stop"),
    (dict(logprobs=100), "logprobs"),
])
def test_bad_sampling_params(kwargs: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_request_errors_leave_others_running(tiny_llama: str) -> None:
    llm = LLM(tiny_llama, max_model_len=128)
    engine = llm.llm_engine
    engine.add_request("good", [5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    for prompt, params, param in [
        (list(range(3, 3 + 200)), SamplingParams(max_tokens=4), "prompt"),
        ([], SamplingParams(), "prompt"),
        ([99999], SamplingParams(), "prompt"),
    ]:
        with pytest.raises(RequestError) as e:
            engine.add_request("bad", prompt, params)
        assert e.value.param == param
    with pytest.raises(RequestError) as e:
        engine.add_request("good", [5], SamplingParams())
    assert e.value.param == "request_id"
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    assert final.request_id == "good" and len(final.outputs[0].token_ids) == 8
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_unknown_architecture(tiny_llama: str, tmp_path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as e:
        LLM(str(bad))
    assert "GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value)


def test_missing_and_corrupt_weights(tiny_llama: str, tmp_path) -> None:
    missing = tmp_path / "missing"
    shutil.copytree(tiny_llama, missing)
    os.remove(missing / "model.safetensors")
    with pytest.raises(ModelLoadError) as e:
        LLM(str(missing))
    assert "safetensors" in str(e.value)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError) as e:
        LLM(str(corrupt))
    assert "model.safetensors" in str(e.value)
    with pytest.raises(ModelLoadError) as e:
        LLM(str(tmp_path / "does-not-exist"))
    assert "does-not-exist" in str(e.value)


def test_bad_engine_config(tiny_llama: str) -> None:
    with pytest.raises(ConfigError) as e:
        LLM(tiny_llama, max_model_len=10**6)
    assert e.value.param == "max_model_len"
    with pytest.raises(ConfigError) as e:
        LLM(tiny_llama, block_size=12)
    assert e.value.param == "block_size"
    with pytest.raises(ConfigError) as e:
        LLM(tiny_llama, dtype="int3")
    assert e.value.param == "dtype"
