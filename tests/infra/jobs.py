"""What the infra tests do with a job: render it with the launcher, find the API URL it
logs, wait for GET /ready, and ask it for a chat completion with the openai client."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .procs import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
URL_PATTERN = re.compile(r"API on (http://([^/\s:]+):(\d+))/v1")


def render_job(output_dir: Path, *overrides: str) -> Path:
    """`python -m launcher OVERRIDES` into output_dir; returns the one job directory it made."""
    argv = [sys.executable, "-m", "launcher", *overrides, f"output_dir={output_dir}"]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv[1:])} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    configs = sorted(output_dir.rglob("engine.yaml"))
    assert len(configs) == 1, f"expected one job directory under {output_dir}, found {configs}\n{done.stdout}"
    return configs[0].parent


def api_address_from_log(log: str) -> tuple[str, int] | None:
    """Host and port of the API URL the job printed (`... API on http://HOST:PORT/v1 ...`)."""
    match = URL_PATTERN.search(log)
    return (match.group(2), int(match.group(3))) if match else None


def is_ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/ready", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_ready(base_url: str, timeout: float, alive: Callable[[], bool], diagnose: Callable[[], str]) -> None:
    """Poll GET /ready until 200; fail at once if the job or container died meanwhile."""
    def ready() -> bool:
        if is_ready(base_url):
            return True
        assert alive(), f"the server died before /ready answered 200\n{diagnose()}"
        return False

    wait_for(ready, timeout, f"GET {base_url}/ready to answer 200", diagnose, interval=1.0)


def chat_completion(base_url: str) -> str:
    """One short greedy chat completion through the openai client; returns its text."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0.0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip(), reply
    assert choice.finish_reason in ("stop", "length"), reply
    assert reply.usage is not None and reply.usage.completion_tokens > 0, reply

    # The seed's client streams; the same greedy request must stream the same text.
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0.0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == choice.message.content
    return choice.message.content


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def tail(path: Path, lines: int = 60) -> str:
    """The last lines of a log, each cut to 300 characters (progress bars are one long line)."""
    text = path.read_text(errors="replace") if path.exists() else "(missing)"
    return f"--- {path}\n" + "\n".join(line[:300] for line in text.splitlines()[-lines:])
