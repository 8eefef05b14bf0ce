"""A battery of bad requests: each a 4xx in OpenAI's error shape naming the field at fault,
while a good request streams undisturbed; afterwards the server is ready and every KV page free."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.server.conftest import MAX_BODY_BYTES, MAX_MODEL_LEN, MODEL, LiveServer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **fields}


LONG_PROMPT = " ".join(["word"] * (MAX_MODEL_LEN + 10))

# (id, method, path, JSON body or raw bytes, expected status, field the error must name)
BAD_REQUESTS = [
    ("malformed-json", "POST", CHAT, b'{"model": "x", "messages": [', 400, "body"),
    ("body-not-object", "POST", CHAT, b"[1, 2, 3]", 400, "body"),
    ("empty-body", "POST", COMPLETIONS, b"", 400, "body"),
    ("messages-missing", "POST", CHAT, {"model": MODEL}, 400, "messages"),
    ("messages-empty", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("messages-not-list", "POST", CHAT, chat(messages="hello"), 400, "messages"),
    ("message-not-object", "POST", CHAT, chat(messages=["hello"]), 400, "messages[0]"),
    ("unknown-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    ("content-wrong-type", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]), 400,
     "messages[0].content"),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-zero-no-echo", "POST", COMPLETIONS, completion(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-zero-echo-beam", "POST", COMPLETIONS, completion(max_tokens=0, echo=True, use_beam_search=True), 400,
     "max_tokens"),
    ("echo-min-tokens-past-max-tokens-zero", "POST", COMPLETIONS, completion(max_tokens=0, echo=True, min_tokens=3),
     400, "max_tokens (0)"),  # the engine runs max_tokens 0 as 1: the message must name what the client sent
    ("max-tokens-negative", "POST", COMPLETIONS, completion(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-beyond-context", "POST", CHAT, chat(max_tokens=10 * MAX_MODEL_LEN), 400, "max_tokens"),
    ("max-tokens-prompt-plus", "POST", COMPLETIONS, completion(max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="ten"), 400, "max_tokens"),
    ("max-completion-tokens-zero", "POST", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("n-zero", "POST", CHAT, chat(n=0), 400, "n"),
    ("n-too-large", "POST", COMPLETIONS, completion(n=100000), 400, "n"),
    ("temperature-negative", "POST", CHAT, chat(temperature=-1), 400, "temperature"),
    ("temperature-string", "POST", COMPLETIONS, completion(temperature="hot"), 400, "temperature"),
    ("top-p-zero", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("top-p-above-one", "POST", COMPLETIONS, completion(top_p=1.5), 400, "top_p"),
    ("top-k-negative", "POST", CHAT, chat(top_k=-5), 400, "top_k"),
    ("min-p-above-one", "POST", CHAT, chat(min_p=2), 400, "min_p"),
    ("presence-penalty-range", "POST", CHAT, chat(presence_penalty=5), 400, "presence_penalty"),
    ("frequency-penalty-range", "POST", COMPLETIONS, completion(frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition-penalty-zero", "POST", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("stop-100-strings", "POST", CHAT, chat(stop=[f"s{i}" for i in range(100)]), 400, "stop"),
    ("stop-wrong-type", "POST", COMPLETIONS, completion(stop=7), 400, "stop"),
    ("stop-token-ids-wrong", "POST", CHAT, chat(stop_token_ids=["a"]), 400, "stop_token_ids"),
    ("min-tokens-over-max", "POST", CHAT, chat(min_tokens=10, max_tokens=2), 400, "min_tokens"),
    ("seed-string", "POST", CHAT, chat(seed="abc"), 400, "seed"),
    ("stream-not-bool", "POST", CHAT, chat(stream="yes"), 400, "stream"),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("include-usage-not-bool", "POST", CHAT, chat(stream=True, stream_options={"include_usage": "yes"}), 400,
     "stream_options.include_usage"),
    # vLLM fields this server does not act on: refused, not ignored (fuzzing found 200s that ignored them)
    ("prompt-logprobs-stream", "POST", COMPLETIONS, completion(prompt_logprobs=1, stream=True), 400, "prompt_logprobs"),
    ("prompt-logprobs-too-many", "POST", CHAT, chat(prompt_logprobs=21), 400, "prompt_logprobs"),
    ("guided-json", "POST", CHAT, chat(guided_json={"type": "object"}), 400, "guided_json"),
    ("chat-template", "POST", CHAT, chat(chat_template="{{ raise }}"), 400, "chat_template"),
    ("continue-with-generation-prompt", "POST", CHAT,
     chat(messages=[*USER, {"role": "assistant", "content": "The"}], continue_final_message=True), 400,
     "continue_final_message"),
    ("continue-a-user-message", "POST", CHAT, chat(continue_final_message=True, add_generation_prompt=False), 400,
     "continue_final_message"),
    ("logprobs-not-bool", "POST", CHAT, chat(logprobs=3), 400, "logprobs"),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top-logprobs-too-many", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("completion-logprobs-too-many", "POST", COMPLETIONS, completion(logprobs=10), 400, "logprobs"),
    ("echo-not-bool", "POST", COMPLETIONS, completion(echo="yes"), 400, "echo"),
    ("ignore-eos-not-bool", "POST", CHAT, chat(ignore_eos="true"), 400, "ignore_eos"),
    ("best-of-below-n", "POST", COMPLETIONS, completion(best_of=1, n=2), 400, "best_of"),
    ("logit-bias-out-of-range", "POST", CHAT, chat(logit_bias={"50": 101}), 400, "logit_bias"),
    ("allowed-token-ids-empty", "POST", COMPLETIONS, completion(allowed_token_ids=[]), 400, "allowed_token_ids"),
    ("bad-words-empty-string", "POST", CHAT, chat(bad_words=[""]), 400, "bad_words"),
    ("tools", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("response-format", "POST", CHAT, chat(response_format={"type": "json_schema"}), 400, "response_format"),
    ("prompt-missing", "POST", COMPLETIONS, {"model": MODEL, "max_tokens": 4}, 400, "prompt"),
    ("prompt-empty", "POST", COMPLETIONS, completion(prompt=""), 400, "prompt"),
    ("prompt-wrong-type", "POST", COMPLETIONS, completion(prompt={"text": "hi"}), 400, "prompt"),
    ("prompt-token-outside-vocab", "POST", COMPLETIONS, completion(prompt=[1, 2, 10**9]), 400, "prompt"),
    ("prompt-beyond-max-model-len", "POST", COMPLETIONS, completion(prompt=LONG_PROMPT, max_tokens=None), 400,
     "prompt"),
    ("chat-beyond-max-model-len", "POST", CHAT,
     chat(messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=None), 400, "messages"),
    ("unknown-model", "POST", CHAT, chat(model="gpt-17"), 404, "model"),
    ("unknown-model-completion", "POST", COMPLETIONS, completion(model="nope"), 404, "model"),
    ("oversized-body", "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * (2 * MAX_BODY_BYTES)}]), 413,
     "body"),
    ("tokenize-nothing", "POST", "/tokenize", {"model": MODEL}, 400, "prompt"),
    ("detokenize-missing-tokens", "POST", "/detokenize", {"model": MODEL}, 400, "tokens"),
    ("detokenize-bad-tokens", "POST", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("unknown-route", "POST", "/v1/embeddings", {"input": "x"}, 404, "/v1/embeddings"),
    ("wrong-method", "GET", CHAT, None, 405, "GET"),
]


def send(server: LiveServer, method: str, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    return httpx.request(method, server.url(path), content=content, timeout=60,
                         headers={"Content-Type": "application/json"})


def test_battery_has_enough_cases():
    assert len(BAD_REQUESTS) >= 25
    assert len({case[0] for case in BAD_REQUESTS}) == len(BAD_REQUESTS)


def test_bad_requests_named_and_harmless(server: LiveServer):
    # A good request streams while the bad ones arrive; it must finish untouched.
    good: dict = {}

    def stream_good() -> None:
        body = chat(messages=[{"role": "user", "content": "Count to twenty."}], max_tokens=12, ignore_eos=True,
                    stream=True, stream_options={"include_usage": True})
        with httpx.stream("POST", server.url(CHAT), json=body, timeout=120) as r:
            good["status"] = r.status_code
            good["events"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=stream_good)
    t.start()
    failures = []
    for case_id, method, path, body, status, name in BAD_REQUESTS:
        r = send(server, method, path, body)
        try:
            err = r.json()["error"]
        except (ValueError, KeyError):
            failures.append(f"{case_id}: {r.status_code} not in OpenAI's error shape: {r.text[:200]}")
            continue
        if r.status_code != status:
            failures.append(f"{case_id}: expected {status}, got {r.status_code}: {err}")
        if set(err) != {"message", "type", "param", "code"}:
            failures.append(f"{case_id}: error keys {sorted(err)}")
        if name not in (err["param"] or "") and name not in err["message"]:
            failures.append(f"{case_id}: the error does not name {name!r}: {err}")
        if "Traceback" in r.text:
            failures.append(f"{case_id}: stack trace in the response")
    t.join(120)
    assert not failures, "\n".join(failures)

    assert good["status"] == 200 and good["events"][-1] == "[DONE]"
    usage = json.loads(good["events"][-2])["usage"]
    assert usage["completion_tokens"] == 12
    assert httpx.get(server.url("/ready")).status_code == 200
    m = server.wait_idle()
    assert m[("gantry:num_requests_running", ())] == 0
    assert m[("gantry:num_requests_waiting", ())] == 0
    assert m[("gantry:kv_cache_usage_perc", ())] == 0


@pytest.mark.parametrize("path", ["/v1/models", "/ready"])
def test_still_serving_after_battery(server: LiveServer, path: str):
    assert httpx.get(server.url(path)).status_code == 200
