"""LoRA in the API (vLLM's): the request's `model` names the base model or an adapter, /v1/models
lists adapters with `parent` = the base, and POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(behind the API key, refused unless allow_runtime_lora_updating) change the names at run time."""
from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import msgspec
from sanic import Request
from sanic.response import HTTPResponse
from sanic.response import text as text_response

from engine.errors import RequestError
from engine.lora.adapter import ModelDims
from engine.lora.registry import LoRARegistry
from engine.lora.request import LoRARequest
from engine.server.protocol import APIError, show

if TYPE_CHECKING:
    from engine.server.app import ServerState


class _ModelField(msgspec.Struct):
    model: Any = None


def registry(state: ServerState) -> LoRARegistry | None:
    """This API process's adapter names (lora_modules first), once the core is ready; None without LoRA."""
    info = state.model_info
    if not state.engine_config.enable_lora or info is None or not info.lora_dims:
        return None
    if state.lora_registry is None:
        # the core's start-up registry has read lora_modules' weights: this process checks names and headers
        state.lora_registry = LoRARegistry(state.engine_config, ModelDims(*info.lora_dims), info.model_name,
                                           check_values=False)
    return state.lora_registry


def requested_lora(state: ServerState, body: bytes, beam: bool = False) -> LoRARequest | None:
    """The adapter a request's `model` names (None: the base model); 404 naming `model` when unknown.
    The text workers have already checked the body (valid JSON, `model` a string or absent)."""
    reg = registry(state)
    if reg is None:
        return None
    try:
        model = msgspec.json.decode(body, type=_ModelField).model
    except msgspec.DecodeError:
        return None
    if not model or model == reg.base_name:  # "" means the served model, as without adapters (vLLM's)
        return None
    lora = reg.by_name.get(model) if isinstance(model, str) else None
    if lora is None:
        names = ", ".join(f"`{n}`" for n in [reg.base_name, *reg.by_name])
        raise APIError(404, f"model: the model {show(model)} does not exist; this server serves {names}",
                       param="model", code="model_not_found")
    if beam:  # the beam search runs on the base model's steps: refuse rather than ignore the adapter
        raise APIError(400, "use_beam_search: not supported with a LoRA adapter", param="use_beam_search")
    return lora


def adapter_cards(state: ServerState, created: int) -> list[dict[str, Any]]:
    """vLLM's Model objects of the adapters: root = the directory, parent = the base model."""
    reg = registry(state)
    if reg is None:
        return []
    info = state.model_info
    return [{"id": r.lora_name, "object": "model", "created": created, "owned_by": "gantry", "root": r.lora_path,
             "parent": reg.base_name, "max_model_len": info.max_model_len, "permission": []}
            for r in reg.by_name.values()]


def _body(request: Request, fields: tuple[str, ...]) -> dict[str, str]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise APIError(400, "body: not valid JSON", param="body") from None
    if not isinstance(body, dict):
        raise APIError(400, "body: must be a JSON object", param="body")
    for name in fields:
        if not isinstance(body.get(name), str) or not body[name]:
            raise APIError(400, f"{name}: required, a non-empty string", param=name)
    return body


def _updatable(request: Request) -> LoRARegistry:
    state: ServerState = request.app.ctx.state
    state.require_ready()
    if not state.server_config.allow_runtime_lora_updating:
        raise APIError(403, "allow_runtime_lora_updating: runtime LoRA updates are off on this server "
                            "(--allow-runtime-lora-updating)", param="allow_runtime_lora_updating")
    reg = registry(state)
    if reg is None:
        raise APIError(400, "enable_lora: this server does not serve LoRA adapters (--enable-lora)",
                       param="enable_lora")
    return reg


def _load_lock(state: ServerState) -> asyncio.Lock:
    """Serializes run-time loads: a name is checked free, then taken, with no other load between."""
    if state.lora_load_lock is None:
        state.lora_load_lock = asyncio.Lock()
    return state.lora_load_lock


async def load_lora_adapter(request: Request) -> HTTPResponse:
    reg = _updatable(request)
    body = _body(request, ("lora_name", "lora_path"))
    try:  # reading the weights takes a while (0.1-0.2 s at 7B, rank 16): off the event loop, one load at a time
        async with _load_lock(request.app.ctx.state):
            await asyncio.to_thread(reg.add, body["lora_name"], body["lora_path"])
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    return text_response(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")


async def unload_lora_adapter(request: Request) -> HTTPResponse:
    reg = _updatable(request)
    body = _body(request, ("lora_name",))
    try:
        reg.remove(body["lora_name"])
    except RequestError as e:
        raise APIError(404, str(e), param=e.param, code="not_found") from None
    return text_response(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")


def register_lora_routes(app: Any) -> None:
    app.add_route(load_lora_adapter, "/v1/load_lora_adapter", methods=["POST"])
    app.add_route(unload_lora_adapter, "/v1/unload_lora_adapter", methods=["POST"])
