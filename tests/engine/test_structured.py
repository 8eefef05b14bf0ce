"""Structured outputs offline (issue 16) on the embedded SmolLM2: samples at temperature 1.0 for each
of five JSON schemas validate with jsonschema; regex and choice outputs always match; the same with
n=4 under async scheduling; an unconstrained greedy request in a constrained batch is unchanged.

The issue's acceptance is 100 samples per schema, and the suite runs 100 (90 s on the 2-core machine since the
grammar's vocabulary is the tokenizer's and the bitmask rows are reused; it took 25 minutes before);
GANTRY_STRUCTURED_SAMPLES=N runs another count."""
from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.sampling_params import SamplingParamsError
from engine.structured import StructuredOutputsParams
from engine.structured.json_schema import MAX_WHITESPACE

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                  "id": {"type": "integer", "minimum": 0, "maximum": 9999}},
                 "required": ["name", "id"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"type": "string", "enum": ["S", "M", "L"]}},
             "required": ["color", "size"]},
    "bounds": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                "score": {"type": "number", "minimum": -1, "maximum": 1}},
               "required": ["age", "score"]},
    "required": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 16},
                                                  "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                                  "note": {"type": "string", "maxLength": 6}},
                 "required": ["title", "year"]},
}
# Each schema's longest document in bytes: every string at its maxLength of 6-byte escapes ("\u00e9"), the
# widest numbers, and the separators compact JSON uses (", " and ": ", as json.dumps). A token is at least one
# byte, so a sample of a schema ends by its length plus one token (the end of sequence) or the grammar is wrong;
# a smaller max_tokens let a sample of 16 Korean characters run out in CI.
LONGEST = {
    "nested": {"user": {"name": "\u00e9" * 12, "id": 9999}, "active": False},
    "array": {"tags": ["\u00e9" * 8] * 3},
    "enum": {"color": "green", "size": "S"},
    "bounds": {"age": 120, "score": -0.123456},
    "required": {"title": "\u00e9" * 16, "year": 2100, "note": "\u00e9" * 6},
}
JSON_TOKENS = {name: len(json.dumps(doc).encode()) + 1 for name, doc in LONGEST.items()}
# with any whitespace the separators are "," and ":" and each of the 8 gaps between its JSON tokens
# ({ "age" : 120 , "score" : -0.1 }) takes up to MAX_WHITESPACE characters
SPACED_BOUNDS_TOKENS = len(json.dumps(LONGEST["bounds"], separators=(",", ":"))) + 8 * MAX_WHITESPACE + 1
REGEX = r"(yes|no), [0-9]{1,3}(\.[0-9])?"
CHOICES = ["positive", "negative", "neutral"]
REGEX_TOKENS, CHOICE_TOKENS = len("yes, 123.4") + 1, max(map(len, CHOICES)) + 1  # ASCII: a byte a character
PROMPT = "Describe something as JSON."
SAMPLES_PER_SCHEMA = int(os.environ.get("GANTRY_STRUCTURED_SAMPLES", "100"))


def constrained(max_tokens: int = 64, n: int = 1, **spec) -> SamplingParams:
    """Compact JSON unless asked otherwise: fewer tokens on a slow CPU (whitespace is tested in the n=4 test)."""
    spec.setdefault("disable_any_whitespace", "json" in spec)
    return SamplingParams(temperature=1.0, max_tokens=max_tokens, n=n,
                          structured_outputs=StructuredOutputsParams(**spec))


def test_longest_documents_fit_their_schemas() -> None:
    """The documents the token bounds come from are valid, and their strings are at maxLength."""
    for name, doc in LONGEST.items():
        jsonschema.validate(doc, SCHEMAS[name])
    assert LONGEST["required"]["title"] == "\u00e9" * SCHEMAS["required"]["properties"]["title"]["maxLength"]
    assert json.dumps(LONGEST["required"]).count("\\u00e9") == 22


def check_batch(outputs: list, specs: list[tuple[str, object]]) -> None:
    """Every sample of every output satisfies its request's constraint and ended on its own."""
    for out, (kind, spec) in zip(outputs, specs, strict=True):
        for sample in out.outputs:
            assert sample.finish_reason == "stop", (kind, sample.text)
            if kind == "json":
                jsonschema.validate(json.loads(sample.text), spec)
            elif kind == "regex":
                assert re.fullmatch(spec, sample.text), sample.text
            else:
                assert sample.text in spec


@pytest.fixture(scope="module")
def llm() -> LLM:
    llm = LLM(dtype="float32", async_scheduling=False)
    yield llm
    llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def async_llm() -> LLM:
    llm = LLM(dtype="float32", async_scheduling=True)
    assert llm.llm_engine.engine_core.use_batch_queue
    yield llm
    llm.llm_engine.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(max(600, 6 * SAMPLES_PER_SCHEMA))  # a loaded 2-core machine
