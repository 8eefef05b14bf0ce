"""LoRA through the OpenAI API: the client picks an adapter by `model` (same tokens as the offline
engine with that LoRARequest), /v1/models lists adapters under the base, unknown names get 404
naming `model`, and adapters load and unload at run time only with the key and when allowed."""
from __future__ import annotations

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from engine.lora import LoRARequest
from tests.conftest import write_tiny_checkpoint
from tests.engine.test_lora import write_adapter
from tests.server.conftest import launch, wait_ready

KEY = "lora-test-key-9f1c"
PROMPT = [5, 77, 300, 12, 9, 41, 250, 8, 100]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    base = write_tiny_checkpoint(str(tmp_path_factory.mktemp("llama")), "LlamaForCausalLM", tie=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {"base": base,
            "a": write_adapter(base, str(tmp_path_factory.mktemp("a")), 8, 16, targets, False, 0),
            "b": write_adapter(base, str(tmp_path_factory.mktemp("b")), 4, 8, ["q_proj", "v_proj"], True, 1)}


@pytest.fixture(scope="module")
def lora_server(files, tmp_path_factory):
    s = wait_ready(launch(tmp_path_factory.mktemp("lora_server"), "--model", files["base"], "--enable-lora",
                          "--lora-modules", f"a={files['a']}", "--max-loras", "2", "--allow-runtime-lora-updating",
                          "--api-key-env", "LORA_KEY", env={"LORA_KEY": KEY}, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(files) -> dict[str | None, str]:
    """Greedy text after PROMPT from the offline engine: base and each adapter."""
    llm = LLM(files["base"], enable_lora=True, max_loras=2, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    loras = [None, LoRARequest("a", 1, files["a"]), LoRARequest("b", 2, files["b"])]
    outs = llm.generate([PROMPT] * 3, params, use_tqdm=False, lora_request=loras)
    return {name: o.outputs[0].text for name, o in zip([None, "a", "b"], outs)}


def _text(client: openai.OpenAI, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.model == model
    return out.choices[0].text


def test_model_selects_the_adapter(lora_server, offline) -> None:
    client = openai.OpenAI(base_url=lora_server.url("/v1"), api_key=KEY, max_retries=0, timeout=120)
    base_name = client.models.list().data[0].id
    assert offline["a"] != offline[None]  # the adapter changes the text: this test can fail
    assert _text(client, "a") == offline["a"]
    assert _text(client, base_name) == offline[None]
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "a"
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base_name, "a"}
    assert models["a"].parent == base_name and models[base_name].parent is None
    info = [labels for (name, labels) in lora_server.metrics() if name == "gantry:lora_requests_info"]
    assert info and ("max_lora", "2") in info[0]  # vLLM's lora_requests_info shape
    assert client.models.retrieve("a").parent == base_name



def test_runtime_adapter_named_like_the_model_refused(lora_server, files) -> None:
    """`model` would name both the base model and the adapter: 400 naming lora_name, the base still served."""
    base_name = httpx.get(lora_server.url("/v1/models"), headers=lora_server.headers).json()["data"][0]["id"]
    r = httpx.post(lora_server.url("/v1/load_lora_adapter"), json={"lora_name": base_name, "lora_path": files["b"]},
                   headers=lora_server.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    assert "already taken" in r.json()["error"]["message"]
    ids = [m["id"] for m in httpx.get(lora_server.url("/v1/models"), headers=lora_server.headers).json()["data"]]
    assert ids.count(base_name) == 1

def test_unknown_model_is_404_naming_model(lora_server) -> None:
    client = openai.OpenAI(base_url=lora_server.url("/v1"), api_key=KEY, max_retries=0, timeout=120)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.body["param"] == "model" and "nope" in e.value.body["message"]
    # /tokenize and /detokenize check `model` too (with LoRA on, /tokenize took any name: fuzzing the API)
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
        r = httpx.post(lora_server.url(path), json={"model": "nope", **body}, headers=lora_server.headers)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
    # an empty name means the served model, as without adapters (vLLM's)
    assert client.completions.create(model="", prompt="hi", max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_load_and_unload_at_run_time(lora_server, files, offline) -> None:
    client = openai.OpenAI(base_url=lora_server.url("/v1"), api_key=KEY, max_retries=0, timeout=120)
    url = lora_server.url
    body = {"lora_name": "b", "lora_path": files["b"]}
    assert httpx.post(url("/v1/load_lora_adapter"), json=body).status_code == 401  # without the key
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="b", prompt="hi", max_tokens=2)
    r = httpx.post(url("/v1/load_lora_adapter"), json=body, headers=lora_server.headers)
    assert r.status_code == 200, r.text
    assert _text(client, "b") == offline["b"]
    odd = httpx.post(url("/v1/load_lora_adapter"), json={"lora_name": "ü b", "lora_path": files["b"]},
                     headers=lora_server.headers)
    assert odd.status_code == 200, odd.text
    card = httpx.get(url("/v1/models/%C3%BC%20b"), headers=lora_server.headers)  # percent-encoded, as clients send
    assert card.status_code == 200 and card.json()["id"] == "ü b", card.text
    assert httpx.post(url("/v1/unload_lora_adapter"), json={"lora_name": "ü b"},
                      headers=lora_server.headers).status_code == 200
    taken = httpx.post(url("/v1/load_lora_adapter"), json={"lora_name": "a", "lora_path": files["b"]},
                       headers=lora_server.headers)
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "lora_name"
    assert "already taken" in taken.json()["error"]["message"]
    bad = httpx.post(url("/v1/load_lora_adapter"), json={"lora_name": "c", "lora_path": files["base"]},
                     headers=lora_server.headers)  # a model directory, not an adapter
    assert bad.status_code == 400 and "adapter_config.json is missing" in bad.json()["error"]["message"]
    assert httpx.post(url("/v1/unload_lora_adapter"), json={"lora_name": "b"}).status_code == 401
    r = httpx.post(url("/v1/unload_lora_adapter"), json={"lora_name": "b"}, headers=lora_server.headers)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="b", prompt="hi", max_tokens=2)
    assert _text(client, "a") == offline["a"]  # nothing else disturbed


def test_runtime_updates_refused_unless_allowed(files, tmp_path) -> None:
    s = wait_ready(launch(tmp_path, "--model", files["base"], "--enable-lora", "--api-key-env", "LORA_KEY",
                          env={"LORA_KEY": KEY}, api_key=KEY))
    try:
        r = httpx.post(s.url("/v1/load_lora_adapter"), json={"lora_name": "b", "lora_path": files["b"]},
                       headers=s.headers)
        assert r.status_code == 403 and r.json()["error"]["param"] == "allow_runtime_lora_updating"
    finally:
        s.stop()


def test_concurrent_loads_of_one_name_take_it_once(lora_server, files) -> None:
    """Loads read the weights off the event loop, one at a time: of 6 concurrent loads of one new name exactly one
    succeeds and the rest are 400 naming lora_name; the server answers a health check meanwhile."""
    import concurrent.futures

    body = {"lora_name": "same", "lora_path": files["a"]}

    def load() -> httpx.Response:
        return httpx.post(lora_server.url("/v1/load_lora_adapter"), json=body, headers=lora_server.headers,
                          timeout=60)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: load(), range(6)))
        assert httpx.get(lora_server.url("/health"), timeout=60).status_code == 200
    assert sorted(r.status_code for r in results) == [200] + [400] * 5, [r.text for r in results]
    assert all(r.json()["error"]["param"] == "lora_name" for r in results if r.status_code == 400)
    assert httpx.post(lora_server.url("/v1/unload_lora_adapter"), json={"lora_name": "same"},
                      headers=lora_server.headers).status_code == 200
