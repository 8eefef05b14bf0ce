"""The embedded model's server on CPU stays small (issue 23): the API process never imports torch
(205 MiB of RSS and seconds of start-up on 2 cores), not while starting, not while serving; on a
small machine the text worker starts only with the first body over INLINE_MAX_BODY_BYTES, which
it answers like an inline one."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from engine.server.text import INLINE_MAX_BODY_BYTES, SMALL_MACHINE_CORES, usable_cores
from tests.server.conftest import MODEL, REPO, LiveServer, launch, wait_ready

API_RSS_LIMIT_MIB = 250  # 340 MiB with torch (RESULTS.md, issue 23); about 120 without


@pytest.fixture(scope="module")
def cpu_server(tmp_path_factory: pytest.TempPathFactory):
    s = wait_ready(launch(tmp_path_factory.mktemp("cpu_footprint"), "--max-model-len", "1024"))  # room for a large body
    yield s
    s.stop()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def _maps_torch(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1] for line in f if "libtorch" in line})


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _text_workers(server: LiveServer) -> list[int]:
    """The API process's children but the engine core (it maps torch) and multiprocessing's resource tracker."""
    kids = _children(server.proc.pid)
    return [k for k in kids if "resource_tracker" not in _cmdline(k) and _maps_torch(k) == []]


def test_api_process_imports_no_torch(cpu_server: LiveServer) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    r = httpx.post(cpu_server.url("/v1/chat/completions"), json=chat, timeout=120)
    assert r.status_code == 200, r.text
    # echo with logprobs: the prompt's logprobs too (engine.prompt_logprobs on the API side)
    comp = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "logprobs": 2, "echo": True}
    r = httpx.post(cpu_server.url("/v1/completions"), json=comp, timeout=120)
    assert r.status_code == 200, r.text
    assert httpx.post(cpu_server.url("/tokenize"), json={"model": MODEL, "prompt": "hi"}, timeout=30).status_code == 200
    assert _maps_torch(cpu_server.proc.pid) == [], "the API process loaded torch"
    # the engine core does run torch (so the check above looks at the right thing)
    assert any(_maps_torch(k) for k in _children(cpu_server.proc.pid))
    assert _rss_mib(cpu_server.proc.pid) < API_RSS_LIMIT_MIB


def test_text_worker_starts_with_the_first_large_body(cpu_server: LiveServer) -> None:
    small = usable_cores() <= SMALL_MACHINE_CORES
    before = _text_workers(cpu_server)
    if small:
        assert before == [], "text workers started before any large body"
    content = "Tell me about the sea. " * (2 * INLINE_MAX_BODY_BYTES // 23)
    body = {"model": MODEL, "messages": [{"role": "user", "content": content[:3000]}], "max_tokens": 3,
            "temperature": 0}
    big = httpx.post(cpu_server.url("/v1/chat/completions"), json=body, timeout=300)
    assert big.status_code == 200, big.text
    # the worker's tokenization is the chat template's: /tokenize counts the same tokens
    tok = httpx.post(cpu_server.url("/tokenize"), json={"model": MODEL, "messages": body["messages"][:1]}, timeout=60)
    assert tok.status_code == 200 and tok.json()["count"] == big.json()["usage"]["prompt_tokens"], tok.text
    after = _text_workers(cpu_server)
    assert len(after) == (1 if small else 2), (before, after)
    assert _maps_torch(cpu_server.proc.pid) == []
    assert "starting 1 text worker process(es)" in cpu_server.log() or not small


def test_api_imports_without_torch() -> None:
    """In-process view of the same thing (what engine.serve runs before listening and the tokenizer load)."""
    code = (
        "import sys\n"
        "from engine.config import EngineConfig\n"
        "from engine.serve import preflight\n"
        "from engine.server.app import create_app\n"
        "from engine.server.async_llm import AsyncLLM\n"
        "cfg = EngineConfig(device='cpu')\n"
        "assert preflight(cfg) is None\n"
        "llm = AsyncLLM.__new__(AsyncLLM); llm.engine_config = cfg\n"
        "tok = llm._load_tokenizer()\n"
        "assert tok.encode('hello')\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
