"""compressed-tensors pack-quantized checkpoints (W4A16 and W8A16, group 128) written on CPU by
compressed-tensors itself from tiny random Llama/Qwen2 models: greedy tokens equal transformers'
(running compressed-tensors' own decompression) in float32; missing scales and a tp shard that
cuts a group are typed errors naming the tensor."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ConfigError
from engine.errors import ModelLoadError
from tests.conftest import (
    edit_config,
    prompts_of_lengths,
    write_tiny_checkpoint,
    write_tiny_tokenizer,
)

pytest.importorskip("compressed_tensors")
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = prompts_of_lengths([1, 5, 17, 40])


def write_compressed(path: str, arch: str, scheme: str, intermediate_size: int = 512,
                     targets: tuple[str, ...] = ("Linear",), ignore: tuple[str, ...] = ("lm_head",)) -> str:
    """A tiny random model quantized (min-max scales, compressed-tensors' own qparams) and saved
    pack-quantized by compressed-tensors; targets ("Linear", "Embedding") packs the token embedding too,
    ignore () the LM head."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    src = write_tiny_checkpoint(path + "-float", arch, tie=False, hidden_size=256, intermediate_size=intermediate_size)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(scheme, list(targets))},
                                ignore=list(ignore))
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            args, w = module.quantization_scheme.weights, module.weight.data
            groups = w.reshape(w.shape[0], -1, args.group_size)  # [out, num_groups, group_size]
            scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    write_tiny_tokenizer(path, model.config.vocab_size)
    return path


def hf_greedy(path: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return [hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist() for p in PROMPTS]


@pytest.fixture(scope="module", params=[("LlamaForCausalLM", "W4A16"), ("Qwen2ForCausalLM", "W4A16"),
                                        ("LlamaForCausalLM", "W8A16")])
def compressed(request, tmp_path_factory) -> str:
    arch, scheme = request.param
    return write_compressed(str(tmp_path_factory.mktemp("ct") / f"{arch}-{scheme}"), arch, scheme)


def test_greedy_matches_transformers(compressed: str) -> None:
    llm = LLM(compressed, enable_prefix_caching=False)
    assert llm.llm_engine.model_config.quantization == "compressed-tensors"
    layer = llm.llm_engine.executor.runner.model.model.layers["0"].mlp.down_proj
    assert layer.weight is None and layer.weight_packed.dtype == torch.int32  # kept packed
    assert layer.weight_packed.stride(0) == layer.weight_scale.stride(0) == 1  # stored out-major for the GEMV
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(compressed)


def decompressed_reference(path: str, scheme: str) -> str:
    """A float32 copy of compressed checkpoint `path` whose packed tensors compressed-tensors' own
    PackedQuantizationCompressor decompressed (transformers cannot load a packed embedding itself)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from safetensors.torch import load_file, save_file

    ref = path + "-ref"
    shutil.copytree(path + "-float", ref)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    scheme_args = preset_name_to_scheme(scheme, ["Linear"])
    out = {name: t for name, t in tensors.items() if not name.rsplit(".", 1)[-1].startswith("weight_")}
    for name in tensors:
        if name.endswith(".weight_packed"):
            module = name[: -len(".weight_packed")]
            parts = {k: tensors[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
            out[f"{module}.weight"] = PackedQuantizationCompressor.decompress(parts, scheme_args)["weight"].float()
    save_file(out, os.path.join(ref, "model.safetensors"), metadata={"format": "pt"})
    return ref


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_packed_embedding_and_lm_head(arch: str, tmp_path) -> None:
    """targets Linear and Embedding, nothing ignored: the token embedding and the LM head stay packed too
    (a 4-bit model's last float tables); greedy equal to transformers on compressed-tensors' decompression."""
    path = write_compressed(str(tmp_path / "all"), arch, "W4A16", targets=("Linear", "Embedding"), ignore=())
    llm = LLM(path, enable_prefix_caching=False)
    model = llm.llm_engine.executor.runner.model
    for module in (model.model.embed_tokens, model.lm_head):
        assert module.weight is None and module.weight_packed.dtype == torch.int32
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(decompressed_reference(path, "W4A16"))


def test_packed_embedding_tied_to_a_float_head_is_named(tmp_path) -> None:
    path = write_compressed(str(tmp_path / "emb"), "LlamaForCausalLM", "W4A16", targets=("Linear", "Embedding"))
    with pytest.raises(ConfigError) as e:
        LLM(edit_config(path, tie_word_embeddings=True))
    assert e.value.param == "quantization_config.config_groups"


def test_quantization_contradicting_the_checkpoint(compressed: str) -> None:
    for wrong in ("gptq", "none", "gguf"):
        with pytest.raises(ConfigError) as e:
            LLM(compressed, quantization=wrong)
        assert e.value.param == "quantization"


def test_missing_scales_name_the_tensor(compressed: str, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    for name in os.listdir(compressed):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(compressed, name), tmp_path / name)
    tensors = load_file(os.path.join(compressed, "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing weights: model\.layers\.1\.mlp\.down_proj\.weight_scale"):
        LLM(str(tmp_path))


@pytest.mark.slow
def test_tp2_matches_tp1_and_a_cut_group_is_named(tmp_path) -> None:
    from tests.engine.quant_tp2 import assert_tp2_equals_tp1, tp2_load_failure

    assert_tp2_equals_tp1(write_compressed(str(tmp_path / "w4"), "LlamaForCausalLM", "W4A16"), tmp_path)
    # the token embedding and the LM head packed too: their vocabulary rows split like the float tables
    assert_tp2_equals_tp1(write_compressed(str(tmp_path / "all"), "LlamaForCausalLM", "W4A16",
                                           targets=("Linear", "Embedding"), ignore=()), tmp_path)
    # intermediate 384 over 2 ranks: 192 input columns of down_proj per rank, not a multiple of 128
    bad = write_compressed(str(tmp_path / "cut"), "LlamaForCausalLM", "W4A16", intermediate_size=384)
    text = tp2_load_failure(bad, tmp_path)
    assert "model.layers.0.mlp.down_proj.weight_packed" in text and "group size 128 does not divide" in text
