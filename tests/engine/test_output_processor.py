"""OutputProcessor from token deltas (no model): DELTA outputs add up to the CUMULATIVE ones,
FINAL_ONLY gives one, a stop string spanning tokens ends the sample and asks the core to abort
it, a stop token stays out of the text, and a core-side error fails the request alone."""
from __future__ import annotations

import pytest

from engine.core_messages import EngineCoreOutput, TokenLogprobs
from engine.errors import RequestError
from engine.output_processor import OutputProcessor
from engine.sampling_params import RequestOutputKind, SamplingParams

TEXT = "The capital of France is Paris. It is a city of light."


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: str):
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path, is_gguf=True)


def feed(op: OutputProcessor, rid: str, ids: list[int], finish_last: str | None = "length", logprobs: bool = False):
    """One core output per token, the last one finished; returns every step's RequestOutputs and aborts."""
    steps = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        lps = [TokenLogprobs([t, t, 0], [-0.25, -0.25, -3.0], 1)] if logprobs else None
        out = EngineCoreOutput(request_id=rid, new_token_ids=[t], new_logprobs=lps,
                               finish_reason=finish_last if last else None)
        steps.append(op.process_outputs([out]))
    return steps


def add(op: OutputProcessor, rid: str, **params) -> None:
    op.add_request(rid, "x", [1, 2], SamplingParams(max_tokens=100, **params), 0.0)


def test_delta_adds_up_to_cumulative(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    op = OutputProcessor(tokenizer)
    add(op, "d", output_kind=RequestOutputKind.DELTA, logprobs=1)
    add(op, "c", output_kind=RequestOutputKind.CUMULATIVE, logprobs=1)
    deltas = [s.request_outputs[0] for s in feed(op, "d", ids, logprobs=True)]
    cumulative = [s.request_outputs[0] for s in feed(op, "c", ids, logprobs=True)]
    assert all(len(o.outputs[0].token_ids) == 1 for o in deltas)  # only the new token, never the history
    assert "".join(o.outputs[0].text for o in deltas) == cumulative[-1].outputs[0].text == TEXT
    assert [t for o in deltas for t in o.outputs[0].token_ids] == cumulative[-1].outputs[0].token_ids == ids
    assert sum(len(o.outputs[0].logprobs) for o in deltas) == len(ids)
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"
    # CUMULATIVE hands out the growing list itself, not a copy per step
    assert cumulative[0].outputs[0].token_ids is cumulative[-1].outputs[0].token_ids
    assert not op.requests


def test_final_only(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    op = OutputProcessor(tokenizer)
    add(op, "f", output_kind=RequestOutputKind.FINAL_ONLY)
    outs = [o for s in feed(op, "f", ids) for o in s.request_outputs]
    assert len(outs) == 1 and outs[0].finished and outs[0].outputs[0].text == TEXT


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
def test_stop_string_aborts_and_holds_back(tokenizer, kind: RequestOutputKind) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    op = OutputProcessor(tokenizer)
    add(op, "s", stop=["Paris."], output_kind=kind)
    steps = feed(op, "s", ids, finish_last=None)
    stopped = [i for i, s in enumerate(steps) if s.samples_to_abort]
    assert len(stopped) == 1 and steps[stopped[0]].samples_to_abort == [("s", 0)]
    outs = [o for s in steps for o in s.request_outputs]
    text = "".join(o.outputs[0].text for o in outs) if kind == RequestOutputKind.DELTA else outs[-1].outputs[0].text
    assert text == "The capital of France is "
    assert all("Paris" not in o.outputs[0].text for o in outs)  # held back until decided
    assert outs[-1].finished and outs[-1].outputs[0].stop_reason == "Paris."
    assert not op.requests  # later tokens of the aborted sample are ignored


def test_stop_token_out_of_text_and_error(tokenizer) -> None:
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    op = OutputProcessor(tokenizer)
    add(op, "t")
    out = feed(op, "t", ids + [tokenizer.eos_token_id], finish_last="stop")[-1].request_outputs[0]
    assert out.outputs[0].text == "Hello world" and out.outputs[0].finish_reason == "stop"
    add(op, "e")
    failed = op.process_outputs([EngineCoreOutput(request_id="e", finish_reason="abort",
                                                  error=("max_tokens", "too long"))]).request_outputs[0]
    assert failed.finished and isinstance(failed.error, RequestError) and failed.error.param == "max_tokens"
    assert failed.outputs[0].finish_reason == "abort" and not op.requests


def test_stop_string_waits_past_min_tokens(tokenizer) -> None:
    """vLLM's rule: a stop string counts only once more than min_tokens tokens are out; one ending in token
    number min_tokens does not stop the sample."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    first = tokenizer.decode(ids[:2])  # the text of the first two tokens
    op = OutputProcessor(tokenizer)
    add(op, "m", stop=[first[-2:]], min_tokens=2)
    steps = feed(op, "m", ids[:4], finish_last=None)
    assert not any(s.samples_to_abort for s in steps)
    op2 = OutputProcessor(tokenizer)
    add(op2, "n", stop=[first[-2:]], min_tokens=1)
    assert any(s.samples_to_abort for s in feed(op2, "n", ids[:4], finish_last=None))
