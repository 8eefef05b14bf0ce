"""The API's beam search and best_of fields (vLLM's, through the openai client's extra_body): each bad
value a 400 naming its field; the server's beam search driven by a fake one-step generate; best_of
selection. No live server: the protocol parsers and engine/server/beam.py are called directly."""
from __future__ import annotations

import asyncio
import json
import math
from contextlib import asynccontextmanager
from types import SimpleNamespace

import httpx
import pytest

from engine.beam_search import MAX_BEAM_WIDTH, BeamSearchParams
from engine.errors import RequestError
from engine.outputs import Logprob
from engine.server.beam import (
    best_of_order,
    run_beam_search,
    run_beam_search_all,
    select_best_of,
    step_generate,
    step_output,
)
from engine.server.protocol import APIError, ModelContext
from engine.server.protocol_completion import parse_completion_request
from engine.server.protocol_chat import parse_chat_request

CTX = ModelContext("tiny", max_model_len=64, vocab_size=16, max_num_seqs=8)
CHAT = [{"role": "user", "content": "hi"}]


def completion(**fields):
    return parse_completion_request({"prompt": "hello", **fields}, CTX)


def chat(**fields):
    return parse_chat_request({"messages": CHAT, **fields}, CTX)


def refused(parse, **fields) -> APIError:
    with pytest.raises(APIError) as e:
        parse(**fields)
    assert e.value.status == 400 and e.value.message.startswith(f"{e.value.param}: ")
    return e.value


def openai_body(**kwargs) -> dict:
    """The JSON the openai client sends for completions.create(**kwargs) (captured, never sent)."""
    import openai

    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return httpx.Response(400, json={"error": {"message": "captured", "type": "x", "param": None, "code": None}})

    client = openai.OpenAI(api_key="x", base_url="http://localhost/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hello", **kwargs)
    return json.loads(sent[0])


def test_openai_client_extra_body_reaches_beam_params() -> None:
    body = openai_body(n=2, max_tokens=5, extra_body={"use_beam_search": True, "beam_width": 4,
                                                      "length_penalty": 0.5, "early_stopping": "never"})
    req = parse_completion_request(body, CTX)
    assert req.beam == BeamSearchParams(beam_width=4, max_tokens=5, length_penalty=0.5, early_stopping="never")
    assert req.params.n == 2


def test_beam_width_defaults() -> None:
    assert completion(use_beam_search=True, n=3).beam.beam_width == 3  # vLLM: n beams
    assert completion(use_beam_search=True, best_of=5, n=2).beam.beam_width == 5  # best_of: the width
    beam = chat(use_beam_search=True, early_stopping=True, max_tokens=7).beam
    assert (beam.beam_width, beam.max_tokens, beam.early_stopping, beam.length_penalty) == (1, 7, True, 1.0)
    assert chat(use_beam_search=True).beam.max_tokens is None  # up to the context left, as sampling
    assert completion(temperature=0, use_beam_search=True, top_k=-1).beam is not None  # neutral values pass
    assert completion(n=2).beam is None


@pytest.mark.parametrize("parse", [completion, chat])
@pytest.mark.parametrize("fields, param", [
    ({"use_beam_search": True, "beam_width": 0}, "beam_width"),
    ({"use_beam_search": True, "beam_width": -3}, "beam_width"),
    ({"use_beam_search": True, "beam_width": 9}, "beam_width"),  # above max_num_seqs (8)
    ({"use_beam_search": True, "best_of": 9}, "best_of"),
    ({"use_beam_search": True, "n": 9}, "n"),
    ({"use_beam_search": True, "beam_width": 2, "n": 3}, "beam_width"),
    ({"use_beam_search": True, "best_of": 2, "n": 3}, "best_of"),
    ({"use_beam_search": True, "beam_width": 4, "best_of": 3}, "best_of"),
    ({"use_beam_search": True, "beam_width": "4"}, "beam_width"),
    ({"use_beam_search": True, "stream": True}, "stream"),
    ({"use_beam_search": True, "early_stopping": "sometimes"}, "early_stopping"),
    ({"use_beam_search": True, "early_stopping": 1}, "early_stopping"),
    ({"use_beam_search": True, "length_penalty": "long"}, "length_penalty"),
    ({"use_beam_search": True, "length_penalty": math.inf}, "length_penalty"),
    ({"use_beam_search": True, "length_penalty": 2000}, "length_penalty"),  # a score overflowed: a 500 before
    ({"use_beam_search": True, "structured_outputs": {"regex": "a"}}, "structured_outputs"),  # ignored before
    ({"use_beam_search": True, "logit_bias": {"5": 10}}, "logit_bias"),
    ({"use_beam_search": True, "length_penalty": -2000}, "length_penalty"),  # divided by 0.0: a 500 before
    ({"use_beam_search": True, "temperature": 0.7}, "temperature"),
    ({"use_beam_search": True, "top_p": 0.9}, "top_p"),
    ({"use_beam_search": True, "stop": ["x"]}, "stop"),
    ({"use_beam_search": "yes"}, "use_beam_search"),
    ({"beam_width": 4}, "beam_width"),  # only with use_beam_search: never silently ignored
    ({"length_penalty": 2.0}, "length_penalty"),
    ({"best_of": 1, "n": 2}, "best_of"),  # best_of < n
    ({"best_of": 0}, "best_of"),
    ({"best_of": 3, "n": 2, "stream": True}, "best_of"),
])
def test_bad_fields_are_400s_naming_the_field(parse, fields: dict, param: str) -> None:
    assert refused(parse, **fields).param == param


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_chat_constraints_refused_with_beams(fields: dict, param: str) -> None:
    """A beam's greedy steps apply no constraint: these came back broken with a 200 (found by fuzzing the API)."""
    assert refused(chat, use_beam_search=True, **fields).param == param


