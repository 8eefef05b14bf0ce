"""The OpenAI API through the official `openai` client (sync and async) and real curl,
against a live server on the embedded SmolLM2."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import httpx
import openai
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL, LiveServer


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="na", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="na", max_retries=0, timeout=120)


def tokenize(server: LiveServer, **body) -> list[int]:
    r = httpx.post(server.url("/tokenize"), json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_models_list(client: openai.OpenAI):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    m = models[0]
    assert m.object == "model" and m.owned_by == "gantry" and m.created > 0
    assert m.model_extra["max_model_len"] == MAX_MODEL_LEN


def test_completion_string_prompt_usage(server: LiveServer, client: openai.OpenAI):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.text
    assert r.usage.prompt_tokens == len(tokenize(server, prompt=prompt))
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_completion_list_and_token_prompts(server: LiveServer, client: openai.OpenAI):
    prompts = ["Hello, my name is", "The sky is"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(len(tokenize(server, prompt=p)) for p in prompts)
    assert r.usage.completion_tokens == 8
    # token ids give the same greedy text as the string they encode
    ids = tokenize(server, prompt=prompts[0])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=MODEL, prompt=[ids, tokenize(server, prompt=prompts[1])],
                                      max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in batch.choices] == [c.text for c in r.choices]


def test_completion_echo_logprobs_n_stop(client: openai.OpenAI):
    prompt = "Once upon a time"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    (c,) = r.choices
    assert c.text.startswith(prompt)
    lp = c.logprobs
    n_gen = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == r.usage.prompt_tokens + n_gen
    assert lp.token_logprobs[0] is None  # echoed prompt tokens have no logprob
    assert all(x <= 0 for x in lp.token_logprobs[-n_gen:])
    assert all(2 <= len(t) <= 3 for t in lp.top_logprobs[-n_gen:])
    assert lp.text_offset == sorted(lp.text_offset)

    r3 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, n=3, temperature=1.0, seed=7,
                                   extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r3.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r3.choices)
    assert r3.usage.completion_tokens == 18 and r3.usage.prompt_tokens == len(lp.tokens) - n_gen
    assert len({c.text for c in r3.choices}) > 1  # three samples, not one copied

    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    word = greedy.split()[1]
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[word])
    (s,) = stopped.choices
    assert s.finish_reason == "stop" and word not in s.text and greedy.startswith(s.text)
    assert s.model_extra["stop_reason"] == word


def test_chat_plain(server: LiveServer, client: openai.OpenAI):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (c,) = r.choices
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tokenize(server, messages=messages))
    assert 0 < r.usage.completion_tokens <= 8


def test_chat_continue_final_message(server: LiveServer, client: openai.OpenAI):
    """vLLM's assistant prefill: the last assistant message stays open, so the answer goes on from its text, as a
    completion of the template's text without the message's end does (it was ignored: fuzzing the API)."""
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "The answer is"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    closed = tokenize(server, messages=messages, add_generation_prompt=False)  # ends with the message's <|im_end|>
    assert r.usage.prompt_tokens < len(closed)
    text = httpx.post(server.url("/detokenize"), json={"model": MODEL, "tokens": closed}, timeout=30).json()["prompt"]
    prompt = text[: text.rindex("The answer is") + len("The answer is")]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].text


def test_chat_n2_stop_max_completion_tokens_logprobs(client: openai.OpenAI):
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_completion_tokens=6,
                                       temperature=1.0, seed=3, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 12
    for c in r.choices:
        assert c.finish_reason == "length"
        content = c.logprobs.content
        assert len(content) == 6
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
        assert "".join(t.token for t in content) == c.message.content
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    text = greedy.choices[0].message.content
    word = text.split()[2]
    stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                             stop=word)
    assert stopped.choices[0].finish_reason == "stop"
    assert text.startswith(stopped.choices[0].message.content) and word not in stopped.choices[0].message.content


def test_chat_seed_reproducible(client: openai.OpenAI):
    messages = [{"role": "user", "content": "Tell me a joke."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b


def test_chat_streaming_with_usage(server: LiveServer, client: openai.OpenAI):
    messages = [{"role": "user", "content": "Count from one to ten."}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert text == plain.choices[0].message.content
    assert usage_chunk.usage.completion_tokens == plain.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == len(tokenize(server, messages=messages))


def test_completion_streaming(client: openai.OpenAI):
    stream = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks)
    plain = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert text == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_every_sampling_field_accepted(client: openai.OpenAI):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, seed=1,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 5,
                    "stop_token_ids": [2], "skip_special_tokens": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0.5, top_p=0.8,
                                  presence_penalty=0.1, frequency_penalty=0.1, seed=2,
                                  extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 3,
                                              "ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_max_tokens_absent_runs_to_the_end(client: openai.OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say yes."}],
                                       temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0


def test_async_client_concurrent(aclient: openai.AsyncOpenAI):
    async def one(i: int) -> str:
        r = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Number {i}"}],
                                                  max_tokens=4, temperature=0)
        return r.choices[0].message.content

    async def run() -> list[str]:
        models = await aclient.models.list()
        assert models.data[0].id == MODEL
        stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=4, stream=True)
        streamed = [c async for c in stream]
        assert streamed[-1].choices[0].finish_reason in ("stop", "length")
        return await asyncio.gather(*(one(i) for i in range(8)))

    texts = asyncio.run(run())
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)


def test_seed_streaming_client_example(server: LiveServer, capsys: pytest.CaptureFixture):
    # The seed's client, unchanged except for the URL and the model name.
    from openai import OpenAI
    client = OpenAI(base_url=server.url("/v1"), api_key='na')
    chat_completion = client.chat.completions.create(
       model=MODEL,
       messages=[{"role": "user", "content": "Tell me something about large language models."}],
       stream=True,
       max_tokens=24,  # keeps the CPU test short; not in the seed
    )
    for chunk in chat_completion:
       print(chunk.choices[0].delta.content or "", end="")
    assert len(capsys.readouterr().out.strip()) > 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed_curl_example(server: LiveServer):
    # The seed's curl POST, unchanged except for the URL and the model name.
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", server.url("/v1/chat/completions"),
         "-H", "Content-Type: application/json",
         "--data", '{"model": "%s",\n          "messages": [{"role": "user", "content": '
                   '"What is the capital of France?"}]}' % MODEL],
        capture_output=True, text=True, timeout=120, check=True).stdout
    body = json.loads(out)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_tokenize_detokenize_roundtrip(server: LiveServer):
    text = "Gantry serves models."
    r = httpx.post(server.url("/tokenize"), json={"model": MODEL, "prompt": text}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN
    back = httpx.post(server.url("/detokenize"), json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    assert r["token_strs"] is None
    # vLLM's return_token_strs: each token's vocabulary string (it was ignored: token_strs stayed null)
    strs = []
    for body in ({"prompt": text}, {"messages": [{"role": "user", "content": text}]}):
        s = httpx.post(server.url("/tokenize"), json={"model": MODEL, "return_token_strs": True, **body}).json()
        assert len(s["token_strs"]) == s["count"]
        strs.append(s["token_strs"])
    assert "".join(strs[0]).replace("Ġ", " ") == text and strs[1][0] == "<|im_start|>"  # byte-level BPE pieces


def test_ops_routes(server: LiveServer):
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/ready")).json() == {"status": "ready"}
    assert "version" in httpx.get(server.url("/version")).json()
    m = server.metrics()
    assert m[("gantry:generation_tokens_total", ())] > 0
    assert m[("gantry:time_to_first_token_seconds_count", ())] > 0
    assert m[("gantry:http_requests_total", (("method", "POST"), ("route", "/v1/chat/completions"),
                                              ("status", "200")))] > 0


def test_chat_streaming_n2(client: openai.OpenAI):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                            max_tokens=5, temperature=1.0, seed=5, stream=True,
                                            extra_body={"ignore_eos": True})
    texts, finishes, roles = ["", ""], [None, None], set()
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert roles == {0, 1} and finishes == ["length", "length"] and all(texts)


def test_completion_streaming_echo(client: openai.OpenAI):
    prompt = "Paris is"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text.startswith(prompt)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text


def test_completion_echo_with_max_tokens_0_scores_the_prompt(server: LiveServer, client: openai.OpenAI):
    """echo with max_tokens 0 (OpenAI's legacy API and vLLM: how evaluation harnesses score a prompt) gives the
    prompt alone with its logprobs, finished by length, no completion tokens; it was a 400 naming max_tokens."""
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=[prompt, "Hi"], max_tokens=0, echo=True, logprobs=1, n=2)
    assert [c.text for c in r.choices] == [prompt, prompt, "Hi", "Hi"]
    assert {c.finish_reason for c in r.choices} == {"length"}
    ids = tokenize(server, prompt=prompt)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids) and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert r.usage.prompt_tokens == len(ids) + 1 and r.usage.completion_tokens == 0  # per prompt, not per choice
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # without echo there is nothing to return
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)


def test_model_empty_or_absent_is_the_served_model(server: LiveServer):
    """`model` "" or absent names the served model, as in vLLM (an empty name was a 404)."""
    for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
                       ("/tokenize", {"prompt": "Hi"})):
        for model in ({"model": ""}, {}):
            r = httpx.post(server.url(path), json={**model, **body}, timeout=60)
            assert r.status_code == 200, (path, model, r.text)
            assert r.json().get("model", MODEL) == MODEL


def test_chat_template_kwargs(server: LiveServer, client: openai.OpenAI):
    """vLLM's chat_template_kwargs reach the chat template on chat and /tokenize (they were a 400: Qwen3's
    {"enable_thinking": false} is a common one); a key that is no template variable is a 400 naming it."""
    ask = [{"role": "user", "content": "Hi"}]
    open_ids = tokenize(server, messages=ask)
    closed_ids = tokenize(server, messages=ask, chat_template_kwargs={"add_generation_prompt": False})
    assert len(closed_ids) < len(open_ids) and open_ids[:len(closed_ids)] == closed_ids
    r = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.usage.prompt_tokens == len(open_ids)
    r = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert r.usage.prompt_tokens == len(closed_ids)
    for kwargs, param in (({"tokenize": True}, "chat_template_kwargs.tokenize"), ([1], "chat_template_kwargs")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=ask, max_tokens=1,
                                           extra_body={"chat_template_kwargs": kwargs})
        assert info.value.body["param"] == param


def test_return_tokens_as_token_ids(client: openai.OpenAI):
    """vLLM's return_tokens_as_token_ids: logprob entries name their tokens "token_id:{id}" (chat and legacy
    completions, streamed or not); bytes and text offsets stay the text's. It was a 400."""
    ask = [{"role": "user", "content": "Hi"}]
    extra = {"return_tokens_as_token_ids": True}
    plain = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=2, extra_body={"ignore_eos": True})
    named = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=2, extra_body={"ignore_eos": True, **extra})
    for p, t in zip(plain.choices[0].logprobs.content, named.choices[0].logprobs.content):
        assert t.token.startswith("token_id:") and int(t.token[9:]) >= 0 and t.bytes == p.bytes
        assert all(x.token.startswith("token_id:") for x in t.top_logprobs) and len(t.top_logprobs) == 2
    assert b"".join(bytes(t.bytes) for t in named.choices[0].logprobs.content).decode() == plain.choices[0].message.content
    prompt = "The sky is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=1, echo=True,
                                  extra_body=extra)
    lp = r.choices[0].logprobs
    assert all(t.startswith("token_id:") for t in lp.tokens) and len(lp.tokens) == len(lp.text_offset)
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] < len(r.choices[0].text)
    assert all(k.startswith("token_id:") for d in lp.top_logprobs[1:] for k in d)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=1,
                                            stream=True, extra_body=extra))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens[-3:]


