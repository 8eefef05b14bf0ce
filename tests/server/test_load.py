"""64 concurrent streaming clients, a third of them hanging up midway: the rest finish with
correct usage, the abandoned ones are aborted, and the server ends idle with every page free."""
from __future__ import annotations

import asyncio

import httpx
import openai

from tests.server.conftest import MODEL, LiveServer

NUM_CLIENTS = 64
MAX_TOKENS = 8  # clients that stay
MAX_TOKENS_LEAVING = 80  # clients that hang up after their first token; far from done by then


def test_64_streaming_clients_third_disconnect(server: LiveServer):
    aborts_before = server.metric("gantry:request_success_total", finished_reason="abort")
    # Short completion prompts: the CPU engine's prefill of 64 chat templates would dominate the test.
    prompts = [f"Sea fact {i}:" for i in range(NUM_CLIENTS)]
    prompt_tokens = [len(httpx.post(server.url("/tokenize"), json={"prompt": p}).json()["tokens"]) for p in prompts]
    leaving = {i for i in range(NUM_CLIENTS) if i % 3 == 0}

    async def client_run(client: openai.AsyncOpenAI, i: int) -> dict:
        stream = await client.completions.create(
            model=MODEL, prompt=prompts[i], stream=True,
            max_tokens=MAX_TOKENS_LEAVING if i in leaving else MAX_TOKENS, temperature=0.8, seed=i,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if i in leaving and text:
                await stream.close()  # hang up mid-generation
                return {"left": True}
        return {"left": False, "text": text, "finish": finish, "usage": usage}

    async def run_all() -> list[dict]:
        client = openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="na", max_retries=0, timeout=300,
                                    http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=200)))
        try:
            return await asyncio.gather(*(client_run(client, i) for i in range(NUM_CLIENTS)))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    for i, r in enumerate(results):
        if i in leaving:
            assert r["left"]
            continue
        assert r["finish"] == "length" and r["text"], (i, r)
        assert r["usage"].completion_tokens == MAX_TOKENS, (i, r["usage"])
        assert r["usage"].prompt_tokens == prompt_tokens[i], (i, r["usage"])

    m = server.wait_idle()
    assert m[("gantry:num_requests_running", ())] == 0
    assert m[("gantry:num_requests_waiting", ())] == 0
    assert m[("gantry:kv_cache_usage_perc", ())] == 0
    aborts = m[("gantry:request_success_total", (("finished_reason", "abort"),))] - aborts_before
    assert aborts == len(leaving)