def test_beam_search_refuses_logprobs() -> None:
    assert refused(completion, use_beam_search=True, logprobs=2).param == "logprobs"
    assert refused(chat, use_beam_search=True, logprobs=True).param == "logprobs"


def test_best_of_sampling_is_accepted() -> None:
    """It was refused before (best_of had to equal n)."""
    req = completion(n=2, best_of=4, temperature=1.0)
    assert (req.params.n, req.params.best_of, req.beam) == (2, 4, None)
    assert chat(best_of=2, n=2, stream=True).params.best_of == 2  # equal to n: streams as usual


def test_beam_width_bounded_without_max_num_seqs() -> None:
    ctx = ModelContext("tiny", max_model_len=64, vocab_size=16)
    with pytest.raises(APIError) as e:
        parse_completion_request({"prompt": "x", "use_beam_search": True, "beam_width": MAX_BEAM_WIDTH + 1}, ctx)
    assert e.value.param == "beam_width"


# ---- the server's beam search, with a fake model behind a fake generate

VOCAB, EOS = 12, 0


def fake_logprobs(token_ids: list[int]) -> dict[int, float]:
    """A deterministic 'model': next-token log-probabilities from the whole context."""
    weights = [((sum(token_ids) * 31 + len(token_ids) * 7 + t * 13) % 17) + 1 for t in range(VOCAB)]
    total = sum(weights)
    return {t: math.log(w / total) for t, w in enumerate(weights)}


class FakeEngine:
    def __init__(self, block_at_step: int | None = None):
        self.requests: list[tuple[str, list[int]]] = []
        self.params = []
        self.block_at_step, self.num_steps = block_at_step, 0
        self.cancelled = False

    async def generate(self, requests):
        self.num_steps += 1
        if self.num_steps == self.block_at_step:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled = True  # the real generate aborts its requests here
                raise
        outputs = []
        for request_id, token_ids, params in requests:
            self.requests.append((request_id, token_ids))
            self.params.append(params)
            top = sorted(fake_logprobs(token_ids).items(), key=lambda kv: -kv[1])[: params.logprobs]
            entry = {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(top, 1)}
            outputs.append(step_output([top[0][0]], [entry]))
        return outputs


class FakeTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("<eos>" if t == EOS else chr(ord("a") + t) for t in ids
                       if not (skip_special_tokens and t == EOS))


def test_run_beam_search_with_a_fake_generate() -> None:
    engine = FakeEngine()
    params = BeamSearchParams(4, 6, length_penalty=1.0, include_stop_str_in_output=True)
    results = asyncio.run(run_beam_search(engine.generate, [3, 5], params, 2, eos_token_ids=[EOS], max_model_len=64,
                                          tokenizer=FakeTokenizer(), request_id="cmpl-1"))
    assert len(results) == 2 and results[0].score >= results[1].score
    ids = [rid for rid, _ in engine.requests]
    assert len(set(ids)) == len(ids) and all(rid.startswith("cmpl-1-") for rid in ids)
    assert all(p.max_tokens == 1 and p.temperature == 0 and p.logprobs == 4 + 1 for p in engine.params)
    for r in results:
        # the cumulative logprob is the fake model's own, token by token from the prompt
        context, total = [3, 5], 0.0
        for t in r.token_ids:
            total += fake_logprobs(context)[t]
            context.append(t)
        assert r.cumulative_logprob == pytest.approx(total)
        assert r.score == pytest.approx(total / len(r.token_ids))
        assert r.text == FakeTokenizer().decode(r.token_ids, skip_special_tokens=False)
        assert r.finish_reason == ("stop" if r.token_ids[-1] == EOS else "length")


def test_run_beam_search_refuses_before_generating() -> None:
    engine = FakeEngine()
    with pytest.raises(RequestError) as e:
        asyncio.run(run_beam_search(engine.generate, [3] * 60, BeamSearchParams(2, 10), 1, eos_token_ids=[EOS],
                                    max_model_len=64, tokenizer=None, request_id="r"))
    assert e.value.param == "max_tokens" and engine.num_steps == 0


