"""create_app: the Sanic application on rank 0 (API key, OpenAI errors, ops routes, drain).

Sanic starts first and the engine loads on its own thread, so /health and /ready answer
while weights load. SIGTERM: /ready turns 503, new requests get 503, in-flight ones have
ServerConfig.shutdown_grace_s to finish, the rest are aborted, then the server stops.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import signal
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler
from sanic.response import HTTPResponse, raw
from sanic.response import json as json_response

from engine.config import EngineConfig, ServerConfig
from engine.server.async_engine import AsyncEngine, EngineFactory
from engine.server.auth import is_authorized, is_guarded
from engine.server.metrics import ServerMetrics
from engine.server.openai import register_openai_routes
from engine.server.protocol import APIError, ModelContext

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
                 engine_factory: EngineFactory | None):
        self.engine_config = engine_config
        self.server_config = server_config
        self.api_key = api_key
        self.metrics = ServerMetrics()
        self.engine = AsyncEngine(engine_config, self.metrics, server_config.log_requests, engine_factory)
        self.created = int(time.time())
        self.draining = False
        self.exit_code = 0
        self._model_context: ModelContext | None = None

    def require_ready(self) -> ServerState:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down",
                           headers={"Retry-After": RETRY_AFTER_S})
        if not self.engine.ready:
            raise APIError(503, "the model is not ready yet (loading, or the engine failed); see /ready",
                           code="not_ready", headers={"Retry-After": RETRY_AFTER_S})
        return self

    @property
    def llm_engine(self) -> Any:
        """The LLMEngine itself (once loaded): its tokenizer, model_name, max_model_len."""
        return self.engine.engine

    @property
    def model_context(self) -> ModelContext:
        if self._model_context is None:
            engine = self.llm_engine
            self._model_context = ModelContext(engine.model_name, engine.max_model_len, len(engine.tokenizer))
        return self._model_context

    def check_capacity(self, num_new: int) -> None:
        """503 when the waiting queue would exceed max_waiting_requests."""
        limit = self.server_config.max_waiting_requests
        if self.engine.num_waiting() + num_new > limit:
            logger.warning("request rejected: waiting queue full (%d requests)", limit)
            raise APIError(503, f"the server is overloaded: more than {limit} requests waiting; retry later",
                           code="overloaded", headers={"Retry-After": "1"})


def error_response(e: APIError, request: Request | None = None) -> HTTPResponse:
    if request is not None and e.status < 500 and e.code != "overloaded":  # overload logs its own warning
        logger.info("rejected %s %s: %d %s", request.method, request.path, e.status, e.message)
    return json_response(e.body(), status=e.status, headers=e.headers)


class OpenAIErrorHandler(ErrorHandler):
    """Every error, Sanic's own included (404, 405, 413...), in OpenAI's shape; no stack traces."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        if isinstance(exception, APIError):
            return error_response(exception, request)
        if isinstance(exception, SanicException):
            status = exception.status_code
            if status == 404:
                return error_response(APIError(404, f"route not found: {request.path}", code="not_found"), request)
            if status == 405:
                return error_response(APIError(405, f"method {request.method} is not allowed on {request.path}",
                                               code="method_not_allowed"), request)
            if status == 413:
                limit = request.app.config.REQUEST_MAX_SIZE
                return error_response(APIError(413, f"body: the request body exceeds {limit} bytes",
                                               param="body", code="request_too_large"), request)
            if 400 <= status < 500:
                return error_response(APIError(status, str(exception)), request)
        logger.error("unhandled error on %s %s: %s: %s", request.method, request.path,
                     type(exception).__name__, exception, exc_info=exception)
        return error_response(APIError(500, "internal server error", code="internal_error"))


def create_app(engine_config: EngineConfig, server_config: ServerConfig, api_key: str | None = None,
               engine_factory: EngineFactory | None = None) -> Sanic:
    """The API on rank 0; api_key is the resolved key (ServerConfig.resolve_api_key), None: open."""
    app = Sanic("gantry", error_handler=OpenAIErrorHandler(), configure_logging=False)
    app.config.REQUEST_MAX_SIZE = server_config.max_request_body_bytes
    app.config.RESPONSE_TIMEOUT = 7 * 24 * 3600  # generation may be long; clients decide when to give up
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 2.0  # in-flight requests are drained before Sanic stops
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.NOISY_EXCEPTIONS = False
    state = ServerState(engine_config, server_config, api_key, engine_factory)
    app.ctx.state = state

    @app.on_request
    async def authenticate(request: Request) -> HTTPResponse | None:
        request.ctx.start = time.monotonic()
        if state.api_key is None or not is_guarded(request.path, server_config.metrics_require_key):
            return None
        if is_authorized(request.headers.get("authorization"), state.api_key):
            return None
        return error_response(APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}), request)

    @app.on_response
    async def count_request(request: Request, response: HTTPResponse) -> None:
        route = request.uri_template if request.route is not None else "unmatched"
        state.metrics.observe_http(request.method, route or request.path, response.status)

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        if state.engine.alive:
            return json_response({"status": "ok"})
        return json_response({"status": "engine loop is not running", "engine_state": state.engine.state}, status=503)

    @app.get("/ready")
    async def ready(request: Request) -> HTTPResponse:
        if state.engine.ready and not state.draining:
            return json_response({"status": "ready"})
        status = "draining" if state.draining else state.engine.state
        return json_response({"status": status}, status=503, headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/version")
    async def version(request: Request) -> HTTPResponse:
        return json_response({"version": gantry_version()})

    @app.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        return raw(state.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    register_openai_routes(app)

    @app.after_server_start
    async def start_engine(app: Sanic) -> None:
        loop = asyncio.get_running_loop()
        def on_fatal(code: int) -> None:
            state.exit_code = code
            app.stop()

        state.engine.start(loop, on_fatal)
        # Sanic's own SIGTERM handler stops at once; ours drains first.
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(drain(app)))
        logger.info("listening on http://%s:%d (model loading in the background; /ready says when)",
                    server_config.host, server_config.port)

    @app.before_server_stop
    async def stop_engine(app: Sanic) -> None:
        state.engine.shutdown()

    return app


async def drain(app: Sanic) -> None:
    """SIGTERM: refuse new work, let in-flight requests finish within the grace period, abort the rest, stop."""
    state: ServerState = app.ctx.state
    if state.draining:
        return
    state.draining = True
    grace = state.server_config.shutdown_grace_s
    logger.info("SIGTERM: draining %d in-flight requests (grace %.0fs)", state.engine.num_in_flight, grace)
    deadline = time.monotonic() + grace
    while state.engine.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.engine.num_in_flight:
        logger.warning("grace period over: aborting %d requests", state.engine.num_in_flight)
        state.engine.abort_all()
        deadline = time.monotonic() + 5.0
        while state.engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    logger.info("drained; stopping")
    app.stop()

