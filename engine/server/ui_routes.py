"""The built-in chat page: `/` and `/ui` serve engine/server/ui/ (public, read once at start-up),
`/ui/status` is the JSON the page's status strip polls (guarded by the API key like /v1).

The page talks only to the public HTTP API; server_status() is the one place that reads the
server's internals, so a change of process layout rewires this function alone.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, raw
from sanic.response import json as json_response

from engine.server.protocol import APIError

if TYPE_CHECKING:
    from engine.server.app import ServerState

UI_DIR = Path(__file__).parent / "ui"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Scripts and styles only from the page's own files: no inline script, no event-handler attribute,
# no other origin; fetch() only to this server. Nothing may frame the page.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str  # quoted, as the ETag header carries it


def load_assets(ui_dir: Path = UI_DIR) -> dict[str, Asset]:
    """Every file of the page by name (index.html, app.js...): read once, so a request touches no disk."""
    assets = {}
    for path in sorted(ui_dir.iterdir()):
        if path.is_file() and path.suffix in CONTENT_TYPES:
            body = path.read_bytes()
            assets[path.name] = Asset(body, CONTENT_TYPES[path.suffix], f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    if "index.html" not in assets:
        raise FileNotFoundError(f"the chat page's index.html is missing from {ui_dir}")
    return assets


def server_status(state: ServerState) -> dict[str, Any]:
    """What the status strip shows: model, context length, running and waiting requests, KV cache use."""
    engine = state.engine
    ready = state.ready and not state.draining
    status = "ready" if ready else "draining" if state.draining else "loading" if engine.alive else engine.state
    stats = engine.stats
    loaded = state.model_info is not None
    return {
        "status": status,
        "model": state.model_info.model_name if loaded else None,
        "max_model_len": state.model_info.max_model_len if loaded else None,
        "num_requests_running": stats.num_running if stats is not None else 0,
        "num_requests_waiting": engine.num_waiting() if stats is not None else 0,
        "kv_cache_usage": stats.kv_cache_usage if stats is not None else 0.0,  # fraction, 0..1
    }


def _serve(request: Request, asset: Asset) -> HTTPResponse:
    headers = {**SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == asset.etag:
        return HTTPResponse(status=304, headers=headers)
    return raw(asset.body, content_type=asset.content_type, headers=headers)


def register_ui_routes(app: Sanic, state: ServerState, enabled: bool) -> None:
    """The page at / and /ui, its files at /ui/<name>, its status at /ui/status; when not enabled,
    / and /ui say how to turn it on instead."""
    if not enabled:
        async def disabled(request: Request) -> HTTPResponse:
            raise APIError(404, "the built-in chat page is off on this server (--disable-ui or server.ui=false); "
                                "the API is at /v1", code="ui_disabled")

        app.add_route(disabled, "/", methods=["GET"], name="ui_disabled", ctx_public=True)
        app.add_route(disabled, "/ui", methods=["GET"], name="ui_disabled_ui", ctx_public=True)
        return

    assets = load_assets()

    def page_handler(asset: Asset) -> Any:
        async def handler(request: Request) -> HTTPResponse:
            return _serve(request, asset)
        return handler

    index = page_handler(assets["index.html"])
    app.add_route(index, "/", methods=["GET"], name="ui_index", ctx_public=True)
    app.add_route(index, "/ui", methods=["GET"], name="ui_page", ctx_public=True)
    for i, (name, asset) in enumerate(assets.items()):
        # One route per file, so that no path a client sends ever reaches the file system.
        app.add_route(page_handler(asset), f"/ui/{name}", methods=["GET"], name=f"ui_asset_{i}", ctx_public=True)

    async def status(request: Request) -> HTTPResponse:
        return json_response(server_status(state), headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    app.add_route(status, "/ui/status", methods=["GET"], name="ui_status")
