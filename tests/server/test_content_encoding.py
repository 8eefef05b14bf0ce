"""A compressed request body (Content-Encoding: gzip, deflate...) is a 415 naming the header, answered
before the body is read; the connection serves the next request. It was a 400 "body: not valid JSON:
'utf-8' codec can't decode byte 0x8b" (found hunting lifecycle defects in the live server)."""
from __future__ import annotations

import gzip
import json

import httpx

from tests.server.conftest import MODEL, LiveServer


def test_compressed_body_is_refused_by_name(server: LiveServer) -> None:
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    with httpx.Client(base_url=server.base_url, timeout=60) as client:  # one keep-alive connection
        for encoding in ("gzip", "Deflate", "br, gzip"):
            r = client.post("/v1/completions", content=gzip.compress(body),
                            headers={"Content-Type": "application/json", "Content-Encoding": encoding})
            assert r.status_code == 415, r.text
            error = r.json()["error"]
            assert error["param"] == "Content-Encoding" and error["code"] == "unsupported_content_encoding"
            assert encoding.lower() in error["message"]
        r = client.post("/v1/completions", content=body,
                        headers={"Content-Type": "application/json", "Content-Encoding": "identity"})
        assert r.status_code == 200, r.text
