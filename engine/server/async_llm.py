"""AsyncLLM: what the routes see of the engine, in an API process; the engine core runs in its own.

Handlers submit tokenized requests and iterate RequestDeltas (request_stream.py). Here, on the
event loop: the checks against the model (InputProcessor), sending to the core (AsyncMPClient), and
one task that takes each step's token deltas from the core and turns them into text
(OutputProcessor: detokenization, stop strings, whose samples it aborts in the core), per-request
queues and each request's metrics (request_stats.py). Nothing is copied per step in proportion to
what a request already generated.

A watchdog turns the core's death, or no progress for engine_hang_timeout_s while it has work
(or no heartbeat at all), into /health 503 and an exit non-zero a moment later.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from engine import startup
from engine.config import EngineConfig, ServerConfig
from engine.core_messages import CoreInfo, EngineCoreOutputs, SchedulerStats
from engine.core_proc import CoreAddresses, CoreFactory, CoreLoadFailure, EngineCoreProcess, pid_alive, remove_dir
from engine.errors import RequestError
from engine.input_processor import InputProcessor
from engine.lora.request import LoRARequest
from engine.mp_client import AsyncMPClient
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.server.metrics import ServerMetrics
from engine.server.request_stats import TrackedRequest, observe_finished
from engine.server.request_stream import RequestDelta, RequestStream, SampleDelta

logger = logging.getLogger("gantry.server")

PromptInput = str | list[int]
DEAD_ENGINE_EXIT_DELAY_S = 3.0  # how long /health reports 503 before a server whose engine died exits
WATCH_INTERVAL_S = 0.2
CORE_STOP_TIMEOUT_S = 20.0  # after SHUTDOWN: batches in flight, and the other ranks released


class AsyncLLM:
    """States: starting -> loading -> ready; failed (load), dead (core exited) or hung; stopped."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, metrics: ServerMetrics, *,
                 client_index: int = 0, addresses: CoreAddresses | None = None, core_pid: int | None = None,
                 core_factory: CoreFactory | None = None, log_level: str = "info",
                 core: EngineCoreProcess | None = None):
        self.engine_config, self.server_config, self.metrics = engine_config, server_config, metrics
        self.client_index, self.core_pid = client_index, core_pid
        self.owns_core = core_pid is None  # API process 0 starts the core and stops it
        self._addresses, self._ipc_dir = addresses, None
        self.core_factory, self.log_level = core_factory, log_level
        self.state = "starting"
        self.info: CoreInfo | None = None
        self.tokenizer: Any = None
        self.stats: SchedulerStats | None = None  # the core's latest, replaced with every message
        self.num_in_flight = 0  # HTTP requests between submission and their last delta
        self.core = core  # already started by engine.serve, else started by start()
        self.client: AsyncMPClient | None = None
        self._tracked: dict[str, TrackedRequest] = {}
        self._num_added_since_stats = 0
        self._last_message = self._last_progress = time.monotonic()
        self._last_num_steps = -1
        self._tasks: list[asyncio.Task] = []

    # ---- what the routes read ----

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "loading", "ready")

    def num_waiting(self) -> int:
        """Requests not yet running: the core's waiting queue plus those sent since its last stats."""
        return (self.stats.num_waiting if self.stats is not None else 0) + self._num_added_since_stats

    # ---- start-up ----

    def start(self, loop: asyncio.AbstractEventLoop, on_fatal: Callable[[int], None]) -> None:
        """Start the core (API process 0; from the main thread), connect to it, load the tokenizer."""
        self._on_fatal = on_fatal
        if self._addresses is None:
            self._addresses, self._ipc_dir = CoreAddresses.new(1)
        self.client = AsyncMPClient(self._addresses, self.client_index)
        if self.owns_core:
            if self.core is None:
                self.core = EngineCoreProcess(self.engine_config, self._addresses, self.log_level, self.core_factory)
                self.core.start()
            self.core_pid = self.core.pid
        self.state = "loading"
        # a daemon thread, not the loop's executor: the interpreter joins executor threads at exit, so a
        # SIGTERM while loading waited for the tokenizer (seconds on a busy host) after the server had stopped
        tokenizer = loop.create_future()
        tokenizer.add_done_callback(_retrieve)  # unawaited when the core fails first: its error is not news then
        threading.Thread(target=_resolve_in_thread, args=(loop, tokenizer, self._load_tokenizer),
                         name="gantry-tokenizer", daemon=True).start()
        self._tasks = [loop.create_task(self._run(tokenizer)), loop.create_task(self._watch())]

    def _load_tokenizer(self) -> Any:
        from engine.gguf_file import forget_parses
        from engine.model_config import resolve_model_config
        from engine.serve import frontend_device
        from engine.tokenizer import load_tokenizer

        mc = resolve_model_config(self.engine_config, frontend_device(self.engine_config))  # parsed once, cached
        tokenizer = load_tokenizer(mc.tokenizer, mc.tokenizer_is_gguf, required=mc.load_format != "dummy",
                                   trust_remote_code=self.engine_config.trust_remote_code)
        forget_parses()  # this process reads no more of the file: its parse and the conversion's garbage go
        startup.release_memory()
        return tokenizer

    async def _run(self, tokenizer: asyncio.Future) -> None:
        assert self.client is not None
        message = await self.client.get_output_async()
        if isinstance(message, CoreLoadFailure):
            logger.error("cannot load the model: %s", message.message)
            return self._fail_start(message.exit_code)
        if not isinstance(message, CoreInfo):
            logger.error("the engine core failed while loading: %s", message)
            return self._fail_start(1)
        try:
            self.tokenizer = await tokenizer
        except Exception as e:
            logger.error("cannot load the tokenizer: %s", e)
            return self._fail_start(2)
        self._became_ready(message)
        while True:
            message = await self.client.get_output_async()
            if isinstance(message, EngineCoreOutputs):
                self._on_outputs(message)
            elif isinstance(message, str):
                return self._core_gone(f"the engine core died: {message}")
            # A message already waiting makes the await above return without yielding: without this,
            # a backlog would be taken to its end before any handler wrote a token (TTFT = E2E).
            await asyncio.sleep(0)

    def _fail_start(self, code: int) -> None:
        self.state = "failed"
        self._on_fatal(code)

    def _became_ready(self, info: CoreInfo) -> None:
        self.info = info
        self.eos_token_ids = set(info.eos_token_ids)  # what ends a beam search's beam (engine/server/beam.py)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
            self.client.add_eos_token_ids([self.tokenizer.eos_token_id])  # before any request: one socket, in order
        self.input_processor = InputProcessor(info, self.tokenizer, max_logprobs=self.engine_config.max_logprobs)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.metrics.bind_engine(info.model_name, info.max_model_len, lambda: self.stats)
        self._last_message = self._last_progress = time.monotonic()
        self.state = "ready"
        logger.info("ready: model %s, max_model_len %d, %d KV blocks (engine core pid %s)", info.model_name,
                    info.max_model_len, info.num_total_blocks, self.core_pid)

    # ---- health ----

    def _core_alive(self) -> bool:
        if self.core is not None:
            return self.core.is_alive()
        return self.core_pid is not None and pid_alive(self.core_pid)

    async def _watch(self) -> None:
        timeout = self.server_config.engine_hang_timeout_s
        while self.state in ("loading", "ready"):
            await asyncio.sleep(WATCH_INTERVAL_S)
            if not self._core_alive():
                code = self.core.exitcode if self.core is not None else None
                if self.state == "loading":
                    await asyncio.sleep(0.5)  # its FAILED message, if it sent one, explains more
                    if self.state == "loading":
                        logger.error("the engine core exited (code %s) while loading the model", code)
                        self._fail_start(1)
                    return
                return self._core_gone(f"the engine core exited (code {code})")
            # progress: a new step, or a heartbeat saying there is nothing to do; a stopped core or one
            # stuck inside a step sends nothing at all
            if self.state == "ready" and time.monotonic() - self._last_progress > timeout:
                return self._core_gone(f"the engine core made no progress for {timeout:g}s while it had work, "
                                       "or sent no heartbeat (engine_hang_timeout_s; if one step is that slow, "
                                       "lower max_num_batched_tokens or raise engine_hang_timeout_s)", hung=True)

    def _core_gone(self, reason: str, hung: bool = False) -> None:
        """/health turns 503 now; streams fail; the server exits non-zero in a moment, so Docker,
        Kubernetes or Slurm restart it (the whole group with several ranks)."""
        if self.state not in ("loading", "ready"):
            return
        self.state = "hung" if hung else "dead"
        logger.error("%s", reason)
        self._fail_all(RuntimeError(reason))
        asyncio.get_running_loop().call_later(DEAD_ENGINE_EXIT_DELAY_S, self._on_fatal, 1)

    # ---- requests ----

    @asynccontextmanager
    async def generate(self, requests: list[tuple[str, PromptInput, SamplingParams]],
                       arrival_time: float, lora_request: LoRARequest | None = None) -> AsyncIterator[RequestStream]:
        """Submit requests (all or none: a refused one raises RequestError naming the field) and
        stream their deltas; leaving the block early (client gone, error) aborts what is unfinished."""
        if not self.ready:
            raise ConnectionAbortedError("the engine is not running")
        prepared = []
        for request_id, prompt, params in requests:
            if request_id in self._tracked:
                raise RequestError("request_id", f"request {request_id!r} is already running")
            token_ids = prompt if isinstance(prompt, list) else self._encode(prompt)
            params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
            core_request = self.input_processor.process(request_id, token_ids, params, arrival_time, self.client_index,
                                                        lora_request=lora_request)
            prepared.append((core_request, prompt if isinstance(prompt, str) else None))
        stream = RequestStream([r.request_id for r, _ in prepared])
        for core_request, prompt_text in prepared:  # every check passed: register, then send
            rid, ids, params = core_request.request_id, core_request.prompt_token_ids, core_request.sampling_params
            if prompt_text is None and self.tokenizer is not None:
                prompt_text = self.tokenizer.decode(ids)
            self.output_processor.add_request(rid, prompt_text, ids, params, arrival_time)
            self._tracked[rid] = TrackedRequest(stream, arrival_time, len(ids), params.n, core_request.max_tokens)
            self.client.add_request(core_request)
        self._num_added_since_stats += len(prepared)
        self.num_in_flight += 1
        try:
            yield stream
        finally:
            self.num_in_flight -= 1
            if not stream.finished:
                self.abort([rid for rid in stream.request_ids if rid in self._tracked])

    def _encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("prompt", "this model has no tokenizer (load_format=dummy): give token ids")
        return self.tokenizer.encode(prompt)

    def abort(self, request_ids: list[str]) -> None:
        """Free these requests in the core; their streams get a final "abort" delta."""
        ids = [rid for rid in request_ids if rid in self._tracked]
        if not ids:
            return
        self.client.abort_requests(ids)
        self.output_processor.abort_requests(ids)
        for rid in ids:
            t = self._tracked.pop(rid)
            samples = [SampleDelta(i, "", [], None, "abort", None) for i in range(t.n)]
            t.stream.queue.put_nowait(RequestDelta(rid, samples, True))
            observe_finished(self.metrics, rid, t, "abort", None, self.server_config.log_requests)

    def abort_all(self) -> None:
        self.abort(list(self._tracked))

    # ---- outputs ----

    def _on_outputs(self, message: EngineCoreOutputs) -> None:
        now_mono = time.monotonic()
        self._last_message = now_mono
        if message.stats is not None:
            stats = message.stats
            if stats.num_steps != self._last_num_steps or not stats.has_work:
                self._last_num_steps, self._last_progress = stats.num_steps, now_mono
            self.stats = stats
            self._num_added_since_stats = 0
        if not message.outputs:
            return
        processed = self.output_processor.process_outputs(message.outputs)
        if processed.samples_to_abort:  # stopped by a stop string, or failed in the output processor
            self.client.abort_requests(processed.samples_to_abort)
        now = time.time()
        for out in processed.request_outputs:
            t = self._tracked.get(out.request_id)
            if t is None:  # aborted by its client meanwhile
                continue
            if out.error is not None:
                self._fail_stream(out.request_id, t, out.error)
                continue
            self._deliver(out, t, now)
        self.metrics.itl.flush()

    def _deliver(self, out: RequestOutput, t: TrackedRequest, now: float) -> None:
        samples = [SampleDelta(o.index, o.text, o.token_ids, o.logprobs, o.finish_reason, o.stop_reason)
                   for o in out.outputs]  # DELTA: only what is new
        t.observe_tokens(self.metrics, out.outputs, now)
        delta = RequestDelta(out.request_id, samples, out.finished)
        if not t.sent_prompt:
            delta.prompt, delta.prompt_token_ids = out.prompt, out.prompt_token_ids
            delta.prompt_logprobs = out.prompt_logprobs  # complete by a request's first output
            t.sent_prompt = True
        t.stream.queue.put_nowait(delta)
        if out.finished:
            del self._tracked[out.request_id]
            reason = out.outputs[0].finish_reason if out.outputs else "abort"
            observe_finished(self.metrics, out.request_id, t, reason or "abort", out,
                             self.server_config.log_requests)

    def _fail_stream(self, request_id: str, t: TrackedRequest, error: Exception) -> None:
        """A request failed inside the engine: its HTTP request gets the error (a 400 naming the
        field for a RequestError, else a 500), and the other prompts of that HTTP request are aborted."""
        if isinstance(error, RequestError):
            logger.warning("request %s failed: %s", request_id, error)
        else:
            logger.error("request %s failed inside the engine; ending it alone: %s", request_id, error)
        del self._tracked[request_id]
        siblings = [rid for rid, other in self._tracked.items() if other.stream is t.stream]
        if siblings:
            self.client.abort_requests(siblings)
            self.output_processor.abort_requests(siblings)
            for rid in siblings:
                del self._tracked[rid]
        t.stream.queue.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        streams = {id(t.stream): t.stream for t in self._tracked.values()}
        self._tracked.clear()
        for stream in streams.values():
            stream.queue.put_nowait(error)

    # ---- stopping ----

    def shutdown(self) -> None:
        """Stop the core (API process 0: SHUTDOWN, then wait; kill one that is hung, or still loading: a load
        has nothing to save, and the core reads SHUTDOWN only once loaded) and close the sockets. Requests
        still running (a stop for a fatal error skips the drain) end first, with a final "abort"."""
        for task in self._tasks:
            task.cancel()
        if self.ready:
            self.abort_all()
        if self.core is not None and self.core.is_alive():
            if self.state == "ready":
                assert self.client is not None
                self.client.shutdown_core()
                self.core.stop(CORE_STOP_TIMEOUT_S)
            else:
                self.core.kill()
        if self.state in ("loading", "ready"):
            self.state = "stopped"
        if self.client is not None:
            self.client.close()
        if self._ipc_dir is not None:
            remove_dir(self._ipc_dir)


def _resolve_in_thread(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, fn: Callable[[], Any]) -> None:
    """fn() on this thread, its result or error set on fut by the loop (dropped once the loop is closed)."""
    try:
        result, error = fn(), None
    except BaseException as e:  # noqa: BLE001 - handed to the future
        result, error = None, e

    def settle() -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop closed while it loaded: the server stopped
        pass


def _retrieve(fut: asyncio.Future) -> None:
    """Marks a future's exception as seen (else asyncio logs 'Future exception was never retrieved')."""
    if not fut.cancelled():
        fut.exception()
