"""Adapters that go bad: NaN or inf weights are refused naming the file and the tensor (at registration, and for an
offline LoRARequest that request fails alone); an adapter evicted from the host cache whose files were then removed
or corrupted fails its own requests, naming `model` and the file, when it is read again, and every other request
(base model, other adapters) finishes as before. Both killed the engine core, or served garbage, before."""
from __future__ import annotations

import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.config import ConfigError, EngineConfig
from engine.errors import RequestError
from engine.lora import LoRAError, LoRARequest
from engine.lora.adapter import WEIGHTS_FILE
from engine.lora.registry import LoRARegistry
from tests.engine.test_lora import write_adapter
from tests.engine.test_lora_errors import HF, registry, write

PROMPT = [5, 77, 300, 12, 9, 41, 250, 8, 100]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def poison(path: str, value: float, name: str = Q_A) -> str:
    """One element of tensor `name` set to value (nan or inf), the rest of the file as it was."""
    file = os.path.join(path, WEIGHTS_FILE)
    tensors = load_file(file)
    tensors[name][0, 0] = value
    save_file(tensors, file)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_refused_at_registration(tmp_path, value: float) -> None:
    """POST /v1/load_lora_adapter's check (LoRARegistry.add: a 400 naming lora_path) and --lora-modules at start-up."""
    path = poison(write(str(tmp_path / "bad")), value)
    reg = registry()
    with pytest.raises(LoRAError) as e:
        reg.add("bad", path)
    assert e.value.param == "lora_path"
    assert os.path.join(path, WEIGHTS_FILE) in str(e.value) and Q_A in str(e.value) and "NaN or inf" in str(e.value)
    assert "bad" not in reg.by_name
    config = EngineConfig(enable_lora=True, max_lora_rank=8, lora_modules={"bad": path})
    with pytest.raises(ConfigError) as ce:
        LoRARegistry(config, HF, "base")
    assert ce.value.param == "lora_modules.bad" and Q_A in str(ce.value)


def test_huge_finite_weights_accepted(tmp_path) -> None:
    """The NaN check sums each tensor first: finite values whose sum overflows to inf are still accepted."""
    path = poison(write(str(tmp_path / "huge")), 3e38)
    file = os.path.join(path, WEIGHTS_FILE)
    tensors = load_file(file)
    tensors[Q_A][0, 1] = 3e38  # two of them: the float32 sum is inf
    save_file(tensors, file)
    assert registry().add("huge", path).lora_name == "huge"


