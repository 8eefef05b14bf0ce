"""A checkpoint written by llm-compressor itself (#14): oneshot with QuantizationModifier FP8_DYNAMIC (per-channel
e4m3 weights, per-token activations) on a tiny random Llama, on CPU. It loads and its teacher-forced top-1 agrees
with compressed-tensors' decompression of the same checkpoint (transformers, dequantize=True) run in float32 on
>= 90% of the positions whose float32 top-2 margin exceeds 0.1: on CPU through the labelled emulation, on a GPU
natively (skipped without CUDA). llm-compressor pins an older transformers: scripts/test.sh installs it with
`--no-deps` (and `datasets`, its import's need, with the test extras); skipped without it. For a GPU machine without it:
`python -m tests.engine.test_fp8_llmcompressor DIR` here, then GANTRY_LLMCOMPRESSOR_CHECKPOINT=DIR there."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from engine import LLM
from engine.layers.quant.fp8_support import EMULATE_ENV
from tests.conftest import write_tiny_checkpoint
from tests.engine.test_fp8 import SHAPE, agreement, engine_top1, hf_top1

FP8 = torch.float8_e4m3fn
MIN_AGREEMENT = 0.9  # the issue's line: only the activations' per-token FP8 separates the two
# weights ~N(0, 0.05): a random net at 0.1 or more turns any small perturbation chaotic (measured on CPU at
# margin > 0.1: 0.893 at 0.1, 0.645 at 0.25); at 0.05, 182 of 317 positions exceed the margin, all agree
LC_SHAPE = {**SHAPE, "initializer_range": 0.05}
CHECKPOINT_ENV = "GANTRY_LLMCOMPRESSOR_CHECKPOINT"


def write_llmcompressor_checkpoint(root: str, **shape: object) -> tuple[str, str]:
    """(the FP8 checkpoint llm-compressor's oneshot writes from a random Llama, its float32 decompression by
    compressed-tensors through transformers) under root."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    src = write_tiny_checkpoint(os.path.join(root, "float"), "LlamaForCausalLM", tie=False, **shape)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)  # oneshot reads its config from src
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]))
    dst, ref = os.path.join(root, "fp8"), os.path.join(root, "decompressed")
    model.save_pretrained(dst, save_compressed=True)
    decompressed = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32,
                                                        quantization_config=CompressedTensorsConfig(dequantize=True))
    assert decompressed.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    decompressed.save_pretrained(ref)
    for name in os.listdir(src):  # the tokenizer
        for target in (dst, ref):
            if not os.path.exists(os.path.join(target, name)):
                shutil.copy(os.path.join(src, name), target)
    return dst, ref


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    written = os.environ.get(CHECKPOINT_ENV)
    if written:  # written earlier by this module's __main__ (where llm-compressor is installed)
        return os.path.join(written, "fp8"), os.path.join(written, "decompressed")
    pytest.importorskip("llmcompressor", reason="llm-compressor not installed (pip install --no-deps llmcompressor)")
    return write_llmcompressor_checkpoint(str(tmp_path_factory.mktemp("llmcompressor")), **LC_SHAPE)


def test_llmcompressor_checkpoint_written_as_expected(checkpoints: tuple[str, str]) -> None:
    """What the engine meets: compressed-tensors float-quantized, channel weights, dynamic token activations."""
    import json

    from safetensors import safe_open

    dst, _ = checkpoints
    with open(os.path.join(dst, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "float-quantized" and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["dynamic"] and group["input_activations"]["strategy"] == "token"
    with safe_open(os.path.join(dst, "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight_scale").get_shape() == [SHAPE["hidden_size"], 1]


def test_llmcompressor_checkpoint_matches_decompressed_float32_cpu(checkpoints: tuple[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EMULATE_ENV, "1")
    dst, ref = checkpoints
    # on the CPU wherever it runs: the exact equality below is of CPU float32 sums (on the H200 the two runs
    # differed in one prompt's tokens, 2026-12-03)
    llm = LLM(dst, dtype="float32", device="cpu", enable_prefix_caching=False)  # quantization auto: the checkpoint's
    assert llm.llm_engine.model_config.quantization == "compressed-tensors"
    runner = llm.llm_engine.executor.runner
    assert runner.model.model.layers["1"].mlp.gate_up_proj.weight.dtype == FP8
    assert runner.model.lm_head.weight.dtype == torch.float32  # ignored by the recipe: stays float
    top1 = engine_top1(llm)
    llm.llm_engine.shutdown()
    assert agreement(top1, hf_top1(ref)) >= MIN_AGREEMENT
    # llm-compressor's min-max scales are ours: the decompressed weights quantized at load give the same model
    again = LLM(ref, dtype="float32", device="cpu", quantization="fp8", enable_prefix_caching=False)
    assert engine_top1(again) == top1
    again.llm_engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compute capability >= 8.9 for FP8)")
def test_llmcompressor_checkpoint_matches_decompressed_float32_gpu(checkpoints: tuple[str, str]) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    dst, ref = checkpoints
    llm = LLM(dst, dtype="bfloat16", enable_prefix_caching=False)
    assert agreement(engine_top1(llm), hf_top1(ref)) >= MIN_AGREEMENT
    llm.llm_engine.shutdown()


if __name__ == "__main__":
    import sys

    print(write_llmcompressor_checkpoint(sys.argv[1], **LC_SHAPE))
