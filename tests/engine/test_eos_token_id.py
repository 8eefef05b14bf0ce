"""EOS ids outside the vocabulary (config.json, the model's generation_config.json or hf_overrides; an
int or a list) are a ConfigError naming the field: one beyond vocab_size never ended a sequence and a
negative one masked another token under min_tokens, and both loaded. tiny_llama: vocab_size 512."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from engine import LLM
from engine.config import ConfigError, EngineConfig
from engine.model_config import resolve_model_config
from tests.conftest import edit_config


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_generation_config(path: str, **fields) -> str:
    file = os.path.join(path, "generation_config.json")
    with open(file) as f:
        data = json.load(f)
    with open(file, "w") as f:
        json.dump({**data, **fields}, f)
    return path


@pytest.mark.parametrize("eos,words", [
    (512, "512 is outside the vocabulary (vocab_size 512)"),
    (70000, "70000 is outside the vocabulary (vocab_size 512)"),
    (-1, "-1 is outside the vocabulary"),
    ([2, 600], "600 (of [2, 600]) is outside the vocabulary"),
])
def test_config_json_eos_outside_the_vocabulary(tiny_llama: str, tmp_path, eos, words: str) -> None:
    path = edit_config(_copy(tiny_llama, tmp_path / "m"), eos_token_id=eos)
    with pytest.raises(ConfigError) as e:
        resolve_model_config(EngineConfig(model=path), None)
    assert e.value.param == "config.json.eos_token_id" and words in str(e.value), str(e.value)


@pytest.mark.parametrize("generation_config", ["auto", "vllm"])  # its EOS ids are used either way
@pytest.mark.parametrize("eos", [512, [2, -3], [2, "x"]])
def test_generation_config_eos_outside_the_vocabulary(tiny_llama: str, tmp_path, eos, generation_config: str) -> None:
    path = _edit_generation_config(_copy(tiny_llama, tmp_path / "m"), eos_token_id=eos)
    with pytest.raises(ConfigError) as e:
        resolve_model_config(EngineConfig(model=path, generation_config=generation_config), None)
    assert e.value.param == "generation_config.json.eos_token_id", str(e.value)


def test_hf_overrides_eos_names_the_override(tiny_llama: str) -> None:
    with pytest.raises(ConfigError) as e:
        LLM(tiny_llama, hf_overrides={"eos_token_id": 9999})
    assert e.value.param == "hf_overrides.eos_token_id" and "9999 is outside the vocabulary" in str(e.value)


@pytest.mark.parametrize("eos", [0, 511, [1, 2, 511], None, []])
def test_eos_inside_the_vocabulary_accepted(tiny_llama: str, tmp_path, eos) -> None:
    path = _edit_generation_config(edit_config(_copy(tiny_llama, tmp_path / "m"), eos_token_id=eos), eos_token_id=eos)
    assert resolve_model_config(EngineConfig(model=path), None).hf_config.eos_token_id == eos


def test_embedded_gguf_eos_accepted(smollm2_path: str) -> None:
    mc = resolve_model_config(EngineConfig(), None)
    assert 0 <= mc.hf_config.eos_token_id < mc.hf_config.vocab_size
