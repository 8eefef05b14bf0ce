"""create_app: the Sanic application on rank 0 (API key, OpenAI errors, ops routes, drain).

Sanic starts first; the engine loads on its own thread and text workers (text.py) beside it, so
/health and /ready answer meanwhile. The key check (auth.py) runs once the router matched a route.
SIGTERM: /ready and new requests get 503, in-flight ones have shutdown_grace_s, the rest are aborted.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
import signal
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from sanic import Request, Sanic
from sanic.exceptions import RequestCancelled, SanicException
from sanic.handlers import ErrorHandler
from sanic.response import HTTPResponse, raw
from sanic.response import json as json_response

from engine.config import EngineConfig, ServerConfig
from engine.core_messages import CoreInfo
from engine.core_proc import CoreAddresses, CoreFactory, EngineCoreProcess
from engine.sampling_defaults import api_sampling_defaults
from engine.server.async_llm import AsyncLLM
from engine.server.auth import is_authorized, is_public
from engine.server.cors import register_cors
from engine.server.metrics import ServerMetrics
from engine.server.openai import register_openai_routes
from engine.server.protocol import APIError, ModelContext
from engine.server.text import TextFrontend
from engine.server.ui_routes import register_ui_routes

logger = logging.getLogger("gantry.server")

RETRY_AFTER_S = "5"


def gantry_version() -> str:
    try:
        return importlib.metadata.version("gantry")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class ServerState:
    """What the routes share: configs, the async engine, metrics, the key, the drain flag."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, api_key: str | None,
                 engine: AsyncLLM):
        self.engine_config = engine_config
        self.server_config = server_config
        self.api_key = api_key
        self.metrics = engine.metrics
        self.engine = engine
        self.created = int(time.time())
        self.draining = False
        self.interrupted = False  # SIGINT (Ctrl-C): a drain without its grace period
        self.exit_code = 0
        self.frontend: TextFrontend | None = None  # started with the server, loaded once the engine is
        self.on_fatal: Callable[[int], None] = lambda code: None  # stops the server with an exit code
        self.on_drain: Callable[[], None] = lambda: None  # API process 0: tell the other API processes
        self.children: Any = None  # API process 0 with api_server_count > 1: the others (api_procs.ApiProcesses)
        self.group: Any = None  # with api_server_count > 1: the group's readiness (api_procs.ReadyGroup)
        self._group_ready = True
        self.lora_registry: Any = None  # engine.lora.registry.LoRARegistry once needed (engine/server/lora_routes.py)
        self.lora_load_lock: Any = None  # asyncio.Lock of run-time adapter loads, made in the event loop
        self.background: list[asyncio.Task] = []  # start-up waiters, cancelled when the server stops
        self.default_sampling: dict[str, Any] = {}  # the generation config's request defaults (ModelContext's)

    def run_in_background(self, coro: Any) -> None:
        """A task that waits on start-up, cancelled at stop: a stop while it waits (SIGTERM, a failed
        load) otherwise closed the loop under it ('Task was destroyed but it is pending!')."""
        self.background.append(asyncio.get_running_loop().create_task(coro))

    @property
    def ready(self) -> bool:
        """This process can serve, and so can every API process of the group (with several, the port
        is shared: a request may land on any of them)."""
        own = self.engine.ready and self.frontend is not None and self.frontend.ready
        if own and self.group is not None and not self._group_ready:
            self._group_ready = self.group.ready()
            return self._group_ready
        return own

    def set_group(self, group: Any) -> None:
        """api_procs.ReadyGroup: this process says when it is ready; all say when all are."""
        self.group, self._group_ready = group, False

    def require_ready(self) -> ServerState:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down",
                           headers={"Retry-After": RETRY_AFTER_S})
        if not self.ready:
            raise APIError(503, "the model is not ready yet (loading, or the engine failed); see /ready",
                           code="not_ready", headers={"Retry-After": RETRY_AFTER_S})
        return self

    @property
    def model_info(self) -> CoreInfo | None:
        """The served model's name, context length... (once the engine core is ready)."""
        return self.engine.info

    @property
    def model_context(self) -> ModelContext:
        assert self.frontend is not None and self.frontend.ctx is not None
        return self.frontend.ctx

    async def load_frontend(self) -> None:
        """Once the engine is ready (and idle), give the text workers its tokenizer; stop the server if that fails."""
        while self.engine.state in ("starting", "loading"):
            await asyncio.sleep(0.05)
        if not self.engine.ready or self.frontend is None:
            return
        info = self.engine.info
        assert info is not None
        # vocab_size: the tokenizer's (load() counts it on its copy), else the model's
        ctx = ModelContext(info.model_name, info.max_model_len, info.vocab_size, max_num_seqs=info.max_num_seqs,
                           lora_enabled=self.engine_config.enable_lora,
                           enable_auto_tool_choice=self.server_config.enable_auto_tool_choice,
                           tool_call_parser=self.server_config.tool_call_parser,
                           reasoning_parser=self.server_config.reasoning_parser,
                           default_sampling=self.default_sampling)
        t0 = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.frontend.load, self.engine.tokenizer, ctx)
        except Exception:
            logger.exception("cannot start the text workers")
            self.on_fatal(1)
            return
        logger.info("text workers ready (%d processes%s) in %.1fs; text fields up to %s characters",
                    self.frontend.num_workers, ", started at the first large body" if self.frontend.lazy else "",
                    time.monotonic() - t0, self.frontend.ctx.max_text_chars)

    def check_capacity(self, num_new: int, num_seqs: int, param: str) -> None:
        """num_new engine requests of num_seqs sequences in all (prompts x n, best_of or the beam width): a 400
        naming param when the sequences alone are more than max_waiting_requests (as much work as that many
        requests: one 2.6 KB body of 256 prompts x n=128 held the engine for minutes), a 503 when the waiting
        queue would exceed it."""
        limit = self.server_config.max_waiting_requests
        if num_seqs > limit:
            raise APIError(400, f"{param}: this request asks for {num_seqs} sequences (its prompts x {param}), more "
                                f"than the server takes at once (max_waiting_requests {limit})", param=param)
        if self.engine.num_waiting() + num_new > limit:
            logger.warning("request rejected: waiting queue full (%d requests)", limit)
            raise APIError(503, f"the server is overloaded: more than {limit} requests waiting; retry later",
                           code="overloaded", headers={"Retry-After": "1"})


