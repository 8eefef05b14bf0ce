"""The model's attention shape after hf_overrides: a ConfigError names the override, or the checkpoint's
config.json field (found by fuzzing the offline API: 3 heads over hidden_size 64 loaded and generated
garbage). tiny_llama: hidden_size 64, 4 heads of head_dim 16, 2 KV heads, 3 layers."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from engine import LLM
from engine.config import ConfigError, EngineConfig
from engine.errors import ModelLoadError
from engine.model_config import resolve_model_config


@pytest.mark.parametrize("overrides,param", [
    ({"num_attention_heads": 3}, "hf_overrides.num_attention_heads"),  # loaded and generated garbage
    ({"hidden_size": 66}, "hf_overrides.hidden_size"),
    ({"num_key_value_heads": 3}, "hf_overrides.num_key_value_heads"),
    ({"num_attention_heads": 3, "head_dim": 16}, "hf_overrides.num_attention_heads"),  # 3 heads over 2 KV heads
    ({"num_attention_heads": 0}, "hf_overrides.num_attention_heads"),
    ({"hidden_size": -64}, "hf_overrides.hidden_size"),
    ({"num_hidden_layers": 0}, "hf_overrides.num_hidden_layers"),
    ({"head_dim": 0}, "hf_overrides.head_dim"),
    ({"num_attention_heads": "4"}, "hf_overrides.num_attention_heads"),  # transformers' own check
])
def test_hf_overrides_shape_names_the_override(tiny_llama: str, overrides: dict, param: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_model_config(EngineConfig(model=tiny_llama, hf_overrides=overrides), None)
    assert e.value.param == param, str(e.value)


@pytest.mark.parametrize("overrides,head_dim", [
    ({"num_attention_heads": 8}, 8),  # a derived head_dim follows the override
    ({"hidden_size": 128}, 32),
    ({"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16}, 16),  # its own head_dim
    ({"num_hidden_layers": 2}, 16),
])
def test_consistent_hf_overrides_accepted(tiny_llama: str, overrides: dict, head_dim: int) -> None:
    mc = resolve_model_config(EngineConfig(model=tiny_llama, hf_overrides=overrides), None)
    assert mc.head_dim == head_dim


def test_hf_overrides_of_num_attention_heads_never_generates(tiny_llama: str) -> None:
    with pytest.raises(ConfigError, match="hidden_size 64 is not divisible by num_attention_heads 3") as e:
        LLM(tiny_llama, hf_overrides={"num_attention_heads": 3})
    assert e.value.param == "hf_overrides.num_attention_heads"


def _copy_with_config(src: str, dst: str, drop: tuple[str, ...] = (), **fields) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if k not in drop}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**config, **fields}, f)
    return dst


@pytest.mark.parametrize("fields,param", [
    ({"num_key_value_heads": 3}, "config.json.num_key_value_heads"),
    ({"num_hidden_layers": 0}, "config.json.num_hidden_layers"),
])
def test_inconsistent_checkpoint_names_its_config_field(tiny_llama: str, tmp_path, fields: dict, param: str) -> None:
    path = _copy_with_config(tiny_llama, str(tmp_path / "m"), **fields)
    with pytest.raises(ConfigError) as e:
        resolve_model_config(EngineConfig(model=path), None)
    assert e.value.param == param, str(e.value)
    mended = resolve_model_config(EngineConfig(model=path, hf_overrides={"num_key_value_heads": 2,
                                                                         "num_hidden_layers": 3}), None)
    assert mended.num_kv_heads == 2 and mended.num_layers == 3


def test_checkpoint_transformers_refuses_is_a_model_load_error(tiny_llama: str, tmp_path) -> None:
    """transformers checks hidden_size / num_attention_heads itself when config.json has no head_dim: its
    error (a huggingface_hub StrictDataclassClassValidationError) became a ModelLoadError naming the path."""
    path = _copy_with_config(tiny_llama, str(tmp_path / "m"), drop=("head_dim",), num_attention_heads=3,
                             num_key_value_heads=1)
    with pytest.raises(ModelLoadError, match="inconsistent config.json: .*hidden size") as e:
        resolve_model_config(EngineConfig(model=path), None)
    assert e.value.path == path
