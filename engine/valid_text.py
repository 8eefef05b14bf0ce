"""Whether a request's text is valid Unicode: JSON's \\ud800 escapes can carry a lone surrogate, which the
tokenizer and the engine core's message encoder cannot take. One check and one message for every field."""
from __future__ import annotations


def unicode_problem(text: str) -> str | None:
    """What makes text invalid Unicode (its first lone surrogate and where), or None when it is valid."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode: a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start}"
    return None
