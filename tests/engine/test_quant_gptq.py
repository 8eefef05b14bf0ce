"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout) written from tiny random Llama/Qwen2 models: 4 and 8
bits, groups 32/64/128/-1, desc_act, sym and asym, checkpoint_format gptq and gptq_v2. Greedy tokens
equal transformers' in float32 on the same dequantized weights; tp2 equals tp1; bad input is a typed
error naming the tensor or field. AutoGPTQ / GPTQModel pull CUDA torch wheels, so the packer below
mirrors AutoGPTQ's QuantLinear.pack and is checked bit for bit against words that code produced."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ConfigError
from engine.errors import ModelLoadError
from engine.layers.quant.gptq import dequantize_gptq
from tests.conftest import edit_config, prompts_of_lengths, write_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = prompts_of_lengths([1, 5, 17, 40])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# GPTQ orders columns by the statistics of a layer's input: projections reading the same input share it
SAME_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}

Quantizer = Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def minmax(w: torch.Tensor, g_idx: torch.Tensor, num_groups: int, bits: int, sym: bool,
           min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoGPTQ's Quantizer.find_params (min-max, per group) and quantize: w [out, in] -> q [out, in],
    scales float16 [num_groups, out], zeros [num_groups, out]."""
    maxq = 2**bits - 1
    scales, zeros = [], []
    for g in range(num_groups):
        cols = w[:, g_idx == g]
        xmin, xmax = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        scale = ((xmax - xmin) / maxq).clamp(min=1e-5).half()
        zero = torch.full_like(xmin, (maxq + 1) // 2) if sym else torch.round(-xmin / scale.float())
        scales.append(scale)
        zeros.append(zero.clamp(min_zero, maxq).int())  # v1 stores zero - 1: AutoGPTQ breaks on zero 0
    scales, zeros = torch.stack(scales), torch.stack(zeros)
    s, z = scales.float()[g_idx].t(), zeros[g_idx].t()  # [out, in]
    q = torch.clamp(torch.round(w / s) + z, 0, maxq).int()
    return q, scales, zeros


def pack_along(values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Words of 32 // bits unsigned values along dim, value j at bits [j * bits, (j + 1) * bits) (AutoGPTQ's
    `qweight[row] |= intweight[j] << (bits * (j - i))`), or value order[j] there (AutoAWQ's order_map)."""
    pack = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, pack)
    if order is not None:
        v = v[..., list(order)]
    words = (v << (bits * torch.arange(pack))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).movedim(-1, dim)


