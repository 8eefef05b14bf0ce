"""shutdown() gives the engine's memory back while the LLM object lives on: a GPU test that built two engines in
one function found the first one's 126 GiB still held (a ConfigError naming gpu_memory_utilization for the
second). The weights, KV pages and buffers are dropped; using the runner afterwards is a clear error."""
from __future__ import annotations

import gc
import weakref

import pytest

from engine import LLM, SamplingParams


def test_shutdown_drops_weights_and_kv_pages(tiny_llama: str) -> None:
    llm = LLM(tiny_llama, dtype="float32", num_kv_blocks=64)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    runner = llm.llm_engine.executor.runner  # a caller's reference keeps the runner, not what it held
    weight = weakref.ref(next(runner.model.parameters()))
    page = weakref.ref(runner.attn_layers[0].k_cache)
    llm.llm_engine.shutdown()
    gc.collect()
    assert weight() is None and page() is None
    with pytest.raises(RuntimeError, match="ModelRunner.model: the engine was shut down"):
        runner.model
    llm.llm_engine.shutdown()  # twice is fine
