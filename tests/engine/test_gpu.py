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


def teacher_forced(hf16, hf32, prompts: list[list[int]], outputs) -> dict[str, list]:
    """Per generated position: does our token match transformers' bf16 / float32 top-1, does
    transformers' bf16 match its float32, and the float32 margin between its top two logits."""
    rows: dict[str, list] = {"ours_vs_hf16": [], "ours_vs_hf32": [], "hf16_vs_hf32": [], "margin": []}
    with torch.inference_mode():
        for prompt, out in zip(prompts, outputs):
            ours = out.outputs[0].token_ids
            ids = torch.tensor([prompt + ours], device="cuda")
            l16 = hf16(ids).logits[0, len(prompt) - 1 : -1]
            l32 = hf32(ids).logits[0, len(prompt) - 1 : -1].float()
            p16, p32 = l16.argmax(-1).tolist(), l32.argmax(-1).tolist()
            top2 = l32.topk(2, dim=-1).values
            rows["margin"] += (top2[:, 0] - top2[:, 1]).tolist()
            rows["ours_vs_hf16"] += [a == b for a, b in zip(ours, p16)]
            rows["ours_vs_hf32"] += [a == b for a, b in zip(ours, p32)]
            rows["hf16_vs_hf32"] += [a == b for a, b in zip(p16, p32)]
    rate = {k: sum(v) / len(v) for k, v in rows.items() if k != "margin"}
    print(f"top-1 agreement over {len(rows['margin'])} positions: " + ", ".join(f"{k} {v:.4f}" for k, v in rate.items()))
    return rows


def rate(flags: list[bool], where: list[int] | None = None) -> float:
    picked = flags if where is None else [flags[i] for i in where]
    return sum(picked) / len(picked)


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
    rows = teacher_forced(hf16, hf32, prompts, outputs)
    assert len(rows["margin"]) >= 2000
    assert rate(rows["ours_vs_hf32"]) >= rate(rows["hf16_vs_hf32"]) - 0.02


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


REAL_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works, step by step.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a vegetable soup and explain each step.",
    "Write a letter to a friend about your summer holiday at the beach.",
    "Explain the difference between a virus and a bacterium.",
    "Tell me about the history of the printing press.",
    "How do airplanes stay in the air?",
    "Write a poem about autumn leaves and the passing of time.",
    "What should I pack for a week-long hiking trip in the mountains?",
    "Explain what a computer program is and how it runs.",
    "Write a dialogue between a cat and a dog arguing about who is the better pet.",
    "Summarize the plot of a fantasy novel you would like to write.",
    "What are good habits for studying effectively? Explain each one.",
    "Describe a busy market in a small town on a Saturday morning.",
]


def hf_from_gguf(path: str, dtype: torch.dtype):
    """transformers' model for a GGUF file: its own GGUF loader, or, where transformers reports
    gguf unavailable, its model class filled from engine.loader.iter_gguf (the CPU test
    test_smollm2_gguf_matches_transformers checks those weights against transformers' loader)."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.loader import iter_gguf

    directory, name = os.path.dirname(path), os.path.basename(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except ImportError:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(dict(iter_gguf(path, config)), strict=False)
        assert not unexpected and all(m.startswith("lm_head.") for m in missing), (missing, unexpected)
        model.tie_weights()
    return model.to(dtype).cuda().eval()


def test_teacher_forced_top1_real_weights(smollm2_path: str) -> None:
    """Trained weights (the embedded SmolLM2 GGUF): our bf16 engine's greedy tokens, teacher-forced
    through transformers' bf16 on the same dequantized weights, over at least 2,000 positions.
    Prints the top-1 agreement overall and by the float32 top-2 margin."""
    llm = LLM(dtype="bfloat16", gpu_memory_utilization=0.3)
    prompts = [llm.llm_engine.apply_chat_template([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=256), use_tqdm=False)
    llm.llm_engine.shutdown()
    del llm
    hf16, hf32 = (hf_from_gguf(smollm2_path, dtype) for dtype in (torch.bfloat16, torch.float32))
    rows = teacher_forced(hf16, hf32, prompts, outputs)
    for cut in (0.05, 0.1, 0.25):
        kept = [i for i, m in enumerate(rows["margin"]) if m > cut]
        print(f"  positions whose fp32 top-2 margin > {cut}: {len(kept)}; ours vs hf-bf16 "
              f"{rate(rows['ours_vs_hf16'], kept):.4f}, hf-bf16 vs hf-fp32 {rate(rows['hf16_vs_hf32'], kept):.4f}")
    assert len(rows["margin"]) >= 2000
    # where the float32 top-2 are within bf16 noise, transformers' own bf16 flips too: ours must
    # agree with transformers' bf16 at least as often as that bf16 agrees with its float32 ...
    assert rate(rows["ours_vs_hf16"]) >= rate(rows["hf16_vs_hf32"]) - 0.005
    # ... and at 99% of the positions whose top-1 is decided beyond that noise
    decided = [i for i, m in enumerate(rows["margin"]) if m > 0.1]
    assert len(decided) >= 2000 and rate(rows["ours_vs_hf16"], decided) >= 0.99
