"""Greedy token ids equal Hugging Face transformers' (float32, CPU) on tiny random checkpoints
of every supported architecture, and on the embedded SmolLM2 GGUF."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import prompts_of_lengths

LENGTHS = [1, 5, 17, 33, 64, 100, 177, 300]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
        pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers(tiny_model: str) -> None:
    from transformers import AutoModelForCausalLM

    prompts = prompts_of_lengths(LENGTHS)
    llm = LLM(tiny_model, dtype="float32", enable_prefix_caching=False)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 32, eos=None)
        assert output.outputs[0].finish_reason == "length"


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "请用中文介绍一下大型语言模型。",
    "List three prime numbers and explain why they are prime.",
]


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_path: str) -> None:
    import os

    from transformers import AutoModelForCausalLM

    llm = LLM(dtype="float32")
    tokenizer = llm.get_tokenizer()
    prompts = [llm.llm_engine.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
    ).eval()
    for prompt, output in zip(prompts, outputs):
        expected = hf_greedy(hf, prompt, 48, eos=tokenizer.eos_token_id)
        if expected and expected[-1] == tokenizer.eos_token_id:
            assert output.outputs[0].finish_reason == "stop"
        assert output.outputs[0].token_ids == expected
    assert all(o.outputs[0].text and "\ufffd" not in o.outputs[0].text for o in outputs)
