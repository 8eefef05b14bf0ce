"""KV pool sizing (#13 Deliver 4, #14 FP8 KV): a dropped engine gives its weights and pages back, so the
next engine in the process sizes its pool on free memory (a frozen weight_loader cycle kept every
weight: on the H200 each later engine's pool was 15 GB short); pages cost what kv_bytes_per_block says;
the GPU budget arithmetic turns freed weight bytes into tokens and FP8 pages into twice the tokens; the
model-loaded log line states the weights' size and quantization."""
from __future__ import annotations

import gc
import logging
import weakref
from types import SimpleNamespace

import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers.quant.dummy import (
    AWQ_4BIT,
    GPTQ_4BIT,
    add_quantization_config,
    compressed_tensors_config,
)
from engine.layers.quant.fp8_support import EMULATE_ENV
from engine.loader import weight_bytes
from engine.kv_pool import MemoryAtStart, memory_at_start
from engine.model_runner import ModelRunner
from tests.conftest import write_tiny_checkpoint

QUANT_CONFIGS = {  # config.json's quantization_config per case (None: plain weights)
    "plain": None,
    "w4a16": compressed_tensors_config(4, 128),
    "gptq": GPTQ_4BIT,
    "awq": AWQ_4BIT,
}
ENGINE_ARGS = {"plain": {}, "w4a16": {}, "gptq": {}, "awq": {}, "fp8": {"quantization": "fp8"},
               "fp8_kv": {"kv_cache_dtype": "fp8"}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny Qwen2 whose linear dims take group 128 (the safetensors are for the real-load case)."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("pool")), "Qwen2ForCausalLM", tie=False,
                                 hidden_size=256, intermediate_size=384, num_hidden_layers=2)


def _with_quant(checkpoint: str, case: str, tmp_path) -> str:
    qc = QUANT_CONFIGS.get(case)
    if qc is None:
        return checkpoint
    return add_quantization_config(checkpoint, qc, str(tmp_path / case))


def _run_and_drop(path: str, load_format: str, **engine) -> tuple[list[weakref.ref], int]:
    """Start an engine, generate, shut it down and drop it; weak references to its parameters and
    pages (what a GPU engine keeps on the device), and how many there were."""
    llm = LLM(path, load_format=load_format, enable_prefix_caching=False, num_kv_blocks=16, max_model_len=256, **engine)
    runner = llm.llm_engine.executor.runner
    tensors = list(runner.model.parameters())
    tensors += [t for a in runner.attn_layers for t in (a.k_cache, a.v_cache)]
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    llm.llm_engine.shutdown()
    return [weakref.ref(t) for t in tensors], len(tensors)


@pytest.mark.parametrize("case", list(ENGINE_ARGS))
def test_a_dropped_engine_frees_its_weights_and_pages(case: str, checkpoint: str, tmp_path, monkeypatch) -> None:
    """After the engine's last reference goes and one collection runs, none of its parameters or KV
    pages is alive (before the fix every linear and embedding weight stayed, in every case)."""
    if case.startswith("fp8"):
        monkeypatch.setenv(EMULATE_ENV, "1")
    refs, count = _run_and_drop(_with_quant(checkpoint, case, tmp_path), "dummy", **ENGINE_ARGS[case])
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {count} weight / page tensors outlived their engine ({case})"


def test_real_checkpoint_load_frees_its_weights_too(checkpoint: str) -> None:
    """The safetensors path gives every tensor to a weight_loader as well: same cycle, same fix."""
    refs, count = _run_and_drop(checkpoint, "auto")
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {count} weight / page tensors outlived their engine"


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_bytes_per_block_are_the_pages_bytes(kv_cache_dtype: str, checkpoint: str, monkeypatch) -> None:
    """kv_bytes_per_block (what the pool is sized by) equals what allocate_kv_cache really takes a block."""
    monkeypatch.setenv(EMULATE_ENV, "1")
    llm = LLM(checkpoint, load_format="dummy", enable_prefix_caching=False, num_kv_blocks=8, max_model_len=128,
              kv_cache_dtype=kv_cache_dtype)
    runner = llm.llm_engine.executor.runner
    try:
        pages = sum(t.nbytes for a in runner.attn_layers for t in (a.k_cache, a.v_cache))
        assert pages == 8 * runner.kv_bytes_per_block()
        model_bytes = torch.empty(0, dtype=runner.model_config.dtype).element_size()  # float32 on CPU, bf16 on a GPU
        assert runner.attn_layers[0].k_cache.element_size() == (1 if kv_cache_dtype == "fp8" else model_bytes)
    finally:
        llm.llm_engine.shutdown()


class _FakeCuda:
    """torch.cuda's memory queries for a device of `total` bytes where this process holds `allocated`
    (weights), peaks `activations` above it in the profile run and others hold `others`."""

    def __init__(self, monkeypatch, total: int, allocated: int, activations: int, others: int):
        self.allocated, self.peak = allocated, allocated + activations
        reserved = self.peak  # the caching allocator keeps the profile run's blocks until empty_cache
        for name in ("empty_cache", "synchronize", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (total - reserved - others, total))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: self.peak)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: self.allocated)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: reserved)


