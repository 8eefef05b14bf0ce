"""Beam search and best_of through the openai client (issue 17), on the shared SmolLM2 server:
use_beam_search in extra_body returns n of the beams, best first, and width 1 is greedy decoding;
best_of > n returns the n samples with the highest cumulative logprob."""
from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL, LiveServer


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


PROMPT = "The three primary colors are"


def test_width_1_beam_search_is_greedy(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    beam = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"use_beam_search": True, "best_of": 1})
    assert beam.choices[0].text == greedy.choices[0].text


def test_beam_search_returns_n_distinct_beams(client: openai.OpenAI, server: LiveServer) -> None:
    r = client.completions.create(model=MODEL, prompt=[PROMPT, "Paris is the capital of"], max_tokens=10, n=2,
                                  temperature=0, extra_body={"use_beam_search": True, "best_of": 4,
                                                             "length_penalty": 1.0})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text != r.choices[1].text and r.choices[2].text != r.choices[3].text
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.completion_tokens > 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}],
                                          max_tokens=8, n=3, extra_body={"use_beam_search": True, "beam_width": 3})
    assert len(chat.choices) == 3 and len({c.message.content for c in chat.choices}) == 3
    assert server.wait_idle()[("gantry:kv_cache_usage_perc", ())] == 0


def test_best_of_keeps_the_most_likely_samples(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, temperature=1.0, seed=7,
                                  logprobs=0, extra_body={"best_of": 5})
    assert len(r.choices) == 2
    totals = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert totals[0] >= totals[1]  # best first
    every = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=5, temperature=1.0, seed=7,
                                      logprobs=0)
    best_two = sorted((sum(c.logprobs.token_logprobs) for c in every.choices), reverse=True)[:2]
    assert totals == pytest.approx(best_two, abs=1e-4)  # the same 5 samples (same seed), the 2 best kept
