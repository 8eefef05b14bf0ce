"""API key check: `Authorization: Bearer <key>`, compared in constant time.

Guards every /v1 route and /tokenize, /detokenize; /metrics too when configured.
/health, /ready and /version stay open. The key is never logged or echoed.
"""
from __future__ import annotations

import hmac

OPEN_PATHS = ("/health", "/ready", "/version")
GUARDED_EXACT = ("/tokenize", "/detokenize")


def is_guarded(path: str, metrics_require_key: bool) -> bool:
    if path in OPEN_PATHS:
        return False
    if path == "/metrics":
        return metrics_require_key
    return path == "/v1" or path.startswith("/v1/") or path in GUARDED_EXACT


def is_authorized(authorization: str | None, api_key: str) -> bool:
    """True when the header carries the key; compared as bytes in constant time."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), api_key.encode("utf-8"))