def _fake_runner(kv_dtype: torch.dtype, start: MemoryAtStart = MemoryAtStart(0, 0)) -> ModelRunner:
    """W1's attention (Qwen2-7B: 28 layers, 4 KV heads of 128) on a pretend GPU, profile run stubbed; `start`:
    what the GPU held before this engine."""
    runner = ModelRunner.__new__(ModelRunner)
    runner.memory_at_start = start
    runner.config = SimpleNamespace(num_kv_blocks=None, kv_cache_memory_gib=None, gpu_memory_utilization=0.9)
    runner.device, runner.block_size, runner.kv_cache_dtype = torch.device("cuda"), 16, kv_dtype
    runner.attn_layers = [SimpleNamespace(num_kv_heads=4, head_dim=128)] * 28
    runner._profile_run = lambda: None
    return runner


def test_gpu_budget_turns_freed_weights_and_fp8_pages_into_tokens(monkeypatch) -> None:
    """The H200's W1 figures through determine_num_blocks' arithmetic: 4-bit weights (5.55 GB for
    15.23) add what they free to the pool, FP8 pages hold twice the tokens of bf16 ones."""
    total, acts, others = 150_000_000_000, 3_000_000_000, 600_000_000
    tokens = {}
    for name, weights, kv_dtype in (("bf16", 15_230_000_000, torch.bfloat16), ("w4", 5_550_000_000, torch.bfloat16),
                                    ("fp8_kv", 15_230_000_000, torch.float8_e4m3fn)):
        _FakeCuda(monkeypatch, total, weights, acts, others)
        runner = _fake_runner(kv_dtype)
        tokens[name] = runner.determine_num_blocks() * runner.block_size
        expected = (total * 0.9 - weights - acts - others) / (runner.kv_bytes_per_block() / runner.block_size)
        assert expected - runner.block_size < tokens[name] <= expected
        assert runner.kv_budget["profile_activations"] == acts
        assert runner.kv_budget["outside_allocator_growth"] == others
    assert tokens["fp8_kv"] / tokens["bf16"] >= 1.9999
    per_token = 2 * 28 * 4 * 128 * 2
    assert abs(tokens["w4"] - tokens["bf16"] - (15_230_000_000 - 5_550_000_000) / per_token) <= 16


@pytest.mark.parametrize("case", ["plain", "gptq"])
def test_model_loaded_line_states_weight_bytes_and_quantization(case: str, checkpoint: str, tmp_path, caplog) -> None:
    """#13 Deliver 4: the "model loaded" log line gives the weights' size on this rank and the quantization."""
    caplog.set_level(logging.INFO, logger="gantry.engine")
    llm = LLM(_with_quant(checkpoint, case, tmp_path), load_format="dummy", num_kv_blocks=8, max_model_len=128)
    mib = weight_bytes(llm.llm_engine.executor.runner.model) / 2**20
    llm.llm_engine.shutdown()
    lines = [r.getMessage() for r in caplog.records if " loaded: " in r.getMessage()]
    quantization = "none" if case == "plain" else case
    assert len(lines) == 1 and f"weights {mib:.1f} MiB on this rank, quantization {quantization}" in lines[0], lines


def test_memory_held_before_the_engine_started_is_not_its_own(monkeypatch) -> None:
    """vLLM v1's per-instance gpu_memory_utilization: another engine in this process (its allocations) or another
    process (memory outside the allocator) present at start-up does not shrink this engine's pool; memory outside
    the allocator that grows while the engine starts (workspaces) does."""
    total, weights, acts = 150_000_000_000, 15_230_000_000, 3_000_000_000
    earlier_engine, other_process, workspaces = 40_000_000_000, 30_000_000_000, 500_000_000
    _FakeCuda(monkeypatch, total, earlier_engine + weights, acts, other_process + workspaces)
    runner = _fake_runner(torch.bfloat16, MemoryAtStart(earlier_engine, other_process))
    runner.config.gpu_memory_utilization = 0.45
    tokens = runner.determine_num_blocks() * runner.block_size
    expected = (total * 0.45 - weights - acts - workspaces) / (runner.kv_bytes_per_block() / runner.block_size)
    assert expected - runner.block_size < tokens <= expected
    assert runner.kv_budget["weights"] == weights and runner.kv_budget["outside_allocator_growth"] == workspaces


def test_less_free_than_the_utilization_asks_is_a_config_error(monkeypatch) -> None:
    from engine.config import ConfigError

    _FakeCuda(monkeypatch, 100_000_000_000, 0, 0, 60_000_000_000)  # 40 GB free
    assert memory_at_start(torch.device("cuda"), 0.4) == MemoryAtStart(0, 60_000_000_000)
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization: 0.5 of cuda's 93.1 GiB is 46.6 GiB, but only "
                                          r"37.3 GiB is free"):
        memory_at_start(torch.device("cuda"), 0.5)