def gptq_quantizer(bits: int, group: int, desc_act: bool, sym: bool, v1: bool, seed: int = 0) -> Quantizer:
    """w [out, in] -> the GPTQ tensors of one linear (qweight [in / pack, out], qzeros, scales, g_idx) and
    the float32 weights they dequantize to."""
    perms: dict[str, torch.Tensor] = {}

    def quantize(module: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        columns = w.shape[1]
        size = columns if group == -1 else group
        g_idx = torch.arange(columns, dtype=torch.int32) // size
        if desc_act:  # GPTQ: g_idx = [i // group for i in range(columns)][invperm]
            parent, _, proj = module.rpartition(".")  # "lm_head": no parent
            key = f"{parent}.{SAME_INPUT.get(proj, proj)}"
            perm = perms.setdefault(key, torch.randperm(columns, generator=torch.Generator().manual_seed(seed + len(perms))))
            g_idx = g_idx[torch.argsort(perm)]
        num_groups = -(-columns // size)
        q, scales, zeros = minmax(w, g_idx, num_groups, bits, sym, min_zero=1 if v1 else 0)
        deq = (q - zeros[g_idx].t()).float() * scales.float()[g_idx].t()  # [out, in]
        tensors = {"qweight": pack_along(q.t(), bits, 0), "qzeros": pack_along(zeros - (1 if v1 else 0), bits, 1),
                   "scales": scales, "g_idx": g_idx}
        return tensors, deq

    return quantize


def write_quantized(path: str, arch: str, quantize: Quantizer, quantization_config: dict,
                    intermediate_size: int = 512, lm_head: bool = False) -> tuple[str, str]:
    """(quantized checkpoint, float32 reference with the dequantized weights) from one tiny random model;
    lm_head: the LM head quantized too (GPTQModel's lm_head=True)."""
    from safetensors.torch import load_file, save_file

    src = write_tiny_checkpoint(path + "-float", arch, tie=False, hidden_size=256, intermediate_size=intermediate_size)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, reference = {}, dict(tensors)
    for name, t in tensors.items():
        module, kind = name.rsplit(".", 1)
        if kind == "weight" and (module.split(".")[-1] in LINEARS or (lm_head and module == "lm_head")):
            packed, reference[name] = quantize(module, t)
            quantized.update({f"{module}.{k}": v.contiguous() for k, v in packed.items()})
        else:
            quantized[name] = t
    for out, weights in ((path, quantized), (path + "-ref", reference)):
        shutil.copytree(src, out, dirs_exist_ok=True)
        save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path, path + "-ref"


def write_gptq(path: str, arch: str, bits: int, group: int, desc_act: bool, sym: bool, fmt: str,
               intermediate_size: int = 512, lm_head: bool = False) -> tuple[str, str]:
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
          "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": fmt,
          "lm_head": lm_head}
    return write_quantized(path, arch, gptq_quantizer(bits, group, desc_act, sym, v1=fmt == "gptq"), qc,
                           intermediate_size, lm_head)


def hf_greedy(path: str, prompts: list[list[int]] = PROMPTS, max_tokens: int = 16) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    return [hf.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist() for p in prompts]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("bits,desc_act,qweight_digest,qzeros_digest", [
    (4, False, "4803ac6b1f1d99e2", "decf07a804424a61"),
    (8, True, "9a744632d024708e", "d1519cc90d82436c"),
])
def test_packer_matches_autogptq_bit_for_bit(bits: int, desc_act: bool, qweight_digest: str, qzeros_digest: str) -> None:
    """Digests of the words AutoGPTQ 0.7.1's QuantLinear.pack (auto_gptq/nn_modules/qlinear/qlinear_cuda.py,
    run on CPU) wrote for this 64-input, 32-output, group-32 linear; it stores zero - 1 (format gptq)."""
    maxq = 2**bits - 1
    q = (37 * torch.arange(32)[:, None] + 11 * torch.arange(64)) % (maxq + 1)  # [out, in]
    zeros = (7 * torch.arange(2)[:, None] + 13 * torch.arange(32)) % maxq + 1  # [num_groups, out]
    g_idx = torch.arange(64) // 32
    if desc_act:
        g_idx = g_idx[torch.argsort((5 * torch.arange(64)) % 64)]
    qweight, qzeros = pack_along(q.t(), bits, 0), pack_along(zeros - 1, bits, 1)
    assert (digest(qweight), digest(qzeros)) == (qweight_digest, qzeros_digest)
    # and the engine reads back the values, whatever the group order (g_idx only picks scales and zeros)
    scales = torch.rand(2, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    v2_zeros = pack_along(zeros, bits, 1)
    expected = (q - zeros[g_idx].t()).float() * scales[g_idx].t()
    assert torch.equal(dequantize_gptq(qweight, v2_zeros, scales, g_idx, bits, 32), expected)


CASES = {  # arch, bits, group_size, desc_act, sym, checkpoint_format
    "llama-4bit-g128-gptq": ("LlamaForCausalLM", 4, 128, False, True, "gptq"),
    "qwen2-4bit-g128-act-asym-v2": ("Qwen2ForCausalLM", 4, 128, True, False, "gptq_v2"),
    "llama-8bit-g32-act-gptq": ("LlamaForCausalLM", 8, 32, True, True, "gptq"),
    "llama-4bit-g64-asym-gptq": ("LlamaForCausalLM", 4, 64, False, False, "gptq"),
    "qwen2-4bit-channel-v2": ("Qwen2ForCausalLM", 4, -1, False, False, "gptq_v2"),
}


@pytest.fixture(scope="module", params=list(CASES))
def gptq(request, tmp_path_factory) -> tuple[str, str]:
    return write_gptq(str(tmp_path_factory.mktemp("gptq") / request.param), *CASES[request.param])


def test_greedy_matches_transformers(gptq: tuple[str, str]) -> None:
    path, reference = gptq
    llm = LLM(path, enable_prefix_caching=False, device="cpu")  # float32, as the reference (GPU: kernel test)
    assert llm.llm_engine.model_config.quantization == "gptq"
    layer = llm.llm_engine.executor.runner.model.model.layers["0"].mlp.down_proj
    assert layer.weight is None and layer.qweight.dtype == torch.int32  # kept packed
    with open(os.path.join(path, "config.json")) as f:
        sym = json.load(f)["quantization_config"]["sym"]
    assert layer.midpoint_zeros == sym  # symmetric: the kernels skip the zero points
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(reference)


@pytest.fixture(scope="module")
def one_gptq(tmp_path_factory) -> tuple[str, str]:
    """One checkpoint for the error cases."""
    return write_gptq(str(tmp_path_factory.mktemp("gptq") / "one"), *CASES["llama-4bit-g64-asym-gptq"])


def test_quantization_contradicting_the_checkpoint(one_gptq: tuple[str, str]) -> None:
    path, reference = one_gptq
    for wrong in ("awq", "none", "compressed-tensors"):
        with pytest.raises(ConfigError) as e:
            LLM(path, quantization=wrong)
        assert e.value.param == "quantization"
    with pytest.raises(ConfigError, match="not quantized") as e:
        LLM(reference, quantization="gptq")  # a plain checkpoint
    assert e.value.param == "quantization"


def edited_copy(path: str, tmp: str, config: dict | None = None, drop: str | None = None) -> str:
    """A copy of checkpoint `path` with config.json's quantization_config updated and a tensor dropped."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, tmp, dirs_exist_ok=True)
    if config is not None:
        with open(os.path.join(tmp, "config.json")) as f:
            data = json.load(f)
        data["quantization_config"].update(config)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(data, f)
    if drop is not None:
        tensors = load_file(os.path.join(tmp, "model.safetensors"))
        del tensors[drop]
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    return tmp


@pytest.mark.parametrize("field,value", [("bits", 3), ("group_size", 0), ("checkpoint_format", "marlin"),
                                         ("desc_act", "yes"), ("lm_head", "yes")])
def test_unsupported_config_names_the_field(one_gptq: tuple[str, str], tmp_path, field: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        LLM(edited_copy(one_gptq[0], str(tmp_path / "bad"), config={field: value}))
    assert e.value.param == f"quantization_config.{field}"


def test_missing_scales_name_the_tensor(one_gptq: tuple[str, str], tmp_path) -> None:
    bad = edited_copy(one_gptq[0], str(tmp_path / "bad"), drop="model.layers.1.mlp.down_proj.scales")
    with pytest.raises(ModelLoadError, match=r"missing weights: model\.layers\.1\.mlp\.down_proj\.scales"):
        LLM(bad)


@pytest.mark.parametrize("desc_act", [False, True])
def test_quantized_lm_head_matches_transformers(desc_act: bool, tmp_path) -> None:
    """lm_head: true (GPTQModel's lm_head=True): the LM head stays packed and its logits are the dequantized head's."""
    path, reference = write_gptq(str(tmp_path / "head"), "Qwen2ForCausalLM", 4, 64, desc_act, False, "gptq", lm_head=True)
    llm = LLM(path, enable_prefix_caching=False, device="cpu")
    head = llm.llm_engine.executor.runner.model.lm_head
    assert head.weight is None and head.qweight.dtype == torch.int32
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(reference)


def test_quantized_lm_head_errors_name_the_field(one_gptq: tuple[str, str], tmp_path) -> None:
    """lm_head: true on a checkpoint whose head is float names the head's float tensor; on a model whose
    head is tied to the (float) embedding it names quantization_config.lm_head."""
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'lm_head\.weight'"):
        LLM(edited_copy(one_gptq[0], str(tmp_path / "float-head"), config={"lm_head": True}))
    tied = edited_copy(one_gptq[0], str(tmp_path / "tied"), config={"lm_head": True})
    with pytest.raises(ConfigError) as e:
        LLM(edit_config(tied, tie_word_embeddings=True))
    assert e.value.param == "quantization_config.lm_head"


def test_mixed_column_orders_in_one_fused_matmul_are_named(tmp_path) -> None:
    """q_proj and k_proj with different desc_act orders cannot share the fused qkv matmul's g_idx."""
    quantize = gptq_quantizer(4, 64, desc_act=True, sym=True, v1=False)
    orders = iter(range(100))

    def unshared(module: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return quantize(f"{module}.{next(orders)}", w)  # a fresh column order per projection

    path, _ = write_quantized(str(tmp_path / "mixed"), "LlamaForCausalLM", unshared,
                              {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": True,
                               "checkpoint_format": "gptq_v2"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.(self_attn|mlp)\.\w+_proj\.g_idx.*differs"):
        LLM(path)


@pytest.mark.slow
@pytest.mark.parametrize("case,intermediate_size,lm_head", [("qwen2-4bit-g128-act-asym-v2", 512, False),
                                                             ("llama-4bit-g64-asym-gptq", 512, True),
                                                             ("qwen2-4bit-g128-act-asym-v2", 384, False)])
def test_tp2_matches_tp1(case: str, intermediate_size: int, lm_head: bool, tmp_path) -> None:
    """Column-parallel layers split qweight/scales/qzeros by output; row-parallel ones split the input:
    with desc_act the ranks keep every group and split g_idx (so down_proj's 192 input columns a rank
    may cut groups of 128), without it each rank keeps its own groups. A quantized LM head splits the
    vocabulary like the float one."""
    from tests.engine.quant_tp2 import assert_tp2_equals_tp1

    path, _ = write_gptq(str(tmp_path / case), *CASES[case], intermediate_size=intermediate_size, lm_head=lm_head)
    assert_tp2_equals_tp1(path, tmp_path)


@pytest.mark.slow
def test_tp2_group_cut_by_the_shard_is_named(tmp_path) -> None:
    """intermediate 384 over 2 ranks: 192 input columns of down_proj per rank, not a multiple of 128."""
    from tests.engine.quant_tp2 import tp2_load_failure

    bad, _ = write_gptq(str(tmp_path / "cut"), "LlamaForCausalLM", 4, 128, False, True, "gptq", intermediate_size=384)
    text = tp2_load_failure(bad, tmp_path)
    assert "model.layers.0.mlp.down_proj." in text  # the first of its tensors loaded
    assert "group size 128 does not divide this rank's 192 input columns" in text


def test_reordered_columns_need_desc_act(tmp_path) -> None:
    """A g_idx out of group order is only read with desc_act: a config saying false is named, not ignored."""
    path, _ = write_gptq(str(tmp_path / "act"), "LlamaForCausalLM", 4, 64, True, True, "gptq_v2")
    with pytest.raises(ModelLoadError, match=r"\.g_idx.*quantization_config\.desc_act is false"):
        LLM(edited_copy(path, str(tmp_path / "bad"), config={"desc_act": False}))


KERNEL_CHECK = """
import json, sys, torch
from engine import LLM
path, device = sys.argv[1], sys.argv[2]
llm = LLM(path, enable_prefix_caching=False, device=device, dtype="float32", gpu_memory_utilization=0.3)
from gantry_kernels.quant_gemm import dequant_gemm
checked, worst = 0, 0.0
for name, m in llm.llm_engine.executor.runner.model.named_modules():
    method = getattr(m, "quant_method", None)
    if method is None or not hasattr(m, "qweight"):
        continue
    k = m.qweight.shape[0] * 32 // method.bits
    for rows in (1, 5):
        x = torch.randn(rows, k, device=m.qweight.device)
        g_idx = m.g_idx if m.use_g_idx else None
        got = dequant_gemm(x, m.qweight, m.scales, m.qzeros, g_idx, method.bits, method.group_size, "gptq")
        want = x @ method.dequantize(m).t()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=name)
        checked, worst = checked + 1, max(worst, (got - want).abs().max().item())
print(json.dumps({"check": "quant_gemm vs dequantize", "model": path.rsplit("/", 1)[-1], "device": device,
                  "matmuls": checked, "max_abs_err": worst}))
"""


def kernel_matches_dequantize(path: str) -> None:
    """gantry_kernels.quant_gemm on the layers as loaded (their layout, gptq v1 zeros fixed up, AWQ repacked)
    equals the torch dequantize: on the GPU, or on CPU through Triton's interpreter (in a subprocess:
    Triton reads TRITON_INTERPRET when the kernels are defined)."""
    import subprocess
    import sys

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ, TRITON_INTERPRET="1") if device == "cpu" else dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK, path, device], env=env, capture_output=True, text=True,
                          check=False, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0 and '"matmuls": 24' in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    print(proc.stdout.strip().splitlines()[-1])  # the JSON line (pytest -s shows it)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama-8bit-g32-act-gptq", "llama-4bit-g64-asym-gptq"])
def test_kernel_matches_dequantize(case: str, tmp_path) -> None:
    kernel_matches_dequantize(write_gptq(str(tmp_path / case), *CASES[case])[0])