def printable(text: str, limit: int = 200) -> str:
    """A client's text made safe for a log line: escaped control and non-ASCII characters, bounded."""
    return text[:limit].encode("unicode_escape").decode("ascii") + ("..." if len(text) > limit else "")


def error_response(e: APIError, request: Request | None = None) -> HTTPResponse:
    if request is not None and e.status < 500 and e.code != "overloaded":  # overload logs its own warning
        logger.info("rejected %s %s: %d %s", request.method, printable(request.path), e.status, printable(e.message))
    return json_response(e.body(), status=e.status, headers=e.headers)


def _route_label(request: Request) -> str:
    return (request.uri_template or request.path) if request.route is not None else "unmatched"


class GantryRequest(Request):
    """Sanic's request. The stand-in Sanic builds to answer a request it could not parse (method
    NONE) gets a URL it can parse too, so a NUL byte in the path is a 400, not a dropped connection."""

    def __init__(self, url_bytes: bytes, *args: Any, **kwargs: Any):
        if kwargs.get("method") == "NONE":
            url_bytes = re.sub(rb"[\x00-\x20\x7f-\xff]", lambda m: b"%%%02X" % m[0][0], url_bytes)
        super().__init__(url_bytes, *args, **kwargs)


class OpenAIErrorHandler(ErrorHandler):
    """Every error, Sanic's own included (404, 405, 413...), in OpenAI's shape; no stack traces."""

    def default(self, request: Request, exception: BaseException) -> HTTPResponse:
        if isinstance(exception, APIError):
            return error_response(exception, request)
        if isinstance(exception, RequestCancelled):
            # The client hung up (its engine requests are aborted): nothing to answer, nothing failed here.
            logger.info("client hung up: %s %s", request.method, printable(request.path))
            request.app.ctx.state.metrics.observe_aborted(request.method, _route_label(request))
            request.ctx.aborted = True
            return HTTPResponse(status=499)  # nginx's "client closed request"; never sent
        if isinstance(exception, SanicException):
            status = exception.status_code
            if status == 404:
                return error_response(APIError(404, f"route not found: {request.path}", code="not_found"), request)
            if status == 405:
                return error_response(APIError(405, f"method {request.method} is not allowed on {request.path}",
                                               code="method_not_allowed"), request)
            if status == 413 and str(exception).startswith("Request header"):
                return error_response(_header_overflow(request), request)
            if status == 413:
                limit = request.app.config.REQUEST_MAX_SIZE
                return error_response(APIError(413, f"body: the request body exceeds {limit} bytes",
                                               param="body", code="request_too_large"), request)
            if status == 400 and request.method == "NONE":  # Sanic could not parse the request itself
                return error_response(APIError(400, f"malformed HTTP request: {exception}",
                                               code="malformed_request"), request)
            if 400 <= status < 500:
                return error_response(APIError(status, str(exception)), request)
        logger.error("unhandled error on %s %s: %s: %s", request.method, printable(request.path),
                     type(exception).__name__, exception, exc_info=exception)
        return error_response(APIError(500, "internal server error", code="internal_error"))


