"""CORS as vLLM's server does it (Starlette's CORSMiddleware with --allowed-origins/-methods/-headers
and --allow-credentials): preflights are answered before routing and the key check, and every
response to an allowed Origin carries Access-Control-Allow-Origin; an origin not allowed gets none."""
from __future__ import annotations

from sanic import Request, Sanic
from sanic.response import HTTPResponse, text

from engine.config import ServerConfig

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")  # what "*" allows (Starlette's)
SAFELISTED_HEADERS = ("accept", "accept-language", "content-language", "content-type")  # always allowed
PREFLIGHT_MAX_AGE_S = 600  # how long a browser may cache a preflight's answer (Starlette's default)


class CORSPolicy:
    """ServerConfig's allowed_origins/methods/headers and allow_credentials, resolved once."""

    def __init__(self, config: ServerConfig):
        self.allow_all_origins = "*" in config.allowed_origins
        self.origins = frozenset(config.allowed_origins)
        self.allow_all_headers = "*" in config.allowed_headers
        self.headers = frozenset(h.lower() for h in config.allowed_headers) | frozenset(SAFELISTED_HEADERS)
        self.methods = ALL_METHODS if "*" in config.allowed_methods else tuple(m.upper() for m in config.allowed_methods)
        self.allow_credentials = config.allow_credentials

    def origin_allowed(self, origin: str) -> bool:
        return self.allow_all_origins or origin in self.origins

    def response_headers(self, origin: str) -> dict[str, str]:
        """For any response to an allowed origin. With credentials the origin is echoed: browsers
        refuse `*` there."""
        if self.allow_all_origins and not self.allow_credentials:
            headers = {"Access-Control-Allow-Origin": "*"}
        else:
            headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def preflight(self, origin: str, method: str, requested_headers: str | None) -> HTTPResponse:
        """200 with the Access-Control-* headers, or 400 naming what is not allowed (and no CORS headers,
        so the browser blocks the request)."""
        failures = []
        if not self.origin_allowed(origin):
            failures.append("origin")
        if method.upper() not in self.methods:
            failures.append("method")
        requested = [h.strip().lower() for h in (requested_headers or "").split(",") if h.strip()]
        if not self.allow_all_headers and any(h not in self.headers for h in requested):
            failures.append("headers")
        if failures:
            return text(f"Disallowed CORS {', '.join(failures)}", status=400)
        headers = {**self.response_headers(origin), "Access-Control-Allow-Methods": ", ".join(self.methods),
                   "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S)}
        if self.allow_all_headers:
            if requested_headers:
                headers["Access-Control-Allow-Headers"] = requested_headers
        else:
            headers["Access-Control-Allow-Headers"] = ", ".join(sorted(self.headers))
        return text("OK", headers=headers)


def register_cors(app: Sanic, config: ServerConfig) -> None:
    """A preflight (OPTIONS with Origin and Access-Control-Request-Method) on any path is answered by a
    request middleware: Sanic runs those even when routing failed (no route has OPTIONS: a 405), and
    before the key check, which only runs once a route matched."""
    policy = CORSPolicy(config)

    @app.on_request
    async def cors_preflight(request: Request) -> HTTPResponse | None:
        origin = request.headers.get("origin")
        method = request.headers.get("access-control-request-method")
        if request.method != "OPTIONS" or origin is None or method is None:
            return None
        return policy.preflight(origin, method, request.headers.get("access-control-request-headers"))

    @app.on_response
    async def cors_headers(request: Request, response: HTTPResponse) -> None:
        origin = request.headers.get("origin")
        if origin is None or not policy.origin_allowed(origin) or "access-control-allow-origin" in response.headers:
            return
        for name, value in policy.response_headers(origin).items():
            if name == "Vary" and "vary" in response.headers:
                value = f"{response.headers['vary']}, {value}"
            response.headers[name] = value
