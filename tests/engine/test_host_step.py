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


def test_decode_inputs_match_the_per_request_loop() -> None:
    """decode_inputs (numpy over the batch) gives what prepare_inputs' per-request loop gives: slots from
    the block table, placeholders fed from the previous step's rows (looked up when the order changed)."""
    import numpy as np

    from engine.decode_inputs import decode_inputs
    from engine.model_runner import PLACEHOLDER, RunnerRequestState

    bs, table = 4, np.zeros((4, 8), dtype=np.int32)
    states = [RunnerRequestState([5, 6, 7, PLACEHOLDER], [9, 3], 3, None, 2, 3),  # decodes its placeholder
              RunnerRequestState([1, 2, 3, 4, 8], [7, 1], 4, None, 0, 5),  # a known token, sampled
              RunnerRequestState([1, 2, 3, 4, 8, 9], [2, 6, 4], 4, None, 1, 6)]  # a known token, not the newest
    for s in states:
        table[s.row, : len(s.block_ids)] = s.block_ids
    asked = []

    def rows(ids: list[str]) -> list[int]:
        asked.append(ids)
        return [{"x": 1, "a": 0}[r] for r in ids]

    d = decode_inputs(states, ["a", "b", "c"], table, bs, PLACEHOLDER, rows)
    assert d["input_ids"].tolist() == [PLACEHOLDER, 8, 8] and d["positions"].tolist() == [3, 4, 4]
    assert d["slots"].tolist() == [9 * bs + 3, 1 * bs + 0, 6 * bs + 0]
    assert d["seq_lens"].tolist() == [4, 5, 5] and d["query_start_loc"].tolist() == [0, 1, 2, 3]
    assert d["logits_indices"].tolist() == [0, 1] and d["sampled_ids"] == ["a", "b"]
    assert d["block_tables"].tolist() == [[9, 3, 0], [7, 1, 0], [2, 6, 4]] and d["max_seq_len"] == 5
    assert d["feed_dst"].tolist() == [0] and d["feed_src"].tolist() == [0] and asked == [["a"]]
    assert [s.num_computed_tokens for s in states] == [4, 5, 5]


def test_metadata_builder_matches_a_fresh_build() -> None:
    """SamplingMetadataBuilder reuses its params tensors while the rows' params are the same objects; what
    depends on the tokens (seeded generators, min_tokens bans, penalty counts) still follows every step."""
    import torch

    from engine.model_runner import RunnerRequestState
    from engine.outputs import RequestSamplingParams
    from engine.sampling_metadata import (
        SamplingMetadataBuilder,
        build_sampling_metadata,
    )

    def params(**kw) -> RequestSamplingParams:
        base = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "repetition_penalty": 1.0, "has_penalties": False, "min_tokens": 0,
                "stop_token_ids": [], "eos_token_ids": [2], "logprobs": None, "prompt_logprobs": None,
                "num_prompt_tokens": 2}
        return RequestSamplingParams(**{**base, **kw})

    states = [RunnerRequestState([5, 6], [0], 2, params(), 0, 2),
              RunnerRequestState([5, 6], [1], 2, params(temperature=0.7, seed=3, top_p=0.9), 1, 2),
              RunnerRequestState([7, 8], [2], 2, params(min_tokens=2, presence_penalty=0.5, has_penalties=True,
                                                        logprobs=2), 2, 2)]
    builder, vocab, cpu = SamplingMetadataBuilder(16, torch.device("cpu")), 16, torch.device("cpu")

    def same(a, b) -> None:
        for name in ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "output_token_counts",
                     "prompt_token_mask"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
        assert (a.all_greedy, a.max_num_logprobs) == (b.all_greedy, b.max_num_logprobs)
        assert [(r, t.tolist()) for r, t in a.min_tokens_mask] == [(r, t.tolist()) for r, t in b.min_tokens_mask]
        assert {r: g.initial_seed() for r, g in a.generators.items()} == {r: g.initial_seed() for r, g in b.generators.items()}

    first = None
    for step in range(3):
        md = builder.build(states, None)
        same(md, build_sampling_metadata(states, vocab, cpu, None))
        first = first or md
        assert md.temperature is first.temperature  # kept: same params objects, same order
        assert bool(md.min_tokens_mask) == (step < 2) and md.generators  # the bans end at min_tokens
        for s in states:
            s.token_ids.append(9 + step)
    states.reverse()  # another order: rebuilt
    md = builder.build(states, None)
    same(md, build_sampling_metadata(states, vocab, cpu, None))
    assert md.temperature is not first.temperature
