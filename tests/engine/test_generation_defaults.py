"""Sampling defaults from the generation config (vLLM's --generation-config / --override-generation-config):
repetition_penalty, temperature, top_k, top_p, min_p and max_new_tokens become the defaults of requests
that leave them unset; `vllm` ignores the file, a directory replaces it; a value equal to transformers'
default is no recommendation; a bad value is a ConfigError naming it. Offline: get_default_sampling_params
and generate(sampling_params=None)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.config import ConfigError, EngineConfig
from engine.model_config import generation_defaults, resolve_model_config
from engine.sampling_defaults import api_sampling_defaults, with_defaults

FILE = {"temperature": 0.0, "top_p": 0.8, "top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1,
        "max_new_tokens": 6, "do_sample": True, "bos_token_id": 1, "eos_token_id": 2}
APPLIED = {"temperature": 0.0, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.1, "max_tokens": 6}  # top_k 50: HF's


def model_with_generation_config(tiny: str, dest: Path, fields: dict) -> str:
    """A copy of the tiny checkpoint whose generation_config.json holds fields."""
    shutil.copytree(tiny, dest)
    (dest / "generation_config.json").write_text(json.dumps(fields))
    return str(dest)


@pytest.fixture(scope="module")
def model(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return model_with_generation_config(tiny_llama, tmp_path_factory.mktemp("gen") / "model", FILE)


def defaults(**kwargs) -> dict:
    return resolve_model_config(EngineConfig(**kwargs), None).default_sampling_params


def test_file_values_become_defaults(model: str, tmp_path: Path) -> None:
    assert defaults(model=model) == APPLIED
    assert defaults(model=model, generation_config="vllm") == {}
    own = tmp_path / "own"
    own.mkdir()
    (own / "generation_config.json").write_text(json.dumps({"top_k": 20, "temperature": 0.7}))
    assert defaults(model=model, generation_config=str(own)) == {"top_k": 20, "temperature": 0.7}
    override = {"temperature": 1.0, "top_k": 5}  # an override is taken as given, HF's default value included
    assert defaults(model=model, override_generation_config=override) == {**APPLIED, **override}
    assert generation_defaults(EngineConfig(model=model))[0] == resolve_model_config(EngineConfig(model=model), None).generation_config


def test_no_file_and_gguf_change_nothing(tiny_llama: str, tmp_path: Path, smollm2_path: str) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    (bare / "generation_config.json").unlink(missing_ok=True)
    assert defaults(model=str(bare)) == {}
    assert defaults(model=smollm2_path) == {}  # a GGUF carries no generation config
    assert defaults() == {"max_tokens": 256}  # the embedded model's own default, as before


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 1.5), ("top_k", "40"), ("min_p", 2),
                                          ("repetition_penalty", 0), ("max_new_tokens", 0), ("temperature", True)])
def test_bad_file_value_names_the_field(tiny_llama: str, tmp_path: Path, field: str, value: object) -> None:
    path = model_with_generation_config(tiny_llama, tmp_path / "m", {field: value})
    with pytest.raises(ConfigError) as e:
        resolve_model_config(EngineConfig(model=path), None)
    assert e.value.param == f"generation_config.json.{field}" and "generation_config.json" in str(e.value)
    resolve_model_config(EngineConfig(model=path, generation_config="vllm"), None)  # not read: no error


def test_bad_override_names_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        EngineConfig(override_generation_config={"top_p": 0})
    assert e.value.param == "override_generation_config.top_p"


def test_api_defaults_leave_max_tokens_to_the_input_processor(model: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gantry.engine"):
        api = api_sampling_defaults(EngineConfig(model=model), log=True)
    assert api == {k: v for k, v in APPLIED.items() if k != "max_tokens"}
    assert ("default sampling params from the model's generation_config.json: repetition_penalty=1.1, temperature=0.0, "
            "top_p=0.8, min_p=0.05 (") in caplog.text
    assert api_sampling_defaults(EngineConfig(model=model, generation_config="vllm"), log=True) == {}
    assert with_defaults({"temperature": None, "top_p": 0.5}, api) == {**api, "top_p": 0.5}


def test_offline_defaults(model: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gantry.engine"):
        llm = LLM(model, device="cpu", max_model_len=64)
    assert caplog.text.count("default sampling params from the model's generation_config.json") == 1
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
            params.max_tokens) == (0.0, 0.8, 0, 0.05, 1.1, 6)
    prompt = [5, 6, 7, 8, 9, 10]
    greedy = SamplingParams(temperature=0, top_p=0.8, min_p=0.05, repetition_penalty=1.1, max_tokens=6)
    expected = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids == expected  # None: the file's
    sampled = {tuple(llm.generate(prompt, SamplingParams(max_tokens=6, seed=seed), use_tqdm=False)[0].outputs[0].token_ids)
               for seed in range(4)}  # a request's own temperature (1.0) samples: the check above can fail
    assert sampled != {tuple(expected)}
    assert LLM(model, device="cpu", max_model_len=64, generation_config="vllm").get_default_sampling_params() == SamplingParams()
