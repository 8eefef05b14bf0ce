"""GGUF weights kept in their blocks (engine/layers/quant): block arithmetic bit-equal to
gguf.dequantize, greedy tokens equal to the dequantize-at-load path, memory, typed errors. Tiny
random Llama GGUFs are written here with the gguf package and the embedded SmolLM2's tokenizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter, quantize
from gguf import dequantize as gguf_dequantize

from engine import LLM, SamplingParams
from engine.config import ConfigError
from engine.gguf_file import GGML_BLOCK_SIZES, open_gguf
from engine.layers.quant import QuantizationError, ggml_cpu
from engine.layers.quant.gguf import GGUFBlocks
from engine.loader import weight_bytes
from engine.model_config import default_model_path
from tests.conftest import prompts_of_lengths
from tests.engine.test_correctness import CHAT_PROMPTS  # the same 4 chat prompts (one Chinese)

KEPT = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

# byte offsets of the f16 scale fields of a K-quant block (random bytes elsewhere)
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q8_1: ()}  # Q8_1: gguf can neither write nor read it


def _blocks(x: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if qtype in (Q.F32,):
        return x
    if qtype in _K_SCALES:
        block_size, block_bytes = GGML_BLOCK_SIZES[qtype]
        raw = rng.integers(0, 256, (x.shape[0], x.shape[1] // block_size, block_bytes), dtype=np.uint8)
        for off in _K_SCALES[qtype]:
            raw[..., off : off + 2] = np.full(raw.shape[:2] + (1,), 0.002, np.float16).view(np.uint8)
        return raw.reshape(x.shape[0], -1)
    return quantize(x, qtype)


def write_tiny_gguf(path: str, *, hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, types: dict[str, Q] | None = None, seed: int = 0) -> str:
    """A Llama GGUF; `types` maps a tensor-name fragment (e.g. 'attn_v') to its ggml type (default Q4_1,
    token_embd Q8_0, norms F32)."""
    rng = np.random.default_rng(seed)
    meta = open_gguf(default_model_path()).metadata
    vocab = len(meta["tokenizer.ggml.tokens"])
    w = GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    for key, value in meta.items():
        if key.startswith("tokenizer."):
            if isinstance(value, list):
                sub = GGUFValueType.STRING if isinstance(value[0], str) else GGUFValueType.INT32
                w.add_key_value(key, value, GGUFValueType.ARRAY, sub)
            elif isinstance(value, bool):
                w.add_key_value(key, value, GGUFValueType.BOOL)
            elif isinstance(value, int):
                w.add_key_value(key, value, GGUFValueType.UINT32)
            else:
                w.add_key_value(key, value, GGUFValueType.STRING)
    head_dim = hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (heads * head_dim, hidden), f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden), f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
            f"blk.{i}.ffn_gate.weight": (intermediate, hidden), f"blk.{i}.ffn_up.weight": (intermediate, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, intermediate),
        })
    types = {"token_embd": Q.Q8_0, **(types or {})}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        qtype = next((t for frag, t in types.items() if frag in name), Q.Q4_1)
        x = (rng.standard_normal(shape) * 0.5 / np.sqrt(shape[1])).astype(np.float32)
        w.add_tensor(name, _blocks(x, qtype, rng), raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_blocks(qtype: Q, rows: int = 48, cols: int = 256, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of `qtype` and gguf's dequantization of them: quantized by gguf, or (the K-quants, which gguf
    cannot write) random bytes with sane f16 scales."""
    rng = np.random.default_rng(int(qtype) + int(offset))
    x = (rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 4, (rows, 1)) + offset).astype(np.float32)
    raw = np.ascontiguousarray(_blocks(x, qtype, rng))
    return torch.from_numpy(raw.copy()), torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", KEPT)
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_block_dequantization_is_bit_equal_to_gguf(qtype: Q, offset: float) -> None:
    blocks, reference = random_blocks(qtype, offset=offset)
    # == treats -0.0 and 0.0 alike: d*(q-8) for q == 8 may carry either sign
    assert torch.equal(ggml_cpu.dequantize_rows(blocks, qtype, 256), reference)
    assert torch.equal(ggml_cpu._dequant_torch(blocks, qtype, 256), reference)
    rows = torch.tensor([7, 0, 47, 7])
    assert torch.equal(ggml_cpu.dequantize_rows(blocks, qtype, 256, rows), reference[rows])


@pytest.mark.parametrize("qtype", KEPT)
@pytest.mark.parametrize("num_tokens", [1, 9, 40, ggml_cpu.GEMM_MAX_ROWS + 1])
def test_block_matmul_matches_float_matmul(qtype: Q, num_tokens: int) -> None:
    blocks, reference = random_blocks(qtype)
    x = torch.randn(num_tokens, 256, generator=torch.Generator().manual_seed(0))
    y = ggml_cpu.ggml_linear(x, blocks, qtype, 256)
    torch.testing.assert_close(y, x @ reference.T, rtol=1e-5, atol=1e-4)


