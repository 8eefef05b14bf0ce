"""Tensor-parallel checks shared by the quantized-checkpoint tests (compressed-tensors, GPTQ, AWQ): a
torchrun tp2 group on CPU (gloo) against one process, and a tp2 load that must fail."""
from __future__ import annotations

import json

from engine import LLM, SamplingParams
from tests.conftest import prompts_of_lengths


def assert_tp2_equals_tp1(path: str, tmp_path) -> None:
    """Greedy tokens of a torchrun tp2 group (gloo) equal one process's, on prompts of many lengths."""
    from tests.engine.test_distributed import finish, torchrun

    llm = LLM(path, enable_prefix_caching=False, device="cpu")
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts_of_lengths([1, 5, 17, 33, 64, 100, 177, 300]),
                 SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)]
    llm.llm_engine.shutdown()
    out = tmp_path / "tokens.json"
    finish(torchrun(2, [path, "2", "1", str(out)]))
    assert json.loads(out.read_text()) == reference


def tp2_load_failure(path: str, tmp_path) -> str:
    """A tp2 group that must refuse the checkpoint: its output (it exited non-zero)."""
    from tests.engine.test_distributed import torchrun

    proc = torchrun(2, [path, "2", "1", str(tmp_path / "none.json")])
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    return text
