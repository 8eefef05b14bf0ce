"""On a GPU: our bf16 engine (Triton kernels, CUDA graphs) against transformers' bf16 on the
same weights, teacher-forced; and CUDA-graph decode against eager decode."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import prompts_of_lengths, write_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = {
    "qwen2-hd128": dict(arch="Qwen2ForCausalLM", tie=False, hidden_size=1024, intermediate_size=2816,
                        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                        max_position_embeddings=4096, initializer_range=0.05),
    "llama-hd64": dict(arch="LlamaForCausalLM", tie=True, hidden_size=512, intermediate_size=1408,
                       num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                       max_position_embeddings=4096, initializer_range=0.05),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def gpu_model(request, tmp_path_factory) -> str:
    spec = dict(SHAPES[request.param])
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp(request.param)), spec.pop("arch"), **spec)


def test_teacher_forced_top1_agreement(gpu_model: str) -> None:
    from transformers import AutoModelForCausalLM

    prompts = prompts_of_lengths([7, 31, 64, 100, 128, 200, 255, 300], vocab=4096)
    llm = LLM(gpu_model, dtype="bfloat16", gpu_memory_utilization=0.3)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.shutdown()
    del llm
    hf = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.bfloat16).cuda().eval()
    agree = total = 0
    with torch.inference_mode():
        for prompt, out in zip(prompts, outputs):
            ids = prompt + out.outputs[0].token_ids
            logits = hf(torch.tensor([ids], device="cuda")).logits[0]
            predicted = logits[len(prompt) - 1 : len(ids) - 1].argmax(-1).tolist()
            agree += sum(p == t for p, t in zip(predicted, out.outputs[0].token_ids))
            total += len(predicted)
    assert total >= 2000
    assert agree / total >= 0.99, f"top-1 agreement {agree / total:.4f} over {total} positions"


def test_cuda_graphs_match_eager(gpu_model: str) -> None:
    prompts = prompts_of_lengths([5, 17, 64, 300, 33, 2, 150, 90, 11, 40], vocab=4096)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    runs = []
    for eager in (True, False):
        llm = LLM(gpu_model, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=eager)
        assert (llm.llm_engine.executor.runner.cuda_graphs is None) == eager
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        llm.llm_engine.shutdown()
        del llm
        torch.cuda.empty_cache()
    same = sum(a == b for x, y in zip(*runs) for a, b in zip(x, y))
    assert same / sum(len(x) for x in runs[0]) >= 0.99
