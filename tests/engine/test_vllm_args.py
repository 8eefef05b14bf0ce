"""vLLM's LLM(...) arguments that are not EngineConfig fields (engine/vllm_args.py): each is mapped, taken at the
value that is what this engine does, taken with one warning where vLLM's v1 engine ignores it too, or refused
with a ConfigError naming it. They were TypeErrors (found by fuzzing the offline API)."""
from __future__ import annotations

import logging

import pytest

from engine import LLM
from engine.config import ConfigError
from engine.errors import RequestError
from engine.sampling_params import SamplingParams
from engine.vllm_args import VLLM_ARGS, resolve_vllm_args

# every argument at vLLM's LLM default, and the values this engine takes as they are
TAKEN = dict(seed=None, disable_log_stats=True, enable_chunked_prefill=True, swap_space=4, tokenizer_mode="auto",
             skip_tokenizer_init=False, max_seq_len_to_capture=8192, revision=None, download_dir=None,
             distributed_executor_backend="mp")


def test_vllm_defaults_are_taken_silently() -> None:
    out, warnings = resolve_vllm_args({**TAKEN, "max_model_len": 64})
    assert out == {"seed": 0, "max_model_len": 64}
    assert warnings == ["seed=None is seed=0, as in vLLM's v1 engine"]  # vLLM's v1 warns the same
    out, warnings = resolve_vllm_args({name: default for name, (default, _) in VLLM_ARGS.items()})
    assert out == {} and warnings == []


def test_num_gpu_blocks_override_is_num_kv_blocks() -> None:
    assert resolve_vllm_args({"num_gpu_blocks_override": 32})[0] == {"num_kv_blocks": 32}
    assert resolve_vllm_args({"num_gpu_blocks_override": 32, "num_kv_blocks": 32})[0] == {"num_kv_blocks": 32}
    with pytest.raises(ConfigError) as e:
        resolve_vllm_args({"num_gpu_blocks_override": 32, "num_kv_blocks": 16})
    assert e.value.param == "num_gpu_blocks_override"


@pytest.mark.parametrize("name,value,words", [
    ("swap_space", 8, "vLLM's v1 engine ignores it"),
    ("max_seq_len_to_capture", 4096, "vLLM's v1 engine ignores it"),
    ("disable_log_stats", False, "no periodic stats"),
])
def test_ignored_values_warn_once(name: str, value: object, words: str) -> None:
    out, warnings = resolve_vllm_args({name: value})
    assert out == {} and len(warnings) == 1 and warnings[0].startswith(f"{name}=") and words in warnings[0]


@pytest.mark.parametrize("name,value,words", [
    ("revision", "main", "local paths only"),
    ("download_dir", "/tmp/models", "local paths only"),
    ("tokenizer_mode", "slow", "not supported"),
    ("tokenizer_mode", "mistral", "not supported"),
    ("skip_tokenizer_init", True, "not supported"),
    ("enable_chunked_prefill", False, "cannot be turned off"),
    ("distributed_executor_backend", "ray", "not supported"),
    ("distributed_executor_backend", "uni", "not supported"),
    ("swap_space", -1, ">= 0"),
    ("max_seq_len_to_capture", 0, ">= 1"),
    ("swap_space", "4", "must be int or float"),
    ("skip_tokenizer_init", 1, "must be bool"),
    ("num_gpu_blocks_override", True, "must be int"),
    ("disable_log_stats", None, "must be bool"),
])
def test_values_this_engine_cannot_honour_are_refused_naming_the_argument(name: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_vllm_args({name: value})
    assert e.value.param == name and words in str(e.value), str(e.value)


def test_unknown_arguments_stay_type_errors() -> None:
    with pytest.raises(TypeError, match="'swap_spaces'"):
        LLM(swap_spaces=4)


@pytest.mark.parametrize("kwargs,param", [
    (dict(revision="main"), "revision"), (dict(max_logprobs=-1), "max_logprobs"), (dict(max_logprobs=21), "max_logprobs"),
    (dict(seed="1"), "seed"),
])
def test_llm_refuses_before_loading(kwargs: dict, param: str) -> None:
    with pytest.raises(ConfigError) as e:
        LLM("/nonexistent", **kwargs)
    assert e.value.param == param


@pytest.fixture(scope="module")
def llm(tiny_llama: str) -> LLM:
    return LLM(tiny_llama, device="cpu", max_model_len=64, num_gpu_blocks_override=24, max_logprobs=2, **TAKEN)


def test_llm_takes_vllms_arguments(llm: LLM) -> None:
    config = llm.llm_engine.config
    assert (config.num_kv_blocks, config.seed, config.max_logprobs) == (24, 0, 2)
    assert llm.llm_engine.info.num_total_blocks == 24


@pytest.mark.parametrize("field,what", [("logprobs", "sample"), ("prompt_logprobs", "prompt")])
def test_max_logprobs_bounds_requests_with_vllms_message(llm: LLM, field: str, what: str) -> None:
    with pytest.raises(RequestError) as e:
        llm.generate("Hello", SamplingParams(max_tokens=2, **{field: 3}), use_tqdm=False)
    assert e.value.param == field
    assert f"Requested {what} logprobs of 3, which is greater than max allowed: 2" in str(e.value)
    out = llm.generate("Hello", SamplingParams(max_tokens=2, **{field: 2}), use_tqdm=False)  # at the bound: served
    assert len(out) == 1 and not llm.llm_engine.has_unfinished_requests()
    # the API server's input processor (engine.serve --max-logprobs 2) refuses the same way: a 400 naming the field
    from engine.input_processor import InputProcessor

    api = InputProcessor(llm.llm_engine.info, llm.get_tokenizer(), max_logprobs=2)
    with pytest.raises(RequestError) as e:
        api.process("r", [5, 6], SamplingParams(max_tokens=2, **{field: 3}), arrival_time=0.0)
    assert e.value.param == field and "greater than max allowed: 2" in str(e.value)


def test_ignored_arguments_log_one_warning(tiny_llama: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gantry.config"):
        llm = LLM(tiny_llama, device="cpu", max_model_len=64, num_kv_blocks=8, swap_space=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "gantry.config"]
    assert lines == ["swap_space=0: ignored, as vLLM's v1 engine ignores it (a preempted request is recomputed, "
                     "not swapped)"]
    llm.llm_engine.shutdown()
