"""Results.apply_all (engine/server/results.py): a stream that fell behind the engine by several steps
gets one merged entry per sample, with every token, its text and logprobs kept, in first-change order."""
from __future__ import annotations

from engine.outputs import Logprob
from engine.server.request_stream import RequestDelta, SampleDelta
from engine.server.results import Results


def delta(rid: str, index: int, text: str, ids: list[int], finish: str | None = None) -> RequestDelta:
    lps = [{i: Logprob(logprob=-0.5, rank=1, decoded_token=None)} for i in ids]
    return RequestDelta(rid, [SampleDelta(index, text, ids, lps, finish, None)], finish is not None)


def test_queued_steps_merge_into_one_entry_per_sample() -> None:
    results = Results(["a", "b"], n=2)
    batch = [delta("a", 1, "He", [5]), delta("b", 0, "x", [9]), delta("a", 1, "llo", [6, 7]),
             delta("a", 0, "", [8]), delta("b", 0, "y", [10], finish="length")]
    merged = results.apply_all(batch)
    assert [(c, text, num) for c, _, text, num in merged] == [(1, "Hello", 3), (2, "xy", 2), (0, "", 1)]
    sample = merged[0][1]
    assert sample.text == "Hello" and sample.token_ids == [5, 6, 7] and len(sample.logprobs) == 3
    assert merged[1][1].finish_reason == "length"
    # the next write starts from here: only what is new
    assert [(c, text, num) for c, _, text, num in results.apply_all([delta("a", 1, "!", [11])])] == [(1, "!", 1)]
    assert results.usage()["completion_tokens"] == 7


def test_nothing_queued_nothing_written() -> None:
    assert Results(["a"], n=1).apply_all([]) == []
