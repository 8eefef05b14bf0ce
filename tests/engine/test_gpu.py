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


def top1(model, ids: list[int], start: int) -> list[int]:
    logits = model(torch.tensor([ids], device="cuda")).logits[0]
    return logits[start - 1 : len(ids) - 1].argmax(-1).tolist()


def test_teacher_forced_top1_agreement(gpu_model: str) -> None:
    """Our bf16 tokens, teacher-forced through transformers. Random weights give flat logits on
    which bf16 itself flips the top token, so transformers' own bf16-vs-float32 agreement is the
    noise floor: ours must agree with the float32 truth as well as transformers' bf16 does."""
    from transformers import AutoModelForCausalLM

    prompts = prompts_of_lengths([7, 31, 64, 100, 128, 200, 255, 300], vocab=4096)
    llm = LLM(gpu_model, dtype="bfloat16", gpu_memory_utilization=0.3)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.shutdown()
    del llm
    hf16 = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.bfloat16).cuda().eval()
    hf32 = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.float32).cuda().eval()
    ours_vs_hf16 = ours_vs_hf32 = hf16_vs_hf32 = total = 0
    with torch.inference_mode():
        for prompt, out in zip(prompts, outputs):
            ids = prompt + out.outputs[0].token_ids
            p16, p32 = top1(hf16, ids, len(prompt)), top1(hf32, ids, len(prompt))
            ours = out.outputs[0].token_ids
            ours_vs_hf16 += sum(a == b for a, b in zip(ours, p16))
            ours_vs_hf32 += sum(a == b for a, b in zip(ours, p32))
            hf16_vs_hf32 += sum(a == b for a, b in zip(p16, p32))
            total += len(ours)
    print(f"top-1 agreement over {total} positions: ours-bf16 vs hf-bf16 {ours_vs_hf16 / total:.4f}, "
          f"ours-bf16 vs hf-fp32 {ours_vs_hf32 / total:.4f}, hf-bf16 vs hf-fp32 {hf16_vs_hf32 / total:.4f}")
    assert total >= 2000
    assert ours_vs_hf32 / total >= hf16_vs_hf32 / total - 0.02


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