def test_weights_file_removed_after_the_files_check(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removed between check_adapter_files and the read (safetensors raised FileNotFoundError past the handler)."""
    from engine.lora import adapter

    path = write(str(tmp_path / "gone"))
    os.remove(os.path.join(path, WEIGHTS_FILE))
    monkeypatch.setattr(adapter, "check_adapter_files", lambda *args: {"r": 4})
    with pytest.raises(LoRAError, match="is not readable") as e:
        adapter.read_adapter(path, 1, adapter.ModelDims.from_hf(HF), 8, param="model")
    assert e.value.param == "model" and os.path.join(path, WEIGHTS_FILE) in str(e.value)


@pytest.fixture(scope="module")
def adapters(tiny_llama: str, tmp_path_factory) -> dict[str, str]:
    """Two peft adapters of the tiny Llama (their files copied per test before they are spoiled)."""
    return {name: write_adapter(tiny_llama, str(tmp_path_factory.mktemp(name)), 4, 8, ["q_proj", "v_proj"], False, i)
            for i, name in enumerate(("a", "b"))}


@pytest.fixture(scope="module")
def expected(tiny_llama: str, adapters: dict[str, str]) -> dict[str | None, list[int]]:
    """Greedy tokens after PROMPT: base model and each adapter, from healthy files."""
    llm = LLM(tiny_llama, enable_lora=True, max_loras=2, max_lora_rank=8, enable_prefix_caching=False)
    loras = [None, LoRARequest("a", 1, adapters["a"]), LoRARequest("b", 2, adapters["b"])]
    outs = llm.generate([PROMPT] * 3, PARAMS, use_tqdm=False, lora_request=loras)
    tokens = {name: o.outputs[0].token_ids for name, o in zip([None, "a", "b"], outs)}
    assert tokens["a"] != tokens[None] and tokens["b"] != tokens[None]  # the adapters matter: the tests can fail
    return tokens


def _llm(base: str, async_scheduling: bool) -> LLM:
    """One adapter on the device and one in host memory: two adapters alternating are read from disk again."""
    return LLM(base, enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8, enable_prefix_caching=False,
               async_scheduling=async_scheduling)


def _copy(adapters: dict[str, str], tmp_path) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, shutil.copytree(path, str(tmp_path / name)))
            for i, (name, path) in enumerate(adapters.items())}


def test_non_finite_offline_request_fails_alone(tiny_llama: str, adapters, expected, tmp_path) -> None:
    """An offline LoRARequest is checked on its header only; its weights are read in the step, where the NaN is
    found: that request fails naming model, the file and the tensor; the base model's and the other adapter's
    requests in the same step finish with their tokens."""
    loras = _copy(adapters, tmp_path)
    poison(loras["a"].lora_path, float("nan"))
    llm = LLM(tiny_llama, enable_lora=True, max_loras=2, max_lora_rank=8, enable_prefix_caching=False)
    bad, good, other = llm.generate([PROMPT] * 3, PARAMS, use_tqdm=False, lora_request=[loras["a"], None, loras["b"]])
    assert isinstance(bad.error, RequestError) and bad.error.param == "model", bad.error
    assert Q_A in str(bad.error) and os.path.join(loras["a"].lora_path, WEIGHTS_FILE) in str(bad.error)
    assert "NaN or inf" in str(bad.error)
    assert good.error is None and good.outputs[0].token_ids == expected[None]
    assert other.error is None and other.outputs[0].token_ids == expected["b"]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("fault", ["corrupt", "removed"])
def test_evicted_adapter_gone_bad_fails_its_requests_alone(tiny_llama: str, adapters, expected, tmp_path, fault: str,
                                                           async_scheduling: bool) -> None:
    """a is read, then evicted from the host cache by b (max_cpu_loras 1), then its file is corrupted (which the
    arrival check, config and file present, lets through) or its directory removed after its requests arrived: the
    step that reads it again fails a's requests alone; the base model's and b's finish with their tokens."""
    loras = _copy(adapters, tmp_path)
    llm = _llm(tiny_llama, async_scheduling)
    for name in ("a", "b"):  # a read, then evicted by b
        assert llm.generate([PROMPT], PARAMS, use_tqdm=False, lora_request=loras[name])[0].outputs[0].token_ids \
            == expected[name]
    engine = llm.llm_engine
    order = [("a1", loras["a"]), ("base", None), ("b", loras["b"]), ("a2", loras["a"])]
    if fault == "corrupt":
        with open(os.path.join(loras["a"].lora_path, WEIGHTS_FILE), "r+b") as f:
            f.truncate(100)
    for rid, lora in order:
        engine.add_request(rid, PROMPT, PARAMS, lora_request=lora)
    if fault == "removed":  # after the arrival check
        shutil.rmtree(loras["a"].lora_path)
    finished = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if len(finished) == len(order):
            break
    assert set(finished) == {rid for rid, _ in order}
    for rid in ("a1", "a2"):
        error = finished[rid].error
        assert isinstance(error, RequestError) and error.param == "model", error
        assert loras["a"].lora_path in str(error)
        assert ("corrupt" if fault == "corrupt" else "does not exist") in str(error), error
    assert finished["base"].error is None and finished["base"].outputs[0].token_ids == expected[None]
    assert finished["b"].error is None and finished["b"].outputs[0].token_ids == expected["b"]
    # the engine goes on serving, b and the base model
    outs = llm.generate([PROMPT] * 2, PARAMS, use_tqdm=False, lora_request=[loras["b"], None])
    assert [o.outputs[0].token_ids for o in outs] == [expected["b"], expected[None]]
