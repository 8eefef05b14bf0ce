"""TP and PP on CPU with gloo under torchrun: greedy tokens identical to one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine import LLM, SamplingParams
from tests.conftest import REPO, TINY_ARCHS, prompts_of_lengths, pythonpath_with_repo, write_tiny_checkpoint
from tests.ports import free_port

pytestmark = pytest.mark.slow


def dist_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=pythonpath_with_repo())
    env.pop("RANK", None)
    return env


def torchrun(nproc: int, args: list[str], nnodes: int = 1, node_rank: int = 0, port: int | None = None,
             c10d: bool = False) -> subprocess.Popen:
    if c10d:  # elastic rendezvous, as between real hosts: the agents agree on node ranks themselves
        where = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=gantry-test"]
    else:
        where = [f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port or free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
           *where, "-m", "tests.engine.dist_generate", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module", params=["llama-untied", "qwen2"])
def model_and_reference(request, tmp_path_factory) -> tuple[str, list[list[int]], list[str]]:
    spec = dict(TINY_ARCHS[request.param])
    path = write_tiny_checkpoint(str(tmp_path_factory.mktemp(request.param)), spec.pop("arch"), **spec)
    llm = LLM(path, enable_prefix_caching=False)
    outputs = llm.generate(prompts_of_lengths([1, 5, 17, 33, 64, 100, 177, 300]),
                           SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    return path, [o.outputs[0].token_ids for o in outputs], [o.outputs[0].text for o in outputs]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_matches_single_process(model_and_reference, tp: int, pp: int, tmp_path) -> None:
    model, reference, _ = model_and_reference
    out = tmp_path / "tokens.json"
    finish(torchrun(tp * pp, [model, str(tp), str(pp), str(out)]))
    assert json.loads(out.read_text()) == reference


def test_two_nodes_match_single_process(model_and_reference, tmp_path) -> None:
    """Two torchrun agents (one per "node") joined by c10d rendezvous over loopback: tp2 x pp2 spans both."""
    model, reference, _ = model_and_reference
    out = tmp_path / "tokens.json"
    port = free_port()
    nodes = [torchrun(2, [model, "2", "2", str(out)], nnodes=2, port=port, c10d=True) for _ in (0, 1)]
    for node in nodes:
        finish(node)
    assert json.loads(out.read_text()) == reference


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("server not ready in time")


def test_openai_api_served_by_rank0(model_and_reference) -> None:
    """`torchrun --nproc-per-node 4 -m engine.serve --model DIR -tp 2 -pp 2`: rank 0 answers the API
    with the same greedy tokens as one process; SIGTERM stops every rank."""
    import signal

    import httpx

    model, _, reference_texts = model_and_reference
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={free_port()}",
           "-m", "engine.serve", "--model", model, "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
           "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--no-enable-prefix-caching"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        prompts = prompts_of_lengths([1, 5, 17, 33, 64, 100, 177, 300])
        body = {"model": httpx.get(f"{url}/v1/models").json()["data"][0]["id"], "prompt": prompts,
                "max_tokens": 32, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == reference_texts
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    # torchrun's agent forwards SIGTERM to every rank and reports its own signal exit; rank 0 drains
    assert "drained; stopping" in out, out[-4000:]
    assert "ChildFailedError" not in out, out[-4000:]