def _header_overflow(request: Request) -> APIError:
    """Sanic says 413 for any head over REQUEST_MAX_HEADER_SIZE: 414 when the request line alone
    is that long (the URL), else 431 (the headers)."""
    limit = request.app.config.REQUEST_MAX_HEADER_SIZE
    received = getattr(request.stream, "recv_buffer", b"")
    line_end = received.find(b"\r\n")
    if line_end == -1 or line_end >= limit:
        return APIError(414, f"the URL exceeds {limit} bytes", code="uri_too_long")
    return APIError(431, f"the request headers exceed {limit} bytes", code="headers_too_large")


def create_app(engine_config: EngineConfig, server_config: ServerConfig, api_key: str | None = None,
               core_factory: CoreFactory | None = None, *, client_index: int = 0,
               addresses: CoreAddresses | None = None, core_pid: int | None = None, log_level: str = "info",
               core: EngineCoreProcess | None = None) -> Sanic:
    """One API process; api_key is the resolved key (ServerConfig.resolve_api_key), None: open.
    API process 0 (core_pid None) owns the engine core: `core` when engine.serve already started it
    (its imports and loading overlap ours), else it starts one (built by core_factory, an importable
    function, when given: tests inject faults with it); the others connect to its addresses."""
    app = Sanic("gantry", error_handler=OpenAIErrorHandler(), configure_logging=False, request_class=GantryRequest)
    app.config.REQUEST_MAX_SIZE = server_config.max_request_body_bytes
    app.config.RESPONSE_TIMEOUT = 7 * 24 * 3600  # generation may be long; clients decide when to give up
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 2.0  # in-flight requests are drained before Sanic stops
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.NOISY_EXCEPTIONS = False
    engine = AsyncLLM(engine_config, server_config, ServerMetrics(), client_index=client_index, addresses=addresses,
                      core_pid=core_pid, core_factory=core_factory, log_level=log_level, core=core)
    state = ServerState(engine_config, server_config, api_key, engine)
    state.default_sampling = api_sampling_defaults(engine_config, log=client_index == 0)
    app.ctx.state = state

    @app.signal("http.routing.after")
    async def authenticate(request: Request, **_: Any) -> None:
        """Right after routing, before the body is read: an unauthorized request, or a compressed body,
        is refused without buffering its body (Sanic drains it); the key check never runs for no route."""
        if state.api_key is not None and not is_public(request.route) and not is_authorized(
                request.headers.get("authorization"), state.api_key):
            raise APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # else a gzip body was "not valid JSON: can't decode byte 0x8b"
            raise APIError(415, f"Content-Encoding: {printable(encoding, 40)} is not supported; send the body "
                                "uncompressed", param="Content-Encoding", code="unsupported_content_encoding")

    @app.on_request
    async def stamp(request: Request) -> None:
        request.ctx.start = time.monotonic()

    register_cors(app, server_config)  # preflights are answered before the key check

    @app.on_response
    async def count_request(request: Request, response: HTTPResponse) -> None:
        if getattr(request.ctx, "aborted", False):  # a hang-up is counted as aborted, not as a response
            return
        if response.content_type == "text/event-stream" and request.conn_info is not None:
            # A stream's head goes out before its body: it counts once its handler ends (http.handler.after),
            # or as aborted when the client hangs up first (the connection ends with it still open).
            request.ctx.stream_status = response.status
            request.conn_info.ctx.open_stream = request
            return
        state.metrics.observe_http(request.method, _route_label(request), response.status)

    @app.signal("http.handler.after")
    async def count_stream(request: Request, **_: Any) -> None:
        if request.conn_info is not None and getattr(request.conn_info.ctx, "open_stream", None) is request:
            request.conn_info.ctx.open_stream = None
            state.metrics.observe_http(request.method, _route_label(request), request.ctx.stream_status)

    @app.signal("http.lifecycle.complete")
    async def count_hung_up_stream(conn_info: Any, **_: Any) -> None:
        request = getattr(conn_info.ctx, "open_stream", None)
        if request is None:
            return
        conn_info.ctx.open_stream = None
        # its handler never ended: cancelled when the client hung up (counted already if before any chunk)
        if not getattr(request.ctx, "aborted", False):
            logger.info("client hung up mid-stream: %s %s", request.method, printable(request.path))
            state.metrics.observe_aborted(request.method, _route_label(request))

    @app.get("/health", ctx_public=True)
    @app.route("/ping", methods=["GET", "POST"], name="ping", ctx_public=True)  # SageMaker's health route (vLLM's)
    async def health(request: Request) -> HTTPResponse:
        if state.engine.alive:
            return json_response({"status": "ok"})
        return json_response({"status": "the engine core is not running", "engine_state": state.engine.state},
                             status=503)

    @app.get("/ready", ctx_public=True)
    async def ready(request: Request) -> HTTPResponse:
        if state.ready and not state.draining:
            return json_response({"status": "ready"})
        status = "draining" if state.draining else "starting text workers" if state.engine.ready else state.engine.state
        return json_response({"status": status}, status=503, headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/version", ctx_public=True)
    async def version(request: Request) -> HTTPResponse:
        return json_response({"version": gantry_version()})

    @app.get("/metrics", ctx_public=not server_config.metrics_require_key)
    async def metrics(request: Request) -> HTTPResponse:
        return raw(state.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    register_openai_routes(app)
    register_ui_routes(app, state, server_config.ui)

    @app.after_server_start
    async def start_engine(app: Sanic) -> None:
        loop = asyncio.get_running_loop()
        def on_fatal(code: int) -> None:
            state.exit_code = code
            if app.state.is_running:
                app.stop()
            else:  # still in Sanic's start-up listeners, where stopping the loop leaves the process hanging
                loop.create_task(_stop_once_serving(app))

        state.on_fatal = on_fatal
        state.frontend = TextFrontend()  # its workers (unless lazy) start importing while the model loads
        state.engine.start(loop, on_fatal)
        state.run_in_background(state.load_frontend())
        # Sanic's own handlers stop at once, cutting streams off mid-chunk; ours drain first (SIGINT: aborting)
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(drain(app)))
        loop.add_signal_handler(signal.SIGINT, lambda: loop.create_task(drain(app, interrupted=True)))
        logger.info("listening on http://%s:%d (model loading in the background; /ready says when)",
                    server_config.host, server_config.port)

    @app.before_server_stop
    async def stop_engine(app: Sanic) -> None:
        if not state.exit_code and state.engine.state in ("dead", "hung"):  # a drain came before the planned exit
            state.exit_code = 1
        for task in state.background:
            task.cancel()
        await asyncio.gather(*state.background, return_exceptions=True)
        if state.children is not None:  # the other API processes first: they use the core while draining
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):  # Sanic removed ours: a second signal still reaches them
                loop.add_signal_handler(sig, state.on_drain)
            if state.exit_code:
                state.children.kill()
            else:
                await loop.run_in_executor(None, state.children.join, server_config.shutdown_grace_s + 10)
        state.engine.shutdown()
        if state.frontend is not None:
            state.frontend.shutdown()

    return app


