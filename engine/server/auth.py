"""API key check: `Authorization: Bearer <key>`, compared in constant time, for the route that will run.

Default deny: every route is guarded unless registered public (`ctx_public=True`: /health, /ready,
/version, and /metrics unless metrics_require_key). The decision reads the route the router matched,
so every spelling it accepts (a trailing slash...) gets the same answer; a request that matches no
route runs no handler (404, 405, a malformed request's 400) and needs no key. The key is never logged.
"""
from __future__ import annotations

import hmac
from typing import Any

from engine.server.protocol import APIError


def is_public(route: Any) -> bool:
    """True when no handler will run (no route matched) or the route was registered public."""
    return route is None or bool(getattr(route.ctx, "public", False))


def is_authorized(authorization: str | None, api_key: str) -> bool:
    """True when the header carries the key; APIError 400 when the header is not text at all."""
    if not authorization:
        return False
    try:
        # Sanic decodes header bytes as UTF-8 with surrogateescape: raw bytes like \xff land as surrogates.
        value = authorization.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "Authorization: the header is not valid UTF-8; send `Authorization: Bearer <key>`",
                       param="Authorization") from None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(token.strip(), api_key.encode("utf-8"))