def test_cpu_kernel_is_built_here() -> None:
    """The AVX2 kernel, not the slow fallback, runs on this (AVX2) CI machine."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2")
    assert ggml_cpu.cpu_kernel() is not None


def test_shard_inside_a_block_names_the_tensor() -> None:
    blocks, _ = random_blocks(Q.Q4_1, rows=4, cols=96)
    w = GGUFBlocks("m.gguf", "blk.0.ffn_down.weight", Q.Q4_1, blocks, 96)
    assert w[:, 32:64].shape == (4, 32)
    with pytest.raises(QuantizationError, match="blk.0.ffn_down.weight") as e:
        w[:, 48:96]  # tp2 over 96 columns: 48 is no multiple of 32
    assert e.value.tensor == "blk.0.ffn_down.weight"


def test_k_quants_kept_in_blocks_match_dequantize_at_load(tmp_path) -> None:
    """Every projection, the embedding and the (tied) LM head as K-quant super-blocks, kept as blocks:
    greedy tokens equal to the float weights gguf's dequantization gives."""
    path = write_tiny_gguf(str(tmp_path / "k.gguf"), hidden=256, intermediate=512,
                           types={"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q4_K, "attn_output": Q.Q6_K,
                                  "ffn_gate": Q.Q5_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q6_K})
    kept, llm = _greedy(path, "auto")
    reference, _ = _greedy(path, "none")
    assert kept == reference
    layer = _model(llm).model.layers["0"]
    for linear, qtype in ((layer.self_attn.qkv_proj, Q.Q4_K), (layer.self_attn.o_proj, Q.Q6_K),
                          (layer.mlp.gate_up_proj, Q.Q5_K), (layer.mlp.down_proj, Q.Q6_K)):
        assert linear.weight.ggml_type == qtype and linear.weight.dtype == torch.uint8
    assert _model(llm).model.embed_tokens.weight.ggml_type == Q.Q6_K


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> str:
    """Every kind of tensor: kept blocks (32-weight and K-quant), float, mixed types in qkv and gate_up
    (dequantized at load)."""
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "mixed.gguf"), hidden=256, intermediate=512,
                           types={"attn_v": Q.Q6_K, "attn_k": Q.Q4_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q4_0,
                                  "ffn_gate": Q.Q8_0, "attn_output": Q.F32})


def _greedy(path: str, quantization: str) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, quantization=quantization, enable_prefix_caching=False)
    outputs = llm.generate(prompts_of_lengths([1, 7, 40]), GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], llm


def test_mixed_types_match_dequantize_at_load(mixed_gguf: str) -> None:
    kept, llm = _greedy(mixed_gguf, "auto")
    reference, _ = _greedy(mixed_gguf, "none")
    assert kept == reference
    assert llm.llm_engine.model_config.quantization == "gguf"
    layers = _model(llm).model.layers["0"]
    assert layers.mlp.down_proj.weight.ggml_type == Q.Q4_0 and layers.mlp.down_proj.weight.dtype == torch.uint8
    assert layers.self_attn.qkv_proj.weight.ggml_type is None  # Q4_1 + Q4_K + Q6_K: dequantized at load
    assert layers.mlp.gate_up_proj.weight.ggml_type is None  # Q8_0 + Q5_K
    assert layers.self_attn.o_proj.weight.dtype == torch.float32 and layers.self_attn.o_proj.weight.ggml_type is None
    assert _model(llm).lm_head.weight is _model(llm).model.embed_tokens.weight  # tied, kept as Q8_0
    assert _model(llm).lm_head.weight.ggml_type == Q.Q8_0


def _model(llm: LLM) -> torch.nn.Module:
    return llm.llm_engine.executor.runner.model


def test_unknown_type_names_the_tensor(tmp_path) -> None:
    path = write_tiny_gguf(str(tmp_path / "q81.gguf"), types={"blk.1.ffn_up": Q.Q8_1})
    with pytest.raises(QuantizationError, match="blk.1.ffn_up.weight.*Q8_1"):
        LLM(path)


def test_explicit_quantization_contradicting_the_checkpoint(tiny_llama: str, mixed_gguf: str) -> None:
    with pytest.raises(ConfigError, match="not quantized") as e:
        LLM(tiny_llama, quantization="gptq")
    assert e.value.param == "quantization"
    with pytest.raises(ConfigError, match="quantization"):
        LLM(mixed_gguf, quantization="awq")
    with pytest.raises(ConfigError, match="quantization"):
        LLM(tiny_llama, quantization="int3")




@pytest.mark.slow
def test_smollm2_kept_in_blocks_matches_float_and_fits_memory(smollm2_path: str) -> None:
    """The acceptance: weights <= 1.2x the file's tensor bytes; greedy chat answers token-identical
    to the float32 weights gguf's dequantization gives (quantization=none, today's path)."""
    from engine.gguf_file import _num_bytes

    file_bytes = sum(_num_bytes(t.ggml_type, int(np.prod(t.shape))) for t in open_gguf(smollm2_path).tensors)
    answers = {}
    for quantization in ("gguf", "none"):
        llm = LLM(dtype="float32", quantization=quantization)
        prompts = [llm.llm_engine.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
        answers[quantization] = [o.outputs[0].token_ids for o in outputs]
        if quantization == "gguf":
            assert weight_bytes(_model(llm)) <= 1.2 * file_bytes
        llm.llm_engine.shutdown()
    assert answers["gguf"] == answers["none"]
    assert all(len(a) >= 5 for a in answers["gguf"])  # "The capital of France is Paris." is 8 tokens


@pytest.mark.slow
def test_tp2_matches_tp1(mixed_gguf: str, tmp_path) -> None:
    """Column- and row-parallel shards of blocks (and of the mixed types dequantized at load) on 2 ranks."""
    import json

    from tests.engine.test_distributed import finish, torchrun

    llm = LLM(mixed_gguf, enable_prefix_caching=False, device="cpu")
    outputs = llm.generate(prompts_of_lengths([1, 5, 17, 33, 64, 100, 177, 300]),
                           SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.shutdown()
    out = tmp_path / "tokens.json"
    finish(torchrun(2, [mixed_gguf, "2", "1", str(out)]))
    assert json.loads(out.read_text()) == [o.outputs[0].token_ids for o in outputs]