def test_truncate_prompt_tokens(server: LiveServer, client: openai.OpenAI):
    """vLLM's truncate_prompt_tokens keeps each prompt's last k tokens (completions, token ids longer than the
    context too, and chat's templated prompt); it was refused as unsupported."""
    prompt = "one two three four five six seven eight"
    ids = tokenize(server, prompt=prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True,
                                  extra_body={"truncate_prompt_tokens": 3})
    kept = httpx.post(server.url("/detokenize"), json={"tokens": ids[-3:]}).json()["prompt"]
    assert r.usage.prompt_tokens == 3 and r.choices[0].text.startswith(kept)
    r = client.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN + 50) + ids[-2:], max_tokens=1,
                                  extra_body={"truncate_prompt_tokens": 2})
    assert r.usage.prompt_tokens == 2
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=1,
                                       extra_body={"truncate_prompt_tokens": 4})
    assert r.usage.prompt_tokens == 4
    for k in (0, -2, MAX_MODEL_LEN + 1):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"truncate_prompt_tokens": k})
        assert info.value.body["param"] == "truncate_prompt_tokens"


def test_prompt_logprobs(server: LiveServer, client: openai.OpenAI):
    """vLLM's prompt_logprobs: per prompt position (null first) {token id: {logprob, rank, decoded_token}}, in each
    completions choice and at the top of a chat response; not with stream (as vLLM). It was refused."""
    prompt = "The capital of France is"
    ids = tokenize(server, prompt=prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, n=2, extra_body={"prompt_logprobs": 2})
    for choice in r.choices:
        plp = choice.model_extra["prompt_logprobs"]
        assert len(plp) == len(ids) and plp[0] is None
        for tid, entry in zip(ids[1:], plp[1:]):
            assert str(tid) in entry and 2 <= len(entry) <= 3
            assert all(v["logprob"] <= 0 and isinstance(v["decoded_token"], str) for v in entry.values())
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert "prompt_logprobs" not in echoed.choices[0].model_extra
    top1 = [max(e.values(), key=lambda v: v["logprob"]) for e in r.choices[0].model_extra["prompt_logprobs"][1:]]
    assert [max(d.values()) for d in echoed.choices[0].logprobs.top_logprobs[1:]] == pytest.approx(
        [v["logprob"] for v in top1], abs=1e-4)
    ask = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=1, extra_body={"prompt_logprobs": 0})
    plp = chat.model_extra["prompt_logprobs"]
    chat_ids = tokenize(server, messages=ask)
    assert len(plp) == len(chat_ids) and [list(e) for e in plp[1:]] == [[str(t)] for t in chat_ids[1:]]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})
    assert info.value.body["param"] == "prompt_logprobs"