def test_samples_per_schema_all_valid(llm: LLM) -> None:
    """SAMPLES_PER_SCHEMA JSON samples per schema, and regex and choice samples, in one batch."""
    prompts, params, specs = [], [], []
    k = SAMPLES_PER_SCHEMA
    for name, schema in SCHEMAS.items():
        prompts += [PROMPT] * k
        params += [constrained(json=schema, max_tokens=JSON_TOKENS[name])] * k
        specs += [("json", schema)] * k
    prompts += ["Answer yes or no, then a number."] * k + ["Is this review good?"] * k
    params += ([constrained(regex=REGEX, max_tokens=REGEX_TOKENS)] * k
               + [constrained(choice=CHOICES, max_tokens=CHOICE_TOKENS)] * k)
    specs += [("regex", REGEX)] * k + [("choice", CHOICES)] * k
    check_batch(llm.generate(prompts, params, use_tqdm=False), specs)
    assert not llm.llm_engine.engine_core.structured_output_manager.samples  # freed on finish


@pytest.mark.slow
@pytest.mark.parametrize("which", ["llm", "async_llm"])
def test_n4_and_unconstrained_neighbour_unchanged(which: str, request: pytest.FixtureRequest) -> None:
    """n=4 (one matcher per sample) with async scheduling off and on; a greedy unconstrained request
    batched with constrained ones gives the tokens it gives alone."""
    llm: LLM = request.getfixturevalue(which)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["The capital of France is"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    prompts = ["The capital of France is"] + [PROMPT] * len(SCHEMAS) + ["Answer yes or no.", "Good or bad?"]
    tokens = {**JSON_TOKENS, "bounds": SPACED_BOUNDS_TOKENS}  # "bounds" with any whitespace
    params = ([greedy] + [constrained(json=s, n=4, max_tokens=tokens[k], disable_any_whitespace=k != "bounds")
                          for k, s in SCHEMAS.items()]
              + [constrained(regex=REGEX, n=4, max_tokens=REGEX_TOKENS),
                 constrained(choice=CHOICES, n=4, max_tokens=CHOICE_TOKENS)])
    specs = [("json", s) for s in SCHEMAS.values()] + [("regex", REGEX), ("choice", CHOICES)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == alone
    assert all(len(o.outputs) == 4 for o in outputs[1:])
    check_batch(outputs[1:], specs)


def test_greedy_json_object_and_abort_frees_matchers(llm: LLM) -> None:
    """json_object gives a JSON object; an aborted constrained request leaves no matcher behind."""
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=64,
                                                structured_outputs={"json_object": True}), use_tqdm=False)[0]
    assert isinstance(json.loads(out.outputs[0].text), dict)
    engine = llm.llm_engine
    engine.add_request("to-abort", PROMPT, constrained(json=SCHEMAS["nested"], n=2))
    manager = engine.engine_core.structured_output_manager
    for _ in range(100):  # its grammar compiles on the manager's worker; a step collects it
        engine.step()
        if "to-abort" in manager.samples:
            break
    assert "to-abort" in manager.samples
    engine.abort_request(["to-abort"])
    engine.step()
    assert not manager.samples and not manager.compiling


@pytest.mark.parametrize("spec,param", [
    ({"json": {"type": "nope"}}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"regex": "(unclosed"}, "structured_outputs.regex"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"regex": "a", "choice": ["b"]}, "structured_outputs"),
    ({}, "structured_outputs"),
    ({"jsn": {}}, "structured_outputs.jsn"),
])
def test_bad_constraint_names_the_field(spec: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(structured_outputs=spec)
    assert info.value.param == param


@pytest.mark.parametrize("spec,min_tokens,max_tokens,param", [
    ({"regex": "a"}, 5, 10, "min_tokens"),  # the stop token is the only one left after "a", and min_tokens bans it
    ({"regex": "a"}, 2, 2, "min_tokens"),  # the same, the refused token also the last one max_tokens allows
    ({"regex": r"[^\x00-\U0010FFFF]"}, 0, 10, "structured_outputs"),  # matches no string
])
def test_a_constraint_that_cannot_be_met_fails_naming_the_field(llm: LLM, spec: dict, min_tokens: int,
                                                               max_tokens: int, param: str) -> None:
    """Such a sample used to go on unconstrained and come back as if it had matched (found by fuzzing the API);
    it fails alone, naming the field, and the engine goes on."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=min_tokens, structured_outputs=spec)
    good_params = constrained(regex=REGEX, max_tokens=REGEX_TOKENS)
    bad, good = llm.generate([PROMPT, PROMPT], [params, good_params], use_tqdm=False)
    assert bad.error is not None and bad.error.param == param, bad
    assert re.fullmatch(REGEX, good.outputs[0].text) and good.error is None
    assert not llm.llm_engine.engine_core.structured_output_manager.samples
