"""SSE chunks stay one line for every line reader: a token's text may hold U+0085, U+2028 or U+2029, which
JSON carries raw but str.splitlines (httpx's iter_lines) ends a line on. CI once saw a stream's chunk cut
in two there (tests/server/test_core_process.py's 16 random streams)."""
from __future__ import annotations

import json

from httpx._decoders import LineDecoder

from engine.server.serving import json_field as _json, sse as _sse

TEXT = "a\u2028b\x85c\u2029d\x1ce\u00e9\u4e2d\n"


def test_chunk_text_is_one_line_and_the_same_string() -> None:
    for line in (_sse({"choices": [{"text": TEXT}]}), f'data: {{"text":{_json(TEXT)}}}\n\n'):
        lines = [x for x in LineDecoder().decode(line) if x]
        assert len(lines) == 1 and lines[0].startswith("data: ")
        body = json.loads(lines[0][6:])
        assert (body["choices"][0]["text"] if "choices" in body else body["text"]) == TEXT
        assert "\u00e9\u4e2d" in line  # other non-ASCII text stays as it is
