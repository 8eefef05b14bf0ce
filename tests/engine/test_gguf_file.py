"""engine.gguf_file: one parse of the embedded SmolLM2 GGUF gives what transformers builds from
the same file (the tokenizer; the config: tests/engine/test_gguf_config.py) and what gguf's
dequantize gives (weights), and the config, the tokenizer and the weights share that parse (the
seed parsed the file three times)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import engine.gguf_file as gguf_file
from engine.config import EngineConfig
from engine.gguf_file import GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, dequantize, open_gguf

TEXTS = ["Hello world", " leading space and  two", "你好，世界！大型语言模型", "<|im_start|>user\nhi<|im_end|>",
         "emoji 🤖 tabs\tand\n\nnewlines", "The capital of France is", "x" * 300]


def test_tokenizer_equals_transformers(smollm2_path: str) -> None:
    from transformers import AutoTokenizer

    ours = open_gguf(smollm2_path).tokenizer()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))
    assert len(ours) == len(ref) and ours.all_special_tokens == ref.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_weights_equal_gguf_dequantize(smollm2_path: str) -> None:
    from gguf import GGUFReader
    from gguf import dequantize as gguf_dequantize

    ours = {info.name: w for info, w in open_gguf(smollm2_path).iter_tensors()}
    reader = GGUFReader(smollm2_path)
    assert {t.name for t in reader.tensors} == set(ours)
    types = set()
    for t in reader.tensors:
        ref = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert ours[t.name].dtype == torch.float32 and torch.equal(ours[t.name], ref.reshape(ours[t.name].shape)), t.name
        types.add(int(t.tensor_type))
    assert {GGML_Q4_1, GGML_Q8_0} <= types  # the embedded file's block types are covered


@pytest.mark.parametrize("ggml_type,block_bytes", [(GGML_Q4_0, 18), (GGML_Q4_1, 20), (GGML_Q8_0, 34)])
def test_block_types_equal_gguf_dequantize(ggml_type: int, block_bytes: int) -> None:
    """Random blocks (finite f16 scales) of each type this module decodes itself."""
    from gguf import dequantize as gguf_dequantize

    rng = np.random.default_rng(ggml_type)
    rows, cols = 6, 64  # two blocks of 32 per row
    raw = rng.integers(0, 256, size=(rows * cols // 32, block_bytes), dtype=np.uint8)
    scales = rng.uniform(-2, 2, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)  # d (and m) finite
    raw[:, :4] = scales.reshape(raw.shape[0], 4)
    ours = dequantize(raw.reshape(-1), ggml_type, (rows, cols))
    ref = gguf_dequantize(raw.reshape(rows, -1), ggml_type)
    assert torch.equal(ours, torch.from_numpy(np.asarray(ref, dtype=np.float32)))


def test_config_tokenizer_and_weights_share_one_parse(smollm2_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from engine.loader import iter_gguf
    from engine.model_config import resolve_model_config
    from engine.tokenizer import load_tokenizer

    parses = []
    real_parse = gguf_file._parse
    monkeypatch.setattr(gguf_file, "_parse", lambda path: parses.append(path) or real_parse(path))
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda *a, **k: pytest.fail("GGUFReader parses the file again"))
    gguf_file._cached.cache_clear()
    try:
        mc = resolve_model_config(EngineConfig(device="cpu"), torch.device("cpu"))
        tokenizer = load_tokenizer(mc.path, mc.is_gguf)
        name, weights = next(iter_gguf(mc.path, mc.hf_config))
    finally:
        gguf_file._cached.cache_clear()
    assert len(parses) == 1 and tokenizer.eos_token_id == 2 and name == "model.embed_tokens.weight"
    assert weights.shape == (49152, 576)


def test_corrupt_file_is_a_model_load_error(tmp_path) -> None:
    from engine.errors import ModelLoadError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)  # absurd counts: runs off the end
    with pytest.raises(ModelLoadError) as e:
        open_gguf(str(bad))
    assert str(bad) in str(e.value)
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        open_gguf(str(bad))
