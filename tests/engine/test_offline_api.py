"""Offline LLM (issue 22): vLLM's prompt forms, request defaults from the model's generation
config (--generation-config / --override-generation-config), no progress bar written into a
non-terminal stream, and a CPU KV pool sized for the model and left unzeroed."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ConfigError, EngineConfig
from engine.errors import RequestError
from engine.model_config import resolve_model_config

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
UNCAPPED = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)  # up to the context left


@pytest.fixture(scope="module")
def llm(tiny_llama: str) -> LLM:
    return LLM(tiny_llama, device="cpu", max_model_len=64)


def texts(outputs: list) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def test_vllm_prompt_forms(llm: LLM) -> None:
    text = "The quick brown fox"
    ids = llm.get_tokenizer().encode(text)
    batch = llm.generate([text, {"prompt": text}, {"prompt_token_ids": ids}, ids], GREEDY, use_tqdm=False)
    assert len(set(texts(batch))) == 1 and batch[2].prompt_token_ids == ids
    for single in (text, {"prompt": text}, {"prompt_token_ids": ids}, ids):
        assert texts(llm.generate(single, GREEDY, use_tqdm=False)) == texts(batch)[:1]
    assert texts(llm.generate([ids, ids], GREEDY, use_tqdm=False)) == texts(batch)[:2]  # a batch of token lists


@pytest.mark.parametrize("prompts,field", [
    ({"prompt": 3}, "prompts.prompt"),
    ({"prompt_token_ids": "1 2 3"}, "prompts.prompt_token_ids"),
    ({"prompt": "a", "prompt_token_ids": [1]}, "prompts"),
    ({"multi_modal_data": {"image": None}, "prompt": "a"}, "prompts.multi_modal_data"),
    (["fine", {"prompt_token_ids": [1, "2"]}], "prompts[1].prompt_token_ids"),
    (3.5, "prompts"),
])
def test_bad_prompt_forms_name_the_field(llm: LLM, prompts: object, field: str) -> None:
    with pytest.raises(RequestError) as e:
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert e.value.param == field


def test_max_tokens_default_from_generation_config(tiny_llama: str, tmp_path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "eos_token_id": 2}))
    own = tmp_path / "own"
    own.mkdir()
    (own / "generation_config.json").write_text(json.dumps({"max_new_tokens": 4}))
    prompt = [5, 6, 7, 8, 9, 10]
    cases = [
        ({}, 3),  # auto: the model's generation_config.json, as vLLM
        ({"override_generation_config": {"max_new_tokens": 2}}, 2),
        ({"generation_config": str(own)}, 4),
        ({"generation_config": "vllm"}, 16),  # none: SamplingParams' own default, as vLLM
    ]
    for kwargs, expected in cases:
        llm = LLM(str(model), device="cpu", max_model_len=32, **kwargs)
        default = llm.get_default_sampling_params()  # what sampling_params=None means
        assert default.max_tokens == expected
        assert len(llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids) <= expected
        greedy_default = dataclasses.replace(default, temperature=0, ignore_eos=True)
        assert len(llm.generate(prompt, greedy_default, use_tqdm=False)[0].outputs[0].token_ids) == expected, kwargs
        # SamplingParams(max_tokens=None) given explicitly: up to the context left, whatever the generation
        # config says (vLLM's input processor); the default only ever came through sampling_params=None
        assert len(llm.generate(prompt, UNCAPPED, use_tqdm=False)[0].outputs[0].token_ids) == 32 - len(prompt), kwargs


def test_embedded_model_default_max_tokens(smollm2_path: str) -> None:
    """The embedded SmolLM2 has no generation config: a default keeps README examples short on CPU."""
    cpu = torch.device("cpu")
    assert resolve_model_config(EngineConfig(device="cpu"), cpu).default_max_tokens == 256
    override = EngineConfig(device="cpu", override_generation_config={"max_new_tokens": 512})
    assert resolve_model_config(override, cpu).default_max_tokens == 512
    assert resolve_model_config(EngineConfig(device="cpu", generation_config="vllm"), cpu).default_max_tokens is None


@pytest.mark.parametrize("kwargs,field", [
    ({"override_generation_config": {"temperature": -0.5}}, "override_generation_config.temperature"),
    ({"override_generation_config": {"do_sample": True}}, "override_generation_config.do_sample"),
    ({"override_generation_config": {"max_new_tokens": 0}}, "override_generation_config.max_new_tokens"),
    ({"override_generation_config": "max_new_tokens=3"}, "override_generation_config"),
])
def test_bad_generation_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        EngineConfig(**kwargs)
    assert e.value.param == field


def test_missing_generation_config_dir(tiny_llama: str, tmp_path) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_model_config(EngineConfig(model=tiny_llama, generation_config=str(tmp_path)), torch.device("cpu"))
    assert e.value.param == "generation_config" and "generation_config.json" in str(e.value)


def test_no_progress_bar_into_a_non_terminal(llm: LLM, capsys: pytest.CaptureFixture) -> None:
    llm.generate(["a", "b"], GREEDY, use_tqdm=True)  # pytest's captured stderr is not a terminal
    assert "Generating" not in capsys.readouterr().err


def test_cpu_kv_pool_sized_for_the_model_and_not_zeroed(llm: LLM) -> None:
    engine = llm.llm_engine
    assert engine.block_manager.num_blocks == 8192 // 16  # max(max_model_len, 8192) tokens, not 2 GiB
    runner = engine.executor.runner
    num_blocks = (512 * 2**20) // runner.kv_bytes_per_block()  # a 512 MiB pool

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = rss()
    runner.allocate_kv_cache(num_blocks)
    grown = rss() - before
    runner.allocate_kv_cache(engine.block_manager.num_blocks)  # back to the engine's pool
    assert grown < 64 * 2**20, f"allocating the pool touched {grown / 2**20:.0f} MiB (zeroed?)"


def test_cpu_serving_imports_no_triton_and_starts_no_cuda(tiny_llama: str) -> None:
    """Neither Triton nor a CUDA context on a CPU run (each costs seconds of start-up)."""
    import subprocess
    import sys

    code = (f"import sys, torch\nfrom engine import LLM, SamplingParams\nimport engine.serve, engine.server.app\n"
            f"LLM({tiny_llama!r}, device='cpu').generate('hi', SamplingParams(max_tokens=2), use_tqdm=False)\n"
            f"print('triton' in sys.modules, torch.cuda.is_initialized())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]


def test_tokenizer_option_is_used(tiny_llama: str, tmp_path) -> None:
    """EngineConfig.tokenizer (--tokenizer) names where the tokenizer is (the seed ignored it)."""
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_llama}/{name}", weights_only / name)
    llm = LLM(str(weights_only), tokenizer=tiny_llama, device="cpu", max_model_len=32)
    assert llm.generate("The quick brown fox", GREEDY, use_tqdm=False)[0].outputs[0].text
    with pytest.raises(ConfigError) as e:
        LLM(str(weights_only), tokenizer=str(tmp_path / "nowhere"), device="cpu")
    assert e.value.param == "tokenizer"
