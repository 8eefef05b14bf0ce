"""AsyncEngine: LLMEngine on its own thread, feeding one asyncio queue per HTTP request.

The engine thread loads the model, runs a warm-up request, then loops: take new requests
and aborts, step() while there is work, wait on a condition otherwise. Only that thread
touches the engine; what it produces crosses to the event loop by call_soon_threadsafe,
as deltas (new tokens only), so nothing the engine later mutates is shared.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from engine.config import ConfigError, EngineConfig
from engine.errors import ModelLoadError
from engine.outputs import Logprob, RequestOutput
from engine.sampling_params import SamplingParams
from engine.server.metrics import ServerMetrics

logger = logging.getLogger("gantry.server")

EngineFactory = Callable[[EngineConfig], Any]
PromptInput = str | list[int]


DEAD_ENGINE_EXIT_DELAY_S = 3.0  # how long /health reports 503 before a server whose engine died exits


@dataclass
class SampleDelta:
    index: int  # which of the request's n samples
    text: str  # cumulative text (complete UTF-8 characters only)
    new_token_ids: list[int]  # tokens generated since the previous delta
    new_logprobs: list[dict[int, Logprob]] | None  # one dict per new token, when logprobs were asked
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None


@dataclass
class RequestDelta:
    request_id: str
    samples: list[SampleDelta]
    finished: bool
    prompt: str | None = None  # set on a request's first delta only
    prompt_token_ids: list[int] | None = None  # set on a request's first delta only
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # first delta only, when asked


class RequestStream:
    """The event-loop side of one HTTP request: deltas of its engine requests, in step order."""

    def __init__(self, request_ids: list[str]):
        self.request_ids = request_ids
        self.queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self.unfinished = set(request_ids)

    @property
    def finished(self) -> bool:
        return not self.unfinished

    async def __aiter__(self) -> AsyncIterator[RequestDelta]:
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.unfinished.clear()
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item


@dataclass
class _Submission:
    requests: list[tuple[str, PromptInput, SamplingParams]]
    arrival_time: float
    stream: RequestStream
    added: asyncio.Future  # resolved once the engine took (or refused) every request


@dataclass
class _Tracked:
    """Engine-thread bookkeeping for one running request."""

    stream: RequestStream
    arrival_time: float
    num_tokens: list[int]  # tokens already delivered, per sample
    texts: list[str]  # text already delivered, per sample
    first_token_time: float | None = None
    last_token_time: float | None = None
    sent_prompt: bool = False
    aborted: bool = False


class AsyncEngine:
    """Owns the engine thread. States: starting -> loading -> ready; failed (load) or dead (loop crashed)."""

    def __init__(self, config: EngineConfig, metrics: ServerMetrics, log_requests: bool = True,
                 engine_factory: EngineFactory | None = None):
        self.config = config
        self.metrics = metrics
        self.log_requests = log_requests
        self.engine_factory = engine_factory
        self.state = "starting"
        self.engine: Any = None
        self.stats: Any = None  # latest EngineStats, replaced after every step
        self.num_in_flight = 0  # HTTP requests between submission and their last delta (event loop side)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._pending: list[_Submission] = []
        self._pending_aborts: list[str] = []
        self._abort_all = False
        self._stop = False
        self._tracked: dict[str, _Tracked] = {}
        self._num_added_since_stats = 0  # requests added to the engine since `stats` was taken

    # ---- event loop side ----

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def alive(self) -> bool:
        """Starting, loading or serving, with the engine thread (once started) running."""
        thread_ok = self._thread is None or self._thread.is_alive()
        return self.state in ("starting", "loading", "ready") and thread_ok

    def start(self, loop: asyncio.AbstractEventLoop, on_fatal: Callable[[int], None]) -> None:
        """Start the engine thread; on_fatal(exit_code) is called (on the event loop) if loading fails."""
        self._loop = loop
        self._on_fatal = on_fatal
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def num_waiting(self) -> int:
        """Requests not yet running: the engine's waiting queue plus submissions not yet taken."""
        with self._cond:
            pending = sum(len(s.requests) for s in self._pending)
        waiting = self.stats.num_waiting if self.stats is not None else 0
        return pending + self._num_added_since_stats + waiting

    @asynccontextmanager
    async def generate(self, requests: list[tuple[str, PromptInput, SamplingParams]],
                       arrival_time: float) -> AsyncIterator[RequestStream]:
        """Submit requests (all or none: a refused one raises the engine's error) and stream
        their deltas; leaving the block early (client gone, error) aborts what is unfinished."""
        assert self._loop is not None
        stream = RequestStream([rid for rid, _, _ in requests])
        submission = _Submission(requests, arrival_time, stream, self._loop.create_future())
        self.num_in_flight += 1
        try:
            with self._cond:
                self._pending.append(submission)
                self._cond.notify()
            await submission.added
            yield stream
        finally:
            self.num_in_flight -= 1
            if not stream.finished:
                self.abort(stream.request_ids)

    def abort(self, request_ids: list[str]) -> None:
        with self._cond:
            self._pending_aborts.extend(request_ids)
            self._cond.notify()

    def abort_all(self) -> None:
        with self._cond:
            self._abort_all = True
            self._cond.notify()

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- engine thread ----

    def _call_soon(self, fn: Callable, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    def _run(self) -> None:
        self.state = "loading"
        try:
            self.engine = self._load()
        except (ConfigError, ModelLoadError, ValueError, OSError) as e:
            logger.error("cannot load the model: %s", e)
            self.state = "failed"
            self._call_soon(self._on_fatal, 2)
            return
        except Exception:
            logger.exception("cannot load the model")
            self.state = "failed"
            self._call_soon(self._on_fatal, 1)
            return
        self.state = "ready"
        stats = self.stats
        logger.info("ready: model %s, max_model_len %d, %d KV blocks", self.engine.model_name,
                    self.engine.max_model_len, stats.num_total_blocks)
        try:
            self._loop_forever()
        except Exception as e:
            logger.exception("engine loop died")
            self.state = "dead"
            self._fail_all(e)
            # A failure no single request explains (a lost rank, a batch-wide error) leaves the
            # engine in an unknown state: let /health report 503 for a moment, then exit non-zero
            # so Slurm, Kubernetes or Docker restart the server (the whole group with several ranks).
            time.sleep(DEAD_ENGINE_EXIT_DELAY_S)
            self._call_soon(self._on_fatal, 1)

    def _load(self) -> Any:
        factory = self.engine_factory
        if factory is None:
            from engine.llm_engine import LLMEngine

            factory = LLMEngine
        t0 = time.monotonic()
        engine = factory(self.config)
        # Warm-up: one short request through every code path, so /ready means "fast".
        engine.add_request("warmup", "Hello", SamplingParams(max_tokens=2, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()
        self.stats = engine.get_stats()
        self.metrics.bind_engine(engine.model_name, lambda: self.stats)
        logger.info("engine loaded and warmed up in %.1fs", time.monotonic() - t0)
        return engine

    def _loop_forever(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._pending or self._pending_aborts or self._abort_all or self._stop
                           or engine.has_unfinished_requests()):
                    self._cond.wait()
                submissions, self._pending = self._pending, []
                aborts, self._pending_aborts = self._pending_aborts, []
                if self._abort_all:
                    aborts.extend(self._tracked)
                    self._abort_all = False
                stop = self._stop
            for s in submissions:
                self._add(s)
            if stop:
                aborts.extend(self._tracked)
            aborted = self._abort(aborts)
            if engine.has_unfinished_requests() or aborted:
                self._dispatch(engine.step())
                self._close_aborted(aborted)
            self.stats = engine.get_stats()
            self._num_added_since_stats = 0
            if stop:
                self._fail_all(ConnectionAbortedError("the server is shutting down"))
                self.state = "stopped"
                engine.shutdown()
                return

    def _add(self, s: _Submission) -> None:
        added: list[str] = []
        try:
            for rid, prompt, params in s.requests:
                self.engine.add_request(rid, prompt, params, arrival_time=s.arrival_time)
                added.append(rid)
                self._num_added_since_stats += 1
                self._tracked[rid] = _Tracked(s.stream, s.arrival_time, [0] * params.n, [""] * params.n)
        except Exception as e:
            if added:
                self.engine.abort_request(added)
                for rid in added:
                    self._tracked[rid].aborted = True
            self._call_soon(_resolve, s.added, e)
            return
        self._call_soon(_resolve, s.added, None)

    def _abort(self, request_ids: list[str]) -> list[str]:
        todo = [rid for rid in dict.fromkeys(request_ids) if rid in self._tracked and not self._tracked[rid].aborted]
        if todo:
            self.engine.abort_request(todo)
            for rid in todo:
                self._tracked[rid].aborted = True
        return todo

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        deliveries: list[tuple[RequestStream, RequestDelta]] = []
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is None:  # warm-up, a request refused at submission, or a failed one's sibling
                continue
            if out.error is not None:
                self._fail_stream(out.request_id, t, out.error)
                continue
            samples = []
            num_new = 0
            for o in out.outputs:
                prev = t.num_tokens[o.index]
                new_ids = list(o.token_ids[prev:])
                t.num_tokens[o.index] = prev + len(new_ids)
                t.texts[o.index] = o.text
                num_new += len(new_ids)
                new_logprobs = list(o.logprobs[prev:]) if o.logprobs is not None else None
                samples.append(SampleDelta(o.index, o.text, new_ids, new_logprobs, o.finish_reason, o.stop_reason))
            if num_new:
                if t.last_token_time is not None:
                    self.metrics.itl.observe(now - t.last_token_time)
                else:
                    t.first_token_time = now
                t.last_token_time = now
            delta = RequestDelta(out.request_id, samples, out.finished)
            if not t.sent_prompt:
                delta.prompt, delta.prompt_token_ids = out.prompt, list(out.prompt_token_ids)
                if out.prompt_logprobs is not None:  # complete by a request's first output
                    delta.prompt_logprobs = list(out.prompt_logprobs)
                t.sent_prompt = True
            deliveries.append((t.stream, delta))
            if out.finished:
                del self._tracked[out.request_id]
                reason = out.outputs[0].finish_reason if out.outputs else "abort"
                self._finish(out.request_id, t, reason or "abort", len(out.prompt_token_ids),
                             sum(t.num_tokens), out)
        if deliveries:
            self._call_soon(_deliver, deliveries)

    def _fail_stream(self, request_id: str, t: _Tracked, error: Exception) -> None:
        """A request failed inside the engine: its HTTP request gets the error (a 400 naming the
        field for a RequestError, else a 500), and the other prompts of that HTTP request are aborted."""
        del self._tracked[request_id]
        siblings = [rid for rid, other in self._tracked.items() if other.stream is t.stream]
        if siblings:
            self.engine.abort_request(siblings)
            for rid in siblings:
                del self._tracked[rid]
        self._call_soon(_deliver, [(t.stream, error)])

    def _close_aborted(self, request_ids: list[str]) -> None:
        """Finish aborted requests for which step() gave no final output."""
        deliveries: list[tuple[RequestStream, RequestDelta | BaseException]] = []
        for rid in request_ids:
            t = self._tracked.pop(rid, None)
            if t is None:
                continue
            samples = [SampleDelta(i, text, [], None, "abort", None) for i, text in enumerate(t.texts)]
            deliveries.append((t.stream, RequestDelta(rid, samples, True)))
            self._finish(rid, t, "abort", 0, sum(t.num_tokens), None)
        if deliveries:
            self._call_soon(_deliver, deliveries)

    def _finish(self, rid: str, t: _Tracked, reason: str, num_prompt: int, num_generated: int,
                out: RequestOutput | None) -> None:
        m = out.metrics if out is not None else None
        now = time.time()
        first_token = m.first_token_time if m is not None and m.first_token_time else t.first_token_time
        finished = m.finished_time if m is not None and m.finished_time else now
        ttft = first_token - t.arrival_time if first_token is not None else None
        queue = m.first_scheduled_time - t.arrival_time if m is not None and m.first_scheduled_time else None
        self.metrics.observe_finished(reason, ttft, finished - t.arrival_time, queue)
        if self.log_requests:
            logger.info("request %s finished: prompt_tokens=%d generated_tokens=%d ttft=%s total=%.3fs "
                        "finish_reason=%s", rid, num_prompt, num_generated,
                        f"{ttft:.3f}s" if ttft is not None else "-", finished - t.arrival_time, reason)

    def _fail_all(self, error: BaseException) -> None:
        streams = {id(t.stream): t.stream for t in self._tracked.values()}
        self._tracked.clear()
        with self._cond:
            pending, self._pending = self._pending, []
        for s in pending:
            self._call_soon(_resolve, s.added, error)
        if streams:
            self._call_soon(_deliver, [(s, error) for s in streams.values()])


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the client left while waiting
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _deliver(deliveries: list[tuple[RequestStream, RequestDelta | BaseException]]) -> None:
    for stream, item in deliveries:
        stream.queue.put_nowait(item)
