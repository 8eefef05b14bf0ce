"""load_format=dummy with an integer-quantized config (what benchmarks/quant_bench.py runs): packed
words random, scales such that the dequantized weights stay in the float dummy range, and it generates."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers.quant.dummy import (
    DUMMY_RANGE,
    add_quantization_config,
    compressed_tensors_config,
)
from tests.conftest import write_tiny_checkpoint


@pytest.mark.parametrize("bits,tables", [(4, False), (8, False), (4, True)])
def test_dummy_compressed_tensors_checkpoint(bits: int, tables: bool, tmp_path) -> None:
    """tables: the token embedding and the LM head packed too, and random like the layers."""
    path = write_tiny_checkpoint(str(tmp_path / "m"), "Qwen2ForCausalLM", tie=False, hidden_size=256,
                                 intermediate_size=384)
    add_quantization_config(path, compressed_tensors_config(bits, 128, lm_head=tables, embedding=tables))
    llm = LLM(path, load_format="dummy", enable_prefix_caching=False)
    model = llm.llm_engine.executor.runner.model
    layer = model.model.layers["1"].mlp.down_proj
    packed = layer.weight_packed
    assert packed.dtype == torch.int32 and packed.shape == (256, 384 * bits // 32)
    assert packed.unique().numel() > packed.numel() // 2  # random words, not a constant fill
    for module in (layer, model.model.embed_tokens, model.lm_head) if tables else (layer,):
        w = module.quant_method.dequantize(module).float()
        assert w.abs().max() <= DUMMY_RANGE * 1.01 and w.std() > DUMMY_RANGE / 10
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("desc_act,lm_head", [(False, True), (True, False)])
def test_dummy_gptq_checkpoint(desc_act: bool, lm_head: bool, tmp_path) -> None:
    """GPTQ's tensors too: random words, midpoint zeros, group-order g_idx (a valid desc_act permutation);
    with lm_head: true the LM head's as well."""
    path = write_tiny_checkpoint(str(tmp_path / "m"), "LlamaForCausalLM", tie=False, hidden_size=256,
                                 intermediate_size=384)
    add_quantization_config(path, {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": desc_act,
                                   "sym": True, "checkpoint_format": "gptq" if lm_head else "gptq_v2",
                                   "lm_head": lm_head})
    llm = LLM(path, load_format="dummy", enable_prefix_caching=False)
    model = llm.llm_engine.executor.runner.model
    layer = model.model.layers["1"].mlp.down_proj
    assert torch.equal(layer.g_idx, torch.arange(384, dtype=torch.int32) // 128)
    assert layer.midpoint_zeros  # symmetric, as stored in the config's format: the kernels skip the zero points
    for module in (layer, model.lm_head) if lm_head else (layer,):
        w = module.quant_method.dequantize(module).float()
        assert w.abs().max() <= DUMMY_RANGE * 1.01 and w.std() > DUMMY_RANGE / 10
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
