"""The decode step's host shortcuts change no output: the output processor's final_only (the offline
API) gives the same finished RequestOutputs and builds none for running requests, except DELTA."""
from __future__ import annotations

import pytest

from engine.core_messages import EngineCoreOutput
from engine.output_processor import OutputProcessor
from engine.sampling_params import RequestOutputKind, SamplingParams


def run(final_only: bool, kind: RequestOutputKind) -> list[list]:
    """Two requests fed one token per step, the second finishing first; every step's outputs."""
    op = OutputProcessor(None)
    for rid in ("a", "b"):
        op.add_request(rid, None, [1, 2], SamplingParams(max_tokens=100, output_kind=kind, detokenize=False), 0.0)
    steps = []
    for step in range(4):
        outs = [EngineCoreOutput(request_id="a", new_token_ids=[10 + step], finish_reason="length" if step == 3 else None)]
        if step < 2:
            outs.append(EngineCoreOutput(request_id="b", new_token_ids=[20 + step],
                                         finish_reason="length" if step == 1 else None))
        steps.append(op.process_outputs(outs, final_only=final_only).request_outputs)
    return steps


def summary(outputs: list) -> list[tuple]:
    return [(o.request_id, o.finished, [(c.token_ids, c.finish_reason) for c in o.outputs]) for o in outputs]


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA])
def test_final_only_keeps_the_finished_outputs(kind: RequestOutputKind) -> None:
    every, final = run(False, kind), run(True, kind)
    # what LLMEngine keeps when it does not stream: the finished outputs, the same either way
    assert [summary([o for o in s if o.finished]) for s in every] == [summary([o for o in s if o.finished])
                                                                      for s in final]
    assert summary(final[1]) == summary([o for o in every[1] if o.finished or kind == RequestOutputKind.DELTA])
    if kind == RequestOutputKind.DELTA:  # each step's delta is still built: it advances what was sent
        assert summary(final[3]) == summary(every[3]) == [("a", True, [([13], "length")])]
    else:
        assert final[0] == [] and summary(final[3]) == [("a", True, [([10, 11, 12, 13], "length")])]
