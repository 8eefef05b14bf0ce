"""FP8 (#14) on CPU through the labelled emulation (GANTRY_FP8_EMULATE=1: FP8 values and scales as on a
GPU, float32 matmuls): each checkpoint format's teacher-forced top-1 agrees with transformers float32 on
its dequantized weights (a random tiny model amplifies FP8's ~4% error per matmul, hence 75%; trained
weights: benchmarks/fp8_accuracy.py), per-channel and block checkpoints equal quantization=fp8 on those
weights exactly (the per-channel one also as compressed-tensors itself writes it; per tensor and blocks
in the same tensor layout, written here with safetensors); FP8 KV pages hold more tokens; checkpoint KV
scales are used; without a GPU or the switch a ConfigError names the field."""
from __future__ import annotations

import gc
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM as _LLM
from engine import SamplingParams
from engine.config import ConfigError
from engine.layers.quant.dummy import add_quantization_config
from engine.layers.quant.fp8_support import EMULATE_ENV
from tests.conftest import edit_config, prompts_of_lengths, write_tiny_checkpoint

FP8 = torch.float8_e4m3fn


def LLM(*args: object, **kwargs: object) -> _LLM:  # noqa: N802 - stands in for the class
    """These tests check the CPU emulation CI runs; on a GPU machine the same engines run on the CPU too
    (the GPU paths have their own tests: tests/kernels/test_fp8_*.py, test_fp8_llmcompressor.py)."""
    return _LLM(*args, device="cpu", **kwargs)
PROMPTS = prompts_of_lengths([40, 64, 97, 120], seed=3)
# k/v: 64 rows (a partial 128-row block); weights ~N(0, 0.1): less chaotic than the default 0.25
SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
         "initializer_range": 0.1}
MIN_AGREEMENT = 0.75
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EMULATE_ENV, "1")


def engine_top1(llm: LLM) -> list[list[int]]:
    """Teacher-forced top-1 at every prompt position after the first (prompt_logprobs' rank-1 token)."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [[next(t for t, lp in e.items() if lp.rank == 1) for e in o.prompt_logprobs[1:]] for o in outputs]


def hf_top1(path: str) -> tuple[list[list[int]], list[list[float]]]:
    """transformers float32: (top-1, top-1 minus top-2 logit) per position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tops, margins = [], []
    for prompt in PROMPTS:
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, :-1]  # [len - 1, vocab]
        top2 = logits.topk(2, dim=-1).values
        tops.append(logits.argmax(-1).tolist())
        margins.append((top2[:, 0] - top2[:, 1]).tolist())
    return tops, margins


def agreement(ours: list[list[int]], ref: tuple[list[list[int]], list[list[float]]]) -> float:
    """Fraction of positions with a float32 top-2 margin over 0.1 where the top-1 tokens agree."""
    pairs = [(a == b) for o, r, m in zip(ours, *ref) for a, b, g in zip(o, r, m) if g > 0.1]
    assert len(pairs) > 150
    return sum(pairs) / len(pairs)


def _quantize(w: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (amax.float() / 448.0).clamp_min(1e-12)
    return scale, w.float() / scale


def write_fp8(src: str, dst: str, kind: str) -> str:
    """An FP8 checkpoint of src: compressed-tensors float-quantized per channel or per tensor
    (safetensors layout as compressed-tensors writes it), or DeepSeek's 128x128 blocks (HF `fp8`).
    Also writes the float32 model its FP8 values dequantize to (dst + '-float'), the reference."""
    os.makedirs(dst, exist_ok=True)
    tensors, floats = load_file(os.path.join(src, "model.safetensors")), {}
    out = {}
    for name, w in tensors.items():
        floats[name] = w
        if not any(f".{lin}.weight" in name for lin in LINEARS):
            out[name] = w
            continue
        base = name[: -len("weight")]
        if kind == "block":
            rows, cols = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
            pad = torch.zeros(rows * 128, cols * 128)
            pad[: w.shape[0], : w.shape[1]] = w
            amax = pad.reshape(rows, 128, cols, 128).abs().amax(dim=(1, 3))  # [rows, cols]
            scale = (amax / 448.0).clamp_min(1e-12)
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
            q = (w / full).clamp(-448, 448).to(FP8)
            out[base + "weight_scale_inv"] = scale
            floats[name] = q.float() * full
        else:
            amax = w.abs().amax(dim=1, keepdim=True) if kind == "channel" else w.abs().amax().reshape(1)
            scale = (amax / 448.0).clamp_min(1e-12)  # [out, 1] or [1]
            q = (w / scale).clamp(-448, 448).to(FP8)
            out[base + "weight_scale"] = scale
            floats[name] = q.float() * scale
        out[name] = q
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if kind == "block":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    else:
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "quantization_status": "compressed", "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": kind, "dynamic": False},
                  "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                        "dynamic": True}}}}
    add_quantization_config(src, qc, dst)
    ref = dst + "-float"
    os.makedirs(ref, exist_ok=True)
    save_file(floats, os.path.join(ref, "model.safetensors"))
    with open(os.path.join(ref, "config.json"), "w") as f:
        json.dump(config, f)
    for name in os.listdir(src):  # the tokenizer
        if name not in ("config.json", "model.safetensors"):
            for target in (dst, ref):
                shutil.copy(os.path.join(src, name), target)
    return dst


