"""gantry_kernels/cpu_layer.py: a Llama decoder layer in one C call, bit-equal to the layer run op by op (same
C kernels), on a tiny GGUF served by LLM (prefill, chunks, batched decode; Q4_0, Q4_1, Q8_0 linears);
layers it cannot run fall back; a change in a #included C file rebuilds the library."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine import LLM, SamplingParams
from engine.models import llama
from gantry_kernels import cpu_layer, cpu_native
from tests.conftest import prompts_of_lengths
from tests.engine.test_quant_gguf import write_tiny_gguf


@pytest.fixture(autouse=True)
def _native() -> None:
    if cpu_layer._native() is None:
        pytest.skip("no AVX2 or no C compiler: the layer runs op by op")


def _op_by_op(layer: llama.LlamaDecoderLayer, positions: torch.Tensor, x: torch.Tensor,
              residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaDecoderLayer.forward without the fused branch."""
    if residual is None:
        h, residual = layer.input_layernorm(x), x
    else:
        h, residual = layer.input_layernorm(x, residual)
    h = layer.self_attn(positions, h)
    h, residual = layer.post_attention_layernorm(h, residual)
    return layer.mlp(h), residual


def test_fused_layer_is_bit_equal_to_op_by_op(tmp_path, monkeypatch) -> None:
    path = write_tiny_gguf(str(tmp_path / "t.gguf"), hidden=128, intermediate=256, heads=4, kv_heads=2,
                           types={"ffn_down": Q.Q4_0, "attn_output": Q.Q8_0})
    llm = LLM(path, enable_prefix_caching=False, max_num_batched_tokens=64, max_num_seqs=4, device="cpu")
    fused = cpu_layer.decoder_layer
    seen = {"first": 0, "decode": 0, "prefill": 0}

    def both(layer, positions, x, residual):
        got = fused(layer, positions, x, residual)
        assert got is not None, "a layer of a Q4_0/Q4_1/Q8_0 Llama did not run fused"
        # the op-by-op run stores the same K/V again into the same slots, then attends
        want = _op_by_op(layer, positions, x, residual)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        seen["first" if residual is None else "decode" if x.shape[0] <= 4 else "prefill"] += 1
        return got

    monkeypatch.setattr(llama.cpu_layer, "decoder_layer", both)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate(prompts_of_lengths([1, 7, 40, 90]), params, use_tqdm=False)  # 90: chunked prefill
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
    assert min(seen.values()) > 0, seen
    monkeypatch.undo()
    # and the tokens equal those of the op-by-op layers
    for layer in llm.llm_engine.executor.runner.model.model.layers.values():
        layer._cpu_layer_args = None
    again = llm.generate(prompts_of_lengths([1, 7, 40, 90]), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs]


def test_layers_it_cannot_run_fall_back(tmp_path) -> None:
    """A float o_proj (an F32 tensor in the GGUF) is not blocks: that layer runs op by op."""
    path = write_tiny_gguf(str(tmp_path / "k.gguf"), types={"blk.1.attn_output": Q.F32})
    llm = LLM(path, enable_prefix_caching=False, device="cpu")
    out = llm.generate(prompts_of_lengths([5]), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    layers = llm.llm_engine.executor.runner.model.model.layers
    assert layers["0"]._cpu_layer_args is not None and layers["1"]._cpu_layer_args is None


def test_an_included_source_change_rebuilds(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "inc.c").write_text("static int value(void) { return 1; }\n")
    (tmp_path / "top.c").write_text('#include "inc.c"\nint get(void) { return value(); }\n')
    deps = (str(tmp_path / "inc.c"),)
    assert cpu_native._build(str(tmp_path / "top.c"), deps).get() == 1
    (tmp_path / "inc.c").write_text("static int value(void) { return 2; }\n")
    assert cpu_native._build(str(tmp_path / "top.c"), deps).get() == 2
