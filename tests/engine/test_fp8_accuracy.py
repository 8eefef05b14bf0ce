"""FP8 on trained weights, short (#14; the full figure: benchmarks/fp8_accuracy.py): the embedded SmolLM2,
dequantized, then FP8 weights or FP8 KV pages through the CPU emulation; teacher-forced top-1 agrees
with the same engine in float32 on most of 252 positions of English text."""
from __future__ import annotations

import pytest

from benchmarks.fp8_accuracy import agreement, engine_top1, token_sequences
from engine.layers.quant.fp8_support import EMULATE_ENV


@pytest.fixture(scope="module")
def setup(smollm2_path: str) -> tuple[str, list[list[int]], list[int]]:
    seqs = token_sequences(smollm2_path, 4, 64)
    return smollm2_path, seqs, engine_top1(smollm2_path, seqs, dtype="float32")


# measured on CPU: 0.857 (FP8 weights) and 0.960 (FP8 KV); bf16 alone agrees on 0.976 of them
@pytest.mark.parametrize("engine,minimum", [({"quantization": "fp8"}, 0.8), ({"kv_cache_dtype": "fp8"}, 0.92)])
def test_fp8_top1_agreement_on_smollm2(setup, monkeypatch: pytest.MonkeyPatch, engine: dict, minimum: float) -> None:
    path, seqs, reference = setup
    monkeypatch.setenv(EMULATE_ENV, "1")
    assert len(reference) == 252
    assert agreement(engine_top1(path, seqs, dtype="float32", **engine), reference) >= minimum
