"""A sample of n > 1 ended by a stop string ends there: the tokens the engine core generated for it
before its abort arrived (the next step is already running) are dropped, not appended to its text,
token ids, logprobs and usage. Found by hunting lifecycle defects in the live server: 16 of 38 such
samples ran on past their stop string ("...A theometer" for stop " the")."""
from __future__ import annotations

import httpx

from engine.core_messages import EngineCoreOutput
from engine.output_processor import OutputProcessor
from engine.sampling_params import RequestOutputKind, SamplingParams
from tests.server.conftest import MODEL, LiveServer


def test_late_tokens_of_a_stopped_sample_are_dropped(smollm2_path: str) -> None:
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_path, is_gguf=True)
    op = OutputProcessor(tok)
    op.add_request("r", "x", [1, 2], SamplingParams(max_tokens=50, n=2, stop=["Paris."],
                                                    output_kind=RequestOutputKind.DELTA), 0.0)
    stopped = tok.encode("It is Paris.", add_special_tokens=False)
    late = tok.encode(" Late words", add_special_tokens=False)
    first = op.process_outputs([EngineCoreOutput(request_id="r", index=0, new_token_ids=stopped),
                                EngineCoreOutput(request_id="r", index=1, new_token_ids=[late[0]])])
    assert first.samples_to_abort == [("r", 0)]
    # the core's next step ran before the abort arrived: sample 0 got one more token
    second = op.process_outputs([EngineCoreOutput(request_id="r", index=0, new_token_ids=late[:1]),
                                 EngineCoreOutput(request_id="r", index=1, new_token_ids=late[1:],
                                                  finish_reason="length")])
    outs = first.request_outputs + second.request_outputs
    text0 = "".join(o.outputs[0].text for o in outs)
    ids0 = [t for o in outs for t in o.outputs[0].token_ids]
    assert text0 == "It is " and ids0 == stopped
    assert outs[-1].finished and outs[-1].outputs[0].stop_reason == "Paris." and not op.requests


def test_stop_string_ends_each_of_n_samples(server: LiveServer) -> None:
    """include_stop_str_in_output: a sample that a stop string ended ends with that string."""
    ran_on, stopped = [], 0
    for seed in range(4):
        r = httpx.post(server.url("/v1/completions"), timeout=120, json={
            "model": MODEL, "prompt": "Write a poem about the sea:", "max_tokens": 40, "n": 4, "temperature": 1.0,
            "seed": seed, "stop": [" the", "."], "include_stop_str_in_output": True, "logprobs": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        for ch in body["choices"]:
            assert len(ch["logprobs"]["tokens"]) == len(ch["logprobs"]["token_logprobs"])
            if ch["finish_reason"] == "stop" and isinstance(ch["stop_reason"], str):
                stopped += 1
                if not ch["text"].endswith(ch["stop_reason"]):
                    ran_on.append(ch["text"][-30:])
        assert body["usage"]["completion_tokens"] == sum(len(ch["logprobs"]["tokens"]) for ch in body["choices"])
    assert stopped >= 4 and ran_on == []
