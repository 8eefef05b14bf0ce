"""The engine core process serving the embedded model imports neither transformers (its config comes from
engine.gguf_config; the tokenizer lives in the API process) nor the other large packages serving has no
use for there (issue 23: ~20 MiB of the core's RSS and seconds of its start-up), and starting it starts no
multiprocessing resource tracker (15 MiB). A sitecustomize on PYTHONPATH, which every process of the
server's tree runs, records each first import of a watched package with its stack; the core is started
by engine.serve itself, as a user runs it."""
from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from engine.server.text import SMALL_MACHINE_CORES, usable_cores
from tests.server.conftest import MODEL, LiveServer, launch, wait_ready

WATCHED = ("transformers", "tokenizers", "huggingface_hub", "jinja2", "sanic", "triton")
SITECUSTOMIZE = f'''
import os, sys, traceback
_OUT = os.environ["GANTRY_TEST_IMPORT_LOG"]
_WATCHED = set({WATCHED!r})

class _Recorder:
    def find_spec(self, name, path=None, target=None):
        if name in _WATCHED and name not in sys.modules:
            _WATCHED.discard(name)
            with open(os.path.join(_OUT, f"{{os.getpid()}}-{{name}}.txt"), "w") as f:
                f.write("".join(traceback.format_stack()[:-1]))
        return None

sys.meta_path.insert(0, _Recorder())
'''


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("core_imports")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp / "log").mkdir()
    path = os.pathsep.join(p for p in (str(tmp / "site"), os.environ.get("PYTHONPATH")) if p)
    s = wait_ready(launch(tmp, env={"PYTHONPATH": path, "GANTRY_TEST_IMPORT_LOG": str(tmp / "log")}))
    yield s, tmp / "log"
    s.stop()


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _core_pid(server: LiveServer) -> int:
    """The API process's child that maps libtorch (not a text worker)."""
    kids = _children(server.proc.pid)
    for pid in kids:
        with open(f"/proc/{pid}/maps") as f:
            if "libtorch" in f.read():
                return pid
    raise AssertionError(f"no engine core among {kids}")


def test_core_imports_no_transformers_while_serving(recorded: tuple[LiveServer, Path]) -> None:
    server, log = recorded
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    r = httpx.post(server.url("/v1/chat/completions"), json=chat, timeout=120)
    assert r.status_code == 200, r.text
    core = _core_pid(server)
    found = {p.name: p.read_text() for p in log.iterdir() if p.name.startswith(f"{core}-")}
    assert not found, "\n".join(f"{name} imported in the engine core:\n{stack}" for name, stack in found.items())
    # the recorder works: the API process does import transformers (its tokenizer)
    assert (log / f"{server.proc.pid}-transformers.txt").exists(), sorted(p.name for p in log.iterdir())


@pytest.mark.skipif(usable_cores() > SMALL_MACHINE_CORES,
                    reason="text workers (and their queues' tracker) start at once")
def test_the_engine_core_is_the_only_child(recorded: tuple[LiveServer, Path]) -> None:
    """multiprocessing's spawn started a resource-tracker process with the core; on a small machine nothing
    else (text workers start with the first large body) needs one."""
    server, _ = recorded
    kids = _children(server.proc.pid)
    commands = []
    for pid in kids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            commands.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
    assert kids == [_core_pid(server)], commands