async def _stop_once_serving(app: Sanic) -> None:
    """app.stop() for a fatal error raised before Sanic finished starting (an engine that fails fast)."""
    while not app.state.is_running:
        await asyncio.sleep(0.05)
    app.stop()


async def drain(app: Sanic, interrupted: bool = False) -> None:
    """SIGTERM: refuse new work, let in-flight requests finish within the grace period, abort the rest, stop.
    SIGINT (Ctrl-C), or a second signal during a drain: the same without the grace period, so every stream still
    ends with its final chunk."""
    state: ServerState = app.ctx.state
    if state.draining:  # a second signal, SIGTERM included (docker stop twice, scancel then scancel again)
        state.interrupted = True
        state.on_drain()  # the other API processes take it as their second signal too
        return
    state.interrupted = interrupted
    state.draining = True
    state.on_drain()  # API process 0: the other API processes drain too
    grace = 0.0 if interrupted else state.server_config.shutdown_grace_s
    logger.info("%s: draining %d in-flight requests (grace %.0fs)", "SIGINT" if interrupted else "SIGTERM",
                state.engine.num_in_flight, grace)
    deadline = time.monotonic() + grace
    while state.engine.num_in_flight and time.monotonic() < deadline and not state.interrupted:
        await asyncio.sleep(0.05)
    if state.engine.num_in_flight:
        logger.warning("%s: aborting %d requests", "interrupted" if state.interrupted else "grace period over",
                       state.engine.num_in_flight)
        state.engine.abort_all()
        deadline = time.monotonic() + 5.0
        while state.engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    logger.info("drained; stopping")
    await _stop_once_serving(app)