@pytest.fixture(scope="module")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("fp8src")), "LlamaForCausalLM", tie=False, **SHAPE)


def test_dynamic_fp8_agrees_with_float32(float_model: str, emulated: None) -> None:
    llm = LLM(float_model, quantization="fp8", enable_prefix_caching=False)
    layer = llm.llm_engine.executor.runner.model.model.layers["0"].mlp.gate_up_proj
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (512,)
    norm = llm.llm_engine.executor.runner.model.model.norm.weight
    assert llm.llm_engine.executor.runner.model.lm_head.weight.dtype == norm.dtype  # the LM head stays unquantized
    assert agreement(engine_top1(llm), hf_top1(float_model)) >= MIN_AGREEMENT


@pytest.mark.parametrize("kind", ["channel", "tensor", "block"])
def test_fp8_checkpoint_agrees_with_its_float32_dequantization(float_model: str, tmp_path, kind: str,
                                                               emulated: None) -> None:
    path = write_fp8(float_model, str(tmp_path / kind), kind)
    llm = LLM(path, enable_prefix_caching=False)  # quantization auto: from the checkpoint
    assert llm.llm_engine.model_config.quantization == ("fp8" if kind == "block" else "compressed-tensors")
    qkv = llm.llm_engine.executor.runner.model.model.layers["0"].self_attn.qkv_proj
    assert qkv.weight.dtype == FP8 and not hasattr(qkv, "weight_scale_inv")
    top1 = engine_top1(llm)
    llm.llm_engine.shutdown()  # on a GPU its KV pool holds the memory the next engine needs
    del llm, qkv
    gc.collect()
    assert agreement(top1, hf_top1(path + "-float")) >= MIN_AGREEMENT
    if kind != "tensor":  # the same FP8 values and row scales as quantizing the dequantized weights at load
        assert top1 == engine_top1(LLM(path + "-float", quantization="fp8", enable_prefix_caching=False))


def test_fp8_checkpoint_with_float_weights_names_the_tensor(float_model: str, tmp_path, emulated: None) -> None:
    from engine.errors import ModelLoadError

    path = write_fp8(float_model, str(tmp_path / "bad"), "channel")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"].float()
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.down_proj.weight.*float8_e4m3fn"):
        LLM(path)


def test_fp8_kv_cache_agrees_and_holds_more_tokens(float_model: str, emulated: None) -> None:
    base = LLM(float_model, enable_prefix_caching=False, kv_cache_memory_gib=0.01)
    llm = LLM(float_model, enable_prefix_caching=False, kv_cache_memory_gib=0.01, kv_cache_dtype="fp8")
    runner = llm.llm_engine.executor.runner
    assert runner.attn_layers[0].k_cache.dtype == FP8
    # float32 pages -> 1 byte: four times the blocks in the same memory (bf16 -> fp8: twice)
    num_blocks, base_blocks = llm.llm_engine.info.num_total_blocks, base.llm_engine.info.num_total_blocks
    assert 4 * base_blocks <= num_blocks < 4 * (base_blocks + 1)
    assert agreement(engine_top1(llm), hf_top1(float_model)) >= MIN_AGREEMENT


def test_kv_scales_from_the_checkpoint(float_model: str, tmp_path, emulated: None,
                                       caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "kvscales")
    write_fp8(float_model, path, "channel")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    for i in range(3):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5 + i)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    llm = LLM(path, enable_prefix_caching=False, kv_cache_dtype="fp8_e4m3")
    layers = llm.llm_engine.executor.runner.attn_layers
    assert [(a.k_scale, a.v_scale) for a in layers] == [(0.5, 0.25), (1.5, 0.25), (2.5, 0.25)]
    plain = LLM(path, enable_prefix_caching=False)  # bf16/fp32 pages ignore them
    assert {(a.k_scale, a.v_scale) for a in plain.llm_engine.executor.runner.attn_layers} == {(1.0, 1.0)}
    with caplog.at_level("INFO", logger="gantry.engine"):
        LLM(float_model, kv_cache_dtype="fp8")
    assert "3 of 3 layers have no k_scale/v_scale in the checkpoint: scale 1.0" in caplog.text


