"""Hypothesis throws random JSON values at every field of chat and completions (and at /tokenize,
/detokenize) on one live server: never a 5xx, every 400 names a field, the engine never dies; at
the end /health is 200, nothing runs and every KV block is free. Bounded in examples and in time."""
from __future__ import annotations

import json
import math
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL, LiveServer

MAX_EXAMPLES = 150  # per route
TIME_BUDGET_S = 45.0  # per route: examples after this return at once (counted, and enough must have run)
MIN_EXAMPLES_RUN = 40

EDGE_INTS = [0, 1, -1, 2, 5, 127, 128, 2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 + 1,
             10**30, 49151, 49152]
EDGE_FLOATS = [0.0, -0.0, 0.5, 1.0, 2.0, 1e-300, 1e308, -1e308, math.nan, math.inf, -math.inf, 2.5e-5]
EDGE_STRINGS = ["", "NaN", "Infinity", "-Infinity", "1e999", "null", "true", "\ud800", "a\udfffb", "\x00", "ü", "😀",
                "<|im_start|>", "\n" * 50, "x" * 9000, MODEL, "text"]

leaves = (st.none() | st.booleans() | st.sampled_from(EDGE_INTS) | st.integers() | st.sampled_from(EDGE_FLOATS)
          | st.floats() | st.sampled_from(EDGE_STRINGS) | st.text(max_size=40))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10) | st.sampled_from(["type", "text", "role",
                                                                                      "content", "include_usage"]),
                                             inner, max_size=5), max_leaves=12)
token_ids = st.lists(st.integers(min_value=-2, max_value=49160) | st.sampled_from(EDGE_INTS), max_size=40)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "wizard"]) | json_values,
     "content": st.text(max_size=60) | st.lists(st.fixed_dictionaries({"type": st.just("text") | json_values,
                                                                      "text": st.text(max_size=30) | json_values}),
                                                max_size=3) | json_values}), max_size=4) | json_values

SHARED_FIELDS = ["model", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                 "skip_special_tokens", "include_stop_str_in_output", "stream", "stream_options", "logit_bias",
                 "best_of", "user", "unknown_field"]
ROUTES = {
    "/v1/chat/completions": (
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        SHARED_FIELDS + ["messages", "max_completion_tokens", "logprobs", "top_logprobs", "add_generation_prompt",
                         "response_format", "tools"]),
    "/v1/completions": (
        {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
        SHARED_FIELDS + ["prompt", "echo", "logprobs", "suffix"]),
    "/tokenize": ({"model": MODEL, "prompt": "Hi"},
                  ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"]),
    "/detokenize": ({"model": MODEL, "tokens": [1, 2, 3]}, ["model", "tokens"]),
}


def field_values(name: str) -> st.SearchStrategy:
    """Random JSON for any field, plus values shaped for it (so that some requests are valid and run)."""
    shaped = {"messages": messages, "prompt": st.text(max_size=80) | token_ids | st.lists(st.text(max_size=20)
                                                                                           | token_ids, max_size=3),
              "tokens": token_ids, "stop_token_ids": token_ids,
              "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
              "stream_options": st.fixed_dictionaries({"include_usage": json_values}),
              "logit_bias": st.dictionaries(st.text(max_size=6), json_values, max_size=3)}
    return json_values | shaped.get(name, st.sampled_from(EDGE_INTS) | st.sampled_from(EDGE_FLOATS))


@st.composite
def bodies(draw: st.DrawFn, path: str) -> dict[str, Any]:
    base, fields = ROUTES[path]
    body = dict(base)
    for name in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True)):
        body[name] = draw(field_values(name))
    if path == "/v1/chat/completions" and body["max_tokens"] is not base["max_tokens"]:
        body.setdefault("max_completion_tokens", 2)  # fuzzing max_tokens, yet keep generation short
    return body


def check(client: httpx.Client, server: LiveServer, path: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity as Python writes them
    stream = body.get("stream") is True
    with client.stream("POST", server.url(path), content=raw, headers={"Content-Type": "application/json"}) as r:
        text = r.read().decode("utf-8", errors="replace")
    assert r.status_code < 500, (r.status_code, text[:500], raw[:500])
    if r.status_code >= 400:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        if r.status_code == 400:
            assert err["param"], (err, raw[:500])  # every 400 names the field at fault
        return
    if stream and path.startswith("/v1/"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", (text[-500:], raw[:500])
        for e in events[:-1]:
            err = json.loads(e).get("error")
            assert err is None or err["type"] != "server_error", (err, raw[:500])


@pytest.mark.parametrize("path", list(ROUTES))
def test_fuzz_never_5xx(server: LiveServer, path: str):
    examples = MAX_EXAMPLES if path.startswith("/v1/") else MAX_EXAMPLES // 3
    start, ran, log_start = time.monotonic(), [], len(server.log())

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=bodies(path))
    def run(body: dict[str, Any]) -> None:
        if time.monotonic() - start > TIME_BUDGET_S:
            return
        ran.append(1)
        check(client, server, path, body)

    with httpx.Client(timeout=120) as client:
        run()
    assert len(ran) >= min(examples, MIN_EXAMPLES_RUN), f"only {len(ran)} examples in {TIME_BUDGET_S}s"
    new_log = server.log()[log_start:]
    assert "Traceback" not in new_log and " ERROR " not in new_log, new_log[-3000:]
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200
    assert httpx.get(server.url("/ready"), timeout=10).status_code == 200
    m = server.wait_idle(60)
    assert m[("gantry:num_requests_running", ())] == 0
    assert m[("gantry:num_requests_waiting", ())] == 0
    assert m[("gantry:kv_cache_usage_perc", ())] == 0
