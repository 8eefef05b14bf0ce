"""Multi-LoRA offline: three random PEFT adapters of different ranks (written here with peft) and
base-model requests in one batch, greedy tokens equal to peft + transformers float32 per request;
also with max_loras=1 (slots swapped between steps), tp2 on CPU, and no prefix sharing across adapters;
each on both LoRA paths (GANTRY_LORA_PATH: augmented K, one GEMM; sgmv, base GEMM + shrink + expand)."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.lora import LoRARequest
from tests.conftest import TINY_ARCHS, prompts_of_lengths, write_tiny_checkpoint
from tests.engine.test_correctness import hf_greedy

MAX_TOKENS = 12
# (rank, alpha, target modules, rsLoRA): every supported module, attention only, MLP + o with rsLoRA
ADAPTERS = [
    (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    (4, 8, ["q_proj", "v_proj"], False),
    (16, 32, ["o_proj", "gate_proj", "up_proj", "down_proj"], True),
]


def write_adapter(base: str, path: str, rank: int, alpha: int, targets: list[str], rslora: bool, seed: int) -> str:
    """A PEFT adapter with random A and B (PEFT's default B = 0 would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama-untied", "qwen2"])
def base_and_adapters(request, tmp_path_factory) -> tuple[str, list[LoRARequest]]:
    spec = dict(TINY_ARCHS[request.param])
    base = write_tiny_checkpoint(str(tmp_path_factory.mktemp(request.param)), spec.pop("arch"), **spec)
    loras = []
    for i, (rank, alpha, targets, rslora) in enumerate(ADAPTERS):
        path = write_adapter(base, str(tmp_path_factory.mktemp(f"adapter{i}")), rank, alpha, targets, rslora, i)
        loras.append(LoRARequest(f"adapter{i}", i + 1, path))
    return base, loras


@pytest.fixture(scope="module")
def reference(base_and_adapters) -> tuple[list[list[int]], list[LoRARequest | None], list[list[int]]]:
    """(prompts, each prompt's adapter, peft + transformers greedy tokens) for a mixed batch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, loras = base_and_adapters
    prompts = prompts_of_lengths([5, 17, 33, 9, 64, 3, 40, 21])
    per_prompt = [loras[0], None, loras[1], loras[2], loras[0], loras[2], None, loras[1]]
    expected = []
    for prompt, lora in zip(prompts, per_prompt):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if lora is not None:
            model = PeftModel.from_pretrained(model, lora.lora_path)
        expected.append(hf_greedy(model.eval(), prompt, MAX_TOKENS, eos=None))
    return prompts, per_prompt, expected


def _generate(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]


@pytest.fixture(params=["augmented", "sgmv"])
def lora_path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """The LoRA path the engine (and the workers it spawns, which inherit the environment) attaches."""
    monkeypatch.setenv("GANTRY_LORA_PATH", request.param)
    return request.param


@pytest.mark.parametrize("max_loras", [3, 1])
def test_mixed_batch_matches_peft(base_and_adapters, reference, lora_path: str, max_loras: int) -> None:
    base, _ = base_and_adapters
    prompts, loras, expected = reference
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=max_loras, max_lora_rank=16,
              enable_prefix_caching=False)
    assert _generate(llm, prompts, loras) == expected
    base_only = _generate(llm, prompts, [None] * len(prompts))
    # the adapters change the text (else this test could not fail); base requests get the base model
    assert all(b != e for b, e, lora in zip(base_only, expected, loras) if lora is not None)
    assert all(b == e for b, e, lora in zip(base_only, expected, loras) if lora is None)


def test_tp2_matches_peft(base_and_adapters, reference, lora_path: str) -> None:
    """A sharded on input for o/down, B on output for q/k/v/gate/up, as their base layers."""
    base, _ = base_and_adapters
    prompts, loras, expected = reference
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=3, tensor_parallel_size=2, device="cpu",
              enable_prefix_caching=False, distributed_timeout_s=60)
    try:
        assert _generate(llm, prompts, loras) == expected
    finally:
        llm.llm_engine.shutdown()


def test_prefix_cache_not_shared_across_adapters(base_and_adapters) -> None:
    base, loras = base_and_adapters
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=2, enable_prefix_caching=True, block_size=16)
    prompt = prompts_of_lengths([70], seed=7)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def run(lora: LoRARequest | None) -> tuple[list[int], int]:
        out = llm.generate([prompt], params, use_tqdm=False, lora_request=lora)[0]
        return out.outputs[0].token_ids, out.num_cached_tokens

    first_a, cached = run(loras[0])
    assert cached == 0
    b, cached_b = run(loras[1])
    assert cached_b == 0  # adapter 1 may not read adapter 0's K/V for the same prompt
    base_tokens, cached_base = run(None)
    assert cached_base == 0
    again_a, cached_again = run(loras[0])
    assert cached_again == 64 and again_a == first_a  # its own pages are reused
    assert len({tuple(first_a), tuple(b), tuple(base_tokens)}) == 3


def test_tiles_cover_each_adapters_tokens_once() -> None:
    """The Triton path's tiles: each slot's grouped tokens cut into tiles of at most `tile`, empty slots none."""
    import numpy as np

    from engine.lora.manager import tile_segments

    seg_start, seg_slot = tile_segments(np.array([70, 0, 5, 32]), 32)
    assert seg_start.tolist() == [0, 32, 64, 70, 75, 107] and seg_slot.tolist() == [0, 0, 0, 2, 3]