def test_latency_histograms_observed(server: LiveServer, client: openai.OpenAI):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    m = server.metrics()
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert m[(f"gantry:{name}_count", ())] > 0, name
    assert m[("gantry:request_success_total", (("finished_reason", "length"),))] > 0
    assert m[("gantry:prompt_tokens_total", ())] > 0
    assert ("gantry:prefix_cache_queries_total", ()) in m and ("gantry:num_preemptions_total", ()) in m


def test_request_histograms_of_known_requests(server: LiveServer, client: openai.OpenAI):
    """vLLM's per-request histograms, one observation per request (its n samples together): n=2 not
    streamed, then the same prompt streamed (its prefix cached now: still counted whole)."""
    ids = tokenize(server, prompt="Count the hens in the yard, then the ducks")
    server.wait_idle()
    before = server.metrics()
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, n=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6
    stream = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, stream=True,
                                       extra_body={"ignore_eos": True})
    assert len([c for c in stream if c.choices and c.choices[0].text]) >= 1
    after = server.wait_idle()

    def delta(name: str, **labels: str) -> float:
        key = (f"gantry:{name}", tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    sums = {"request_prompt_tokens": 2 * len(ids), "request_generation_tokens": 6 + 4,
            "request_max_num_generation_tokens": 3 + 4, "request_params_n": 2 + 1, "request_params_max_tokens": 3 + 4}
    for name, total in sums.items():
        assert (delta(f"{name}_count"), delta(f"{name}_sum")) == (2, total), name
    assert (delta("request_params_n_bucket", le="1.0"), delta("request_params_n_bucket", le="2.0")) == (1, 2)
    phases = {name: delta(f"request_{name}_time_seconds_sum") for name in ("queue", "prefill", "decode", "inference")}
    for name in phases:
        assert delta(f"request_{name}_time_seconds_count") == 2, name
    assert phases["prefill"] > 0 and phases["decode"] > 0 and phases["queue"] >= 0
    assert phases["inference"] == pytest.approx(phases["prefill"] + phases["decode"], abs=1e-6)
    assert phases["queue"] + phases["inference"] <= delta("e2e_request_latency_seconds_sum")
