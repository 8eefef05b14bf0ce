"""A JSON schema's grammar, with xgrammar's length-bounded strings made valid JSON.

xgrammar (0.2.9, upstream issue mlc-ai/xgrammar#800) lowers `{"type": "string", "maxLength": 16}` to
`"\"" c{0, 16} "\""` with `c ::= [^\"\\\r\n]`: that admits raw control characters, so a sampled tab
inside the string made output `json.loads` refuses ("Invalid control character"; one sample in a few
hundred on the embedded model), and no escape can be written. Each such character rule becomes one
JSON character: a character that is not a control character, quote or backslash, or one escape (which
counts as one character, as maxLength counts the decoded string). Giving the bound as a `pattern`
instead is also correct but compiles in time that grows faster than the square of maxLength (17 s
at 4,000). The grammar's text round-trips through `Grammar.from_ebnf` exactly, so the fix is a text
edit; a later xgrammar that lowers these strings differently leaves nothing to edit.

Where any whitespace is allowed (vLLM's default; `disable_any_whitespace` gives compact JSON), each gap
between JSON tokens takes at most MAX_WHITESPACE characters. Unbounded, a model that prefers whitespace
loops on it until max_tokens and the truncated object does not parse (vllm-project/vllm#38696; on the
embedded SmolLM2, 2 samples in 300 of a two-field schema). 20 is llama.cpp's bound in its json.gbnf: a
newline and indentation five levels deep at four spaces.
"""
from __future__ import annotations

import functools
import re

MAX_WHITESPACE = 20  # characters in one gap between JSON tokens, when any whitespace is allowed
_BARE_CHARACTER = re.compile(r'^(\w+) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)  # c ::= (([^\"\\\r\n]))
_JSON_CHARACTER = r'\1 ::= (([^\\0-\\x1f\\"\\\\]) | ("\\\\" basic_escape))'
_BASIC_ESCAPE = 'basic_escape ::= (([\\"\\\\/bfnrt]) | ("u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9]))'


@functools.lru_cache(maxsize=256)
def json_schema_grammar(schema_text: str, any_whitespace: bool):
    """The xgrammar Grammar of a JSON schema, its length-bounded string characters JSON characters."""
    import xgrammar as xgr  # imported on first use: it takes seconds

    grammar = xgr.Grammar.from_json_schema(schema_text, any_whitespace=any_whitespace,
                                           max_whitespace_cnt=MAX_WHITESPACE if any_whitespace else None)
    text = str(grammar)
    fixed = _BARE_CHARACTER.sub(_JSON_CHARACTER, text)
    if fixed == text:
        return grammar
    if not re.search(r"^basic_escape ::=", fixed, re.MULTILINE):
        fixed += "\n" + _BASIC_ESCAPE
    return xgr.Grammar.from_ebnf(fixed)


@functools.lru_cache(maxsize=2)
def json_object_grammar(any_whitespace: bool):
    """OpenAI's json_object: any JSON object, with the same whitespace bound."""
    import xgrammar as xgr

    return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, any_whitespace=any_whitespace,
                                        max_whitespace_cnt=MAX_WHITESPACE if any_whitespace else None)