@pytest.mark.parametrize("field,kwargs", [("quantization", {"quantization": "fp8"}),
                                          ("kv_cache_dtype", {"kv_cache_dtype": "fp8"})])
def test_no_fp8_on_cpu_without_the_switch(float_model: str, monkeypatch: pytest.MonkeyPatch, field: str,
                                          kwargs: dict) -> None:
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"GPUs of compute capability >= 8.9.*{EMULATE_ENV}=1") as e:
        LLM(float_model, **kwargs)
    assert e.value.param == field


def test_bad_kv_cache_dtype_and_config_fields(tmp_path, float_model: str, emulated: None) -> None:
    with pytest.raises(ConfigError) as e:
        LLM(float_model, kv_cache_dtype="int8")
    assert e.value.param == "kv_cache_dtype"
    path = write_fp8(float_model, str(tmp_path / "blk"), "block")
    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    edit_config(path, quantization_config={**qc, "weight_block_size": [128]})
    with pytest.raises(ConfigError) as e:
        LLM(path)
    assert e.value.param == "quantization_config.weight_block_size"


def test_dummy_weights_are_quantized(float_model: str, emulated: None) -> None:
    """load_format dummy (the benchmarks) quantizes its random weights too."""
    llm = LLM(float_model, load_format="dummy", quantization="fp8", enable_prefix_caching=False)
    layer = llm.llm_engine.executor.runner.model.model.layers["2"].self_attn.o_proj
    assert layer.weight.dtype == FP8 and layer.weight_scale.dtype == torch.float32
    assert len(llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids) == 4


def write_with_compressed_tensors(src: str, dst: str) -> str:
    """FP8_DYNAMIC (per-channel e4m3 weights, per-token activations) written by compressed-tensors itself
    (what llm-compressor calls; llm-compressor would replace this environment's transformers), min-max
    scales from its own calculate_qparams; dst + '-float' holds the weights it dequantizes to."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data
            scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True),
                                         module.quantization_scheme.weights)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    floats = {n: t.float() * tensors[n + "_scale"] if t.dtype == FP8 else t
              for n, t in tensors.items() if not n.endswith("_scale")}
    os.makedirs(dst + "-float")
    save_file(floats, os.path.join(dst + "-float", "model.safetensors"))
    for name in os.listdir(src):
        if name != "model.safetensors":
            shutil.copy(os.path.join(src, name), dst + "-float")
            if name != "config.json":
                shutil.copy(os.path.join(src, name), dst)
    return dst


def test_checkpoint_written_by_compressed_tensors(float_model: str, tmp_path, emulated: None) -> None:
    pytest.importorskip("compressed_tensors")
    path = write_with_compressed_tensors(float_model, str(tmp_path / "ct"))
    llm = LLM(path, enable_prefix_caching=False)
    assert llm.llm_engine.executor.runner.model.model.layers["1"].mlp.down_proj.weight.dtype == FP8
    top1 = engine_top1(llm)
    assert agreement(top1, hf_top1(path + "-float")) >= MIN_AGREEMENT
    assert top1 == engine_top1(LLM(path + "-float", quantization="fp8", enable_prefix_caching=False))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 GEMMs need a GPU of compute capability >= 8.9")
def test_fused_input_quantization_changes_no_bit(float_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The norm and SiLU kernels quantizing their outputs for the FP8 GEMMs after them (FUSE_INPUT_QUANT) give
    the same tokens and log-probabilities as a separate quantization kernel."""
    import gantry_kernels.norm
    from engine.layers.quant import fp8

    calls = []
    fused_norm = gantry_kernels.norm.rms_norm_fp8
    monkeypatch.setattr(gantry_kernels.norm, "rms_norm_fp8", lambda *a: calls.append(1) or fused_norm(*a))
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True)

    def run() -> list[tuple]:  # on the GPU: the real class, not this module's CPU stand-in
        llm = _LLM(float_model, quantization="fp8", dtype="bfloat16", enable_prefix_caching=False,
                   gpu_memory_utilization=0.3)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        llm.llm_engine.shutdown()
        return [(o.outputs[0].token_ids, [sorted(e.items()) for e in o.outputs[0].logprobs]) for o in outs]

    fused = run()
    assert calls, "the fused path did not run"
    monkeypatch.setattr(fp8, "FUSE_INPUT_QUANT", False)
    calls.clear()
    assert run() == fused and not calls
    gc.collect()
