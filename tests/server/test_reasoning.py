"""Reasoning parsers (issue 16) on fixed texts: the split of a whole output equals the split of its
stream cut at every possible boundary (a tag across tokens), for deepseek_r1 and qwen3."""
from __future__ import annotations

import itertools

import pytest

from engine.config import ConfigError, ServerConfig
from engine.server.reasoning import PARSERS, ReasoningDeltas, assistant_message, split_reasoning

CASES = {  # text -> (deepseek_r1's split, qwen3's split)
    "<think>I should add.</think>\n\n2 + 2 = 4": (("I should add.", "\n\n2 + 2 = 4"),) * 2,
    "Think first</think>The answer": (("Think first", "The answer"), (None, "Think first</think>The answer")),
    "plain answer": (("plain answer", None), (None, "plain answer")),
    "<think>unfinished </thin": (("unfinished </thin", None),) * 2,
    "<think></think>x": (("", "x"),) * 2,
    "a < b </ c </think>ok <think> stays": (("a < b </ c ", "ok <think> stays"),
                                            (None, "a < b </ c </think>ok <think> stays")),
    "<thi": (("<thi", None), (None, "<thi")),
}


@pytest.mark.parametrize("name,which", [("deepseek_r1", 0), ("qwen3", 1)])
@pytest.mark.parametrize("text", list(CASES))
def test_whole_text_split(name: str, which: int, text: str) -> None:
    assert split_reasoning(PARSERS[name], text) == CASES[text][which]


def _stream(name: str, pieces: list[str]) -> tuple[str, str]:
    deltas = ReasoningDeltas(PARSERS[name])
    reasoning = content = ""
    for i, piece in enumerate(pieces):
        d = deltas.delta(0, piece, i == len(pieces) - 1)
        assert d.get("reasoning") == d.get("reasoning_content")
        reasoning += d.get("reasoning_content", "")
        content += d.get("content", "")
    return reasoning, content


@pytest.mark.parametrize("name", list(PARSERS))
@pytest.mark.parametrize("text", list(CASES))
def test_stream_split_at_every_boundary(name: str, text: str) -> None:
    """Every cut into two and three pieces, and one character per token, give the whole text's split."""
    whole = split_reasoning(PARSERS[name], text)
    expected = (whole[0] or "", whole[1] or "")
    n = len(text)
    cuts = [[i] for i in range(1, n)] + [list(c) for c in itertools.combinations(range(1, n), 2)]
    for cut in cuts + [list(range(1, n))]:
        bounds = [0, *cut, n]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        assert _stream(name, pieces) == expected, pieces


def test_message_fields_and_config() -> None:
    message = assistant_message(PARSERS["deepseek_r1"], "why</think>because")
    assert message["reasoning_content"] == message["reasoning"] == "why" and message["content"] == "because"
    assert assistant_message(None, "<think>x</think>y")["content"] == "<think>x</think>y"
    with pytest.raises(ConfigError) as info:
        ServerConfig(reasoning_parser="deepseek")
    assert info.value.param == "reasoning_parser" and "deepseek_r1" in str(info.value)
