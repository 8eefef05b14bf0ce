"""Length-bounded JSON strings compile to grammars whose every output is valid JSON (json_schema.py):
xgrammar's own lowering of maxLength admits a raw tab, which json.loads refuses (a CI failure of
test_samples_per_schema_all_valid, 2026-12-03), and no escape. Where any whitespace is allowed, a gap
between JSON tokens takes at most MAX_WHITESPACE characters, so a model cannot loop on whitespace until
max_tokens. Checked with xgrammar's matcher; no model."""
from __future__ import annotations

import json
import time

import pytest
import xgrammar as xgr

from engine.structured.json_schema import MAX_WHITESPACE, json_object_grammar, json_schema_grammar


def accepts(schema: dict | None, text: str, any_whitespace: bool = False) -> bool:
    """Whether the grammar the engine compiles for schema (None: json_object) accepts text as a whole output."""
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["a"]))
    grammar = compiler.compile_grammar(json_object_grammar(any_whitespace) if schema is None
                                       else json_schema_grammar(json.dumps(schema), any_whitespace))
    matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_completed()


def obj(prop: dict) -> dict:
    return {"type": "object", "properties": {"t": prop}, "required": ["t"]}


@pytest.mark.parametrize("bound", [{"maxLength": 4}, {"minLength": 1, "maxLength": 4}, {"minLength": 2}])
@pytest.mark.parametrize("any_whitespace", [False, True])
def test_bounded_strings_are_json_strings(bound: dict, any_whitespace: bool) -> None:
    schema = obj({"type": "string", **bound})
    assert accepts(schema, '{"t": "abc"}', any_whitespace)
    assert not accepts(schema, '{"t": "a\tc"}', any_whitespace)  # what xgrammar's lowering let through
    assert accepts(schema, '{"t": "a\\tc"}', any_whitespace)  # and an escape, which it refused
    assert accepts(schema, '{"t": "\\"\\u00e9"}', any_whitespace)
    assert not accepts(schema, '{"t": "a\\qc"}', any_whitespace)


def test_bounds_count_characters_of_the_decoded_string() -> None:
    schema = obj({"type": "string", "minLength": 2, "maxLength": 4})
    assert [accepts(schema, '{"t": "%s"}' % ("é" * n)) for n in range(6)] == [False, False, True, True, True, False]
    assert [accepts(schema, '{"t": "%s"}' % ("\\n" * n)) for n in range(6)] == [False, False, True, True, True, False]


def test_nested_and_large_bounds_compile_fast() -> None:
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}},
        "body": {"type": "string", "maxLength": 100_000}}, "required": ["tags", "body"]}
    start = time.perf_counter()
    assert accepts(schema, '{"tags": ["ab", "c\\"d"], "body": "x"}')
    assert time.perf_counter() - start < 30  # a pattern of the same bound takes minutes
    assert not accepts(schema, '{"tags": ["a\tb"], "body": "x"}')
    assert not accepts(schema, '{"tags": ["abcd"], "body": "x"}')


def test_schema_without_bounded_strings_unchanged() -> None:
    text = json.dumps(obj({"type": "string", "pattern": "^[a-z]+$"}))
    assert str(json_schema_grammar(text, True)) == str(
        xgr.Grammar.from_json_schema(text, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE))


@pytest.mark.parametrize("schema", [obj({"type": "array", "items": {"type": "integer"}}), None],
                         ids=["schema", "object"])
def test_whitespace_gaps_bounded(schema: dict | None) -> None:
    doc = {"t": [1, 2]}
    assert accepts(schema, json.dumps(doc, indent=4), any_whitespace=True)  # pretty-printed
    for gap, ok in ((MAX_WHITESPACE, True), (MAX_WHITESPACE + 1, False)):
        assert accepts(schema, '{"t":%s[1,\n%s2]}' % (" " * gap, "\t" * (gap - 1)), any_whitespace=True) == ok
    assert accepts(schema, json.dumps(doc)) and not accepts(schema, json.dumps(doc, indent=4))  # compact


def test_a_schema_xgrammar_refuses_is_named_without_its_internals() -> None:
    """NaN parses as Python's JSON but not as xgrammar's: the error names the field and says why, without
    xgrammar's assertion text or its copy of the whole schema (the request's own text, up to 64 KiB)."""
    from engine.structured import StructuredOutputsParams
    from engine.structured.params import StructuredOutputsError

    schema = json.dumps({"type": "object", "description": "x" * 500, "properties": {"a": {"type": "number"}}})
    with pytest.raises(StructuredOutputsError) as e:
        StructuredOutputsParams(json=schema.replace('"number"}', '"number", "maximum": NaN}'))
    assert e.value.param == "structured_outputs.json"
    assert "Failed to parse JSON" in str(e.value) and "Check failed" not in str(e.value)
    assert "x" * 100 not in str(e.value)
