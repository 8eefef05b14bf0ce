"""A config whose max_position_embeddings is far beyond what the machine holds (10**9 here; Llama 4's is
10**7) is refused naming max_model_len with the largest that could fit, before anything is sized by it,
and loads at a max_model_len the user gives: the rotary cache, the block table and the CPU KV pool used
to be sized by it, asking for terabytes (the process was killed for memory). Found fuzzing LLM(path)."""
from __future__ import annotations

import shutil

import pytest

from engine import LLM, SamplingParams
from engine.config import ConfigError
from tests.conftest import edit_config

GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPTS = [[1, 5, 9, 200, 31], [7, 7, 7]]


@pytest.fixture(scope="module")
def huge_context(tiny_llama: str, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("huge") / "m")
    shutil.copytree(tiny_llama, path)
    return edit_config(path, max_position_embeddings=10**9)


@pytest.mark.parametrize("kwargs,where", [
    ({}, "available memory"),  # the CPU pool's default: one max_model_len sequence at least
    ({"kv_cache_memory_gib": 0.5}, "kv_cache_memory_gib"),
])
def test_max_position_embeddings_beyond_memory_is_refused(huge_context: str, kwargs: dict, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        LLM(huge_context, device="cpu", **kwargs)
    assert e.value.param == "max_model_len", str(e.value)
    assert "max_position_embeddings" in str(e.value) and where in str(e.value)
    fits = int(str(e.value).split("the largest max_model_len that could fit is ")[1].split(".")[0])
    assert 0 < fits < 10**9


def test_num_kv_blocks_too_few_for_max_model_len_is_refused_before_the_build(huge_context: str) -> None:
    with pytest.raises(ConfigError) as e:
        LLM(huge_context, device="cpu", max_model_len=10**8, num_kv_blocks=64)
    assert e.value.param == "max_model_len" and "largest max_model_len that fits is 1024" in str(e.value)


def test_loads_at_the_max_model_len_given_with_a_rotary_cache_of_its_size(tiny_llama: str, huge_context: str) -> None:
    want = [o.outputs[0].token_ids for o in LLM(tiny_llama, max_model_len=256).generate(
        [{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)]
    llm = LLM(huge_context, max_model_len=256)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                        use_tqdm=False)]
    assert got == want
    layer = next(iter(llm.llm_engine.executor.runner.model.model.layers.values()))
    assert layer.self_attn.rotary_emb.cos_sin_cache.shape[0] == 256