def test_cancelling_the_search_cancels_the_step_in_flight() -> None:
    engine = FakeEngine(block_at_step=2)

    async def main() -> None:
        task = asyncio.create_task(run_beam_search(engine.generate, [1, 2], BeamSearchParams(2, 5), 1,
                                                   eos_token_ids=[EOS], max_model_len=64, tokenizer=None,
                                                   request_id="r"))
        while engine.num_steps < 2:
            await asyncio.sleep(0.01)
        task.cancel()  # the client left
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert engine.cancelled


def test_select_best_of() -> None:
    assert select_best_of([-3.0, -1.0, -2.0, -1.0], 2) == [1, 3]  # highest first; ties keep order
    assert select_best_of([-5.0], 1) == [0]


class FakeAsyncLLM:
    """AsyncLLM.generate's shape: a context yielding deltas (two per request: a token, then its finish)."""

    def __init__(self, hang_at_step: int | None = None):
        self.num_steps, self.hang_at_step = 0, hang_at_step
        self.aborted: list[str] = []

    @asynccontextmanager
    async def generate(self, requests, arrival_time: float):
        self.num_steps += 1
        finished: set[str] = set()

        async def deltas():
            if self.num_steps == self.hang_at_step:
                await asyncio.sleep(3600)
            for request_id, token_ids, params in requests:
                top = sorted(fake_logprobs(token_ids).items(), key=lambda kv: -kv[1])[: params.logprobs]
                entry = {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(top, 1)}
                sample = SimpleNamespace(new_token_ids=[top[0][0]], new_logprobs=[entry])
                yield SimpleNamespace(request_id=request_id, samples=[sample])
                finished.add(request_id)
                yield SimpleNamespace(request_id=request_id, samples=[SimpleNamespace(new_token_ids=[],
                                                                                      new_logprobs=None)])

        try:
            yield deltas()
        finally:
            self.aborted += [rid for rid, _, _ in requests if rid not in finished]


def test_step_generate_over_the_async_engine() -> None:
    params = BeamSearchParams(3, 5)
    kwargs = {"eos_token_ids": [EOS], "max_model_len": 64, "tokenizer": None, "request_id": "r"}
    expected = asyncio.run(run_beam_search(FakeEngine().generate, [4, 4], params, 3, **kwargs))
    llm = FakeAsyncLLM()
    got = asyncio.run(run_beam_search(step_generate(llm.generate), [4, 4], params, 3, **kwargs))
    assert got == expected and llm.num_steps > 1 and not llm.aborted

    hanging = FakeAsyncLLM(hang_at_step=2)

    async def leave() -> None:
        task = asyncio.create_task(run_beam_search(step_generate(hanging.generate), [4, 4], params, 3, **kwargs))
        while hanging.num_steps < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave())
    assert len(hanging.aborted) == 3  # the step in flight: all 3 beams' requests aborted


def test_best_of_order_from_collected_samples() -> None:
    def sample(*lps: float):
        ids = list(range(len(lps)))
        return ids, [{t: Logprob(lp, 1)} for t, lp in zip(ids, lps)]

    samples = [sample(-1.0, -2.0), sample(-0.5), sample(-0.1, -0.1, -0.1), sample(-4.0)]
    assert best_of_order(samples, 2) == [2, 1]


def test_run_beam_search_all_prompts() -> None:
    kwargs = {"eos_token_ids": [EOS], "max_model_len": 64, "tokenizer": None, "request_id": "cmpl"}
    params, prompts = BeamSearchParams(3, 4), [[1, 2], [7], [5, 5, 5]]
    alone = [asyncio.run(run_beam_search(FakeEngine().generate, p, params, 2, **kwargs)) for p in prompts]
    engine = FakeEngine()
    assert asyncio.run(run_beam_search_all(engine.generate, prompts, params, 2, **kwargs)) == alone
    assert {rid.split("-beam")[0] for rid, _ in engine.requests} == {"cmpl-0", "cmpl-1", "cmpl-2"}
    hanging = FakeEngine(block_at_step=1)
    with pytest.raises(RequestError) as e:  # one prompt too long for max_tokens: refused, the other cancelled
        asyncio.run(run_beam_search_all(hanging.generate, [[1], [2] * 62], params, 2, **kwargs))
    assert e.value.param == "max_tokens" and hanging.cancelled


def test_a_dead_engine_fails_a_beam_search_as_a_500() -> None:
    """The engine core dying mid-search is the same clean 500 (code internal_error) that a sampling request gets,
    not an unhandled error with a traceback (found by fuzzing the API)."""
    from engine.server.serving import beam_search

    @asynccontextmanager
    async def dead(requests, arrival):
        raise RuntimeError("the engine core exited (code -9)")
        yield

    state = SimpleNamespace(check_capacity=lambda *args: None, engine=SimpleNamespace(generate=dead, eos_token_ids={EOS}),
                            model_info=SimpleNamespace(default_max_tokens=None, max_model_len=64),
                            frontend=SimpleNamespace(tokenizer=None))
    with pytest.raises(APIError) as e:
        asyncio.run(beam_search(state, [[4, 4]], BeamSearchParams(2, 4), 2, "cmpl-1", "prompt"))
    assert e.value.status == 500 and e.value.body()["error"]["code"] == "internal_error"
