"""AWQ checkpoints (AutoAWQ's GEMM packing) written from tiny random Llama/Qwen2 models: greedy tokens
equal transformers' in float32 on the same dequantized weights; tp2 equals tp1; bad input is a typed
error naming the tensor or field. AutoAWQ pins an old torch, so the packer below mirrors its
WQLinear_GEMM.from_linear and is checked bit for bit against words that code produced."""
from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.config import ConfigError
from engine.errors import ModelLoadError
from engine.layers.quant.awq import AWQ_ORDER, awq_to_gptq, dequantize_awq
from engine.layers.quant.gptq import dequantize_gptq
from tests.engine.test_quant_gptq import (
    GREEDY,
    PROMPTS,
    Quantizer,
    digest,
    edited_copy,
    hf_greedy,
    kernel_matches_dequantize,
    pack_along,
    write_quantized,
)


def awq_quantizer(group: int) -> Quantizer:
    """AutoAWQ's pseudo_quantize_tensor (zero point, min-max per group; no activation-aware scaling:
    random weights) and WQLinear_GEMM.from_linear's packing: w [out, in] -> qweight [in, out / 8],
    qzeros [num_groups, out / 8], scales float16 [num_groups, out], and the float32 weights."""

    def quantize(module: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        size = w.shape[1] if group == -1 else group
        groups = w.reshape(w.shape[0], -1, size)  # [out, num_groups, group]
        lo, hi = groups.amin(-1), groups.amax(-1)
        scales = ((hi - lo).clamp(min=1e-5) / 15).half()  # [out, num_groups]
        zeros = (-torch.round(lo / scales.float())).clamp(0, 15)
        q = torch.clamp(torch.round(groups / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1), 0, 15)
        deq = ((q - zeros.unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(w.shape)  # [out, in]
        tensors = {"qweight": pack_along(q.reshape(w.shape).t(), 4, 1, AWQ_ORDER),
                   "qzeros": pack_along(zeros.t(), 4, 1, AWQ_ORDER), "scales": scales.t()}
        return tensors, deq

    return quantize


def write_awq(path: str, arch: str, group: int, intermediate_size: int = 512) -> tuple[str, str]:
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None}
    return write_quantized(path, arch, awq_quantizer(group), qc, intermediate_size)


def test_packer_matches_autoawq_bit_for_bit() -> None:
    """Digests of the words AutoAWQ 0.2.9's WQLinear_GEMM.from_linear (awq/modules/linear/gemm.py, run on
    CPU) wrote for this 64-input, 32-output, group-32 linear; its dequantize_gemm gave back exactly w."""
    q = (37 * torch.arange(32)[:, None] + 11 * torch.arange(64)) % 16  # [out, in]
    zeros = (7 * torch.arange(2)[:, None] + 13 * torch.arange(32)) % 15 + 1  # [num_groups, out]
    scales = ((torch.arange(2)[:, None] + torch.arange(32)) % 4 + 1).float() / 64  # [num_groups, out]
    qweight, qzeros = pack_along(q.t(), 4, 1, AWQ_ORDER), pack_along(zeros, 4, 1, AWQ_ORDER)
    assert (digest(qweight), digest(qzeros)) == ("da19127b3c589e13", "37df0696105e7294")
    g = torch.arange(64) // 32
    w = (q - zeros[g].t()).float() * scales[g].t()
    assert torch.equal(dequantize_awq(qweight, qzeros, scales, 32), w)
    # repacked to the gptq_v2 layout at load: the same weights
    assert torch.equal(dequantize_gptq(*awq_to_gptq(qweight, qzeros), scales, None, 4, 32), w)


CASES = {"llama-g128": ("LlamaForCausalLM", 128), "qwen2-g64": ("Qwen2ForCausalLM", 64),
         "llama-g32": ("LlamaForCausalLM", 32)}


@pytest.fixture(scope="module", params=list(CASES))
def awq(request, tmp_path_factory) -> tuple[str, str]:
    return write_awq(str(tmp_path_factory.mktemp("awq") / request.param), *CASES[request.param])


def test_greedy_matches_transformers(awq: tuple[str, str]) -> None:
    path, reference = awq
    llm = LLM(path, enable_prefix_caching=False, device="cpu")  # float32, as the reference (GPU: kernel test)
    assert llm.llm_engine.model_config.quantization == "awq"
    layer = llm.llm_engine.executor.runner.model.model.layers["0"].self_attn.qkv_proj
    assert layer.weight is None and layer.qweight.dtype == torch.int32  # kept packed
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(reference)


@pytest.fixture(scope="module")
def one_awq(tmp_path_factory) -> tuple[str, str]:
    return write_awq(str(tmp_path_factory.mktemp("awq") / "one"), "LlamaForCausalLM", 64)


def test_quantization_contradicting_the_checkpoint(one_awq: tuple[str, str]) -> None:
    path, reference = one_awq
    for wrong in ("gptq", "none", "gguf"):
        with pytest.raises(ConfigError) as e:
            LLM(path, quantization=wrong)
        assert e.value.param == "quantization"
    with pytest.raises(ConfigError, match="not quantized") as e:
        LLM(reference, quantization="awq")
    assert e.value.param == "quantization"


@pytest.mark.parametrize("field,value", [("bits", 8), ("group_size", "128"), ("zero_point", False),
                                         ("version", "gemv"), ("modules_to_not_convert", ["mlp"])])
def test_unsupported_config_names_the_field(one_awq: tuple[str, str], tmp_path, field: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        LLM(edited_copy(one_awq[0], str(tmp_path / "bad"), config={field: value}))
    assert e.value.param == f"quantization_config.{field}"


def test_missing_scales_name_the_tensor(one_awq: tuple[str, str], tmp_path) -> None:
    bad = edited_copy(one_awq[0], str(tmp_path / "bad"), drop="model.layers.2.self_attn.k_proj.scales")
    with pytest.raises(ModelLoadError, match=r"missing weights: model\.layers\.2\.self_attn\.qkv_proj\.scales:k"):
        LLM(bad)


@pytest.mark.slow
def test_tp2_matches_tp1_and_a_cut_group_is_named(tmp_path) -> None:
    """qweight and qzeros are packed along the output dim: column-parallel shards split words, row-parallel
    ones split rows and groups."""
    from tests.engine.quant_tp2 import assert_tp2_equals_tp1, tp2_load_failure

    assert_tp2_equals_tp1(write_awq(str(tmp_path / "g64"), "Qwen2ForCausalLM", 64)[0], tmp_path)
    bad, _ = write_awq(str(tmp_path / "cut"), "LlamaForCausalLM", 128, intermediate_size=384)
    text = tp2_load_failure(bad, tmp_path)
    assert "model.layers.0.mlp.down_proj." in text  # the first of its tensors loaded
    assert "group size 128 does not divide this rank's 192 input columns" in text


@pytest.mark.slow
def test_kernel_matches_dequantize(tmp_path) -> None:
    kernel_matches_dequantize(write_awq(str(tmp_path / "g32"), "LlamaForCausalLM", 32)[0])


def test_a_shard_splitting_a_packed_word_is_refused() -> None:
    """Output rows packed 8 a word: a shard boundary inside a word cannot be loaded (a RuntimeError the
    loader reports with the tensor's name)."""
    from engine.layers.quant.packed import PackedDest, PackedSource

    words = torch.arange(8, dtype=torch.int32).reshape(4, 2)  # stored [in, out / 8]
    source = PackedSource(words, 8)
    assert source.get_shape() == [16, 4] and torch.equal(source[8:16, :], words[:, 1:].t())
    with pytest.raises(RuntimeError, match=r"rows \[0, 12\) split a word of 8"):
        source[0:12, :]
    with pytest.raises(RuntimeError, match=r"rows \[4, 8\) split a word of 8"):
        PackedDest(torch.zeros(2, 4, dtype=torch.int32), 8).narrow(0, 4, 4)
