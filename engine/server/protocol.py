"""OpenAI request validation: the rules and field readers that turn JSON bodies into typed requests carrying
SamplingParams (completions: protocol_completion.py; chat and /tokenize: protocol_chat.py).

Every rejection is an APIError naming the offending field, so a bad request gets a 4xx
before it reaches the engine: integers must fit in int64, text must be valid Unicode and no
longer than the model could take (ModelContext.max_text_chars). Unknown fields are ignored,
as OpenAI's API does.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.sampling_defaults import with_defaults
from engine.sampling_params import MAX_BAD_WORDS, SamplingParams, SamplingParamsError
from engine.valid_text import unicode_problem

if TYPE_CHECKING:
    from engine.beam_search import BeamSearchParams

MAX_N = 128  # parallel samples per prompt
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions API
MAX_LOGIT_BIAS = 100.0  # OpenAI's: a bias is in [-100, 100]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's integer fields are int64
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Objects and lists inside one another in a body: a schema or tool-call history nested deeper cannot be
# pickled to a text worker or the engine core (Python's recursion limit; ~800 levels failed with a 500)
MAX_JSON_DEPTH = 128


class APIError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self) -> tuple:
        """Picklable, so that it crosses back from a text worker process intact."""
        return (APIError, (self.status, self.message, self.param, self.type, self.code, self.headers))


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def show(v: Any) -> str:
    """A short rendering of a client's value for an error message: bounded in length and
    in work, whatever the value (a 7 MB string, a list nested 900 deep, a 4,000-digit int)."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, int):
        return str(v) if abs(v) < 10**40 else f"an integer of {v.bit_length()} bits"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        text = json.dumps(v[:48], ensure_ascii=False)
        return text if len(v) <= 48 else f"{text[:-1]}...\" ({len(v)} characters)"
    if isinstance(v, list):
        return f"a list of {len(v)} items"
    if isinstance(v, dict):
        return f"an object with {len(v)} keys"
    return type(v).__name__


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise APIError(400, "request body is empty; expected a JSON object", param="body")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"body: not valid JSON: {e}", param="body") from None
    except RecursionError:
        raise APIError(400, "body: JSON nested too deeply", param="body") from None
    except ValueError as e:  # an integer literal longer than Python converts (4,300 digits)
        raise APIError(400, f"body: not acceptable JSON: {str(e).split(':')[0]}", param="body") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", param="body")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:  # else it cannot nest deeper (and the walk is skipped)
        check_depth(data, "body")
    return data


def check_depth(value: Any, name: str) -> None:
    """APIError unless value nests at most MAX_JSON_DEPTH objects and lists (a walk over its containers only)."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(MAX_JSON_DEPTH):
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, (dict, list))]
        if not level:
            return
    raise APIError(400, f"{name}: JSON nested deeper than {MAX_JSON_DEPTH} levels", param=name)


# --- typed field readers: None when absent or null, else the value or an APIError ---

def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"must be an integer, got {show(v)}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise bad(name, f"must be a 64-bit integer, got {show(v)}")
    if lo is not None and v < lo:
        raise bad(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise bad(name, f"must be <= {hi}, got {v}")
    return v


def _float(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    try:
        f = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an int beyond any float
        f = math.inf
    if not math.isfinite(f):
        raise bad(name, f"must be a finite number, got {show(v)}")
    return f


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad(name, f"must be a boolean, got {show(v)}")
    return v


def _str(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad(name, f"must be a string, got {show(v)}")
    return v


def check_text(text: str, name: str, ctx: ModelContext) -> str:
    """Text bound for the tokenizer: valid Unicode (no lone surrogate, which JSON's \\ud800 escapes
    can carry) and no longer than any text the model could take."""
    if ctx.max_text_chars is not None and len(text) > ctx.max_text_chars:
        raise bad(name, f"{len(text)} characters cannot fit in max_model_len ({ctx.max_model_len} tokens of at "
                        f"most {ctx.max_text_chars // ctx.max_model_len} characters each)")
    if (problem := unicode_problem(text)) is not None:
        raise bad(name, problem)
    return text


def _token_ids(v: Any, name: str, vocab_size: int, max_len: int | None = None) -> list[int]:
    if not isinstance(v, list):
        raise bad(name, "must be a list of integer token ids")
    if max_len is not None and len(v) > max_len:
        raise bad(name, f"at most {max_len} token ids, got {len(v)}")
    if any(isinstance(t, bool) or not isinstance(t, int) for t in v):
        raise bad(name, "must be a list of integer token ids")
    for t in v:
        if not 0 <= t < vocab_size:
            raise bad(name, f"token id {show(t)} is outside the vocabulary [0, {vocab_size})")
    return v


@dataclass
class ModelContext:
    """What validation needs to know about the served model."""

    served_model_name: str
    max_model_len: int
    vocab_size: int
    # Longest text field accepted: max_model_len x the longest token in characters, so text
    # beyond it cannot fit and is refused before any tokenizing. None: unbounded.
    max_text_chars: int | None = None
    max_num_seqs: int | None = None  # sequences the engine runs at once: a wider beam search is refused
    lora_enabled: bool = False  # `model` may name an adapter: the API process checks it (engine/server/lora_routes.py)
    enable_auto_tool_choice: bool = False  # ServerConfig's: tool_choice "auto" allowed (engine/server/tools.py)
    tool_call_parser: str | None = None  # ServerConfig's
    reasoning_parser: str | None = None  # ServerConfig's: a chat constraint starts after the reasoning
    # the generation config's defaults of fields a request leaves unset (temperature, top_p...; not max_tokens)
    default_sampling: dict[str, Any] = field(default_factory=dict)


def check_model(body: dict, ctx: ModelContext) -> None:
    """404 naming `model` unless it is the served name; absent, null or "" mean the served model (as vLLM)."""
    model = _str(body, "model")
    if model and model != ctx.served_model_name and not ctx.lora_enabled:
        raise APIError(404, f"model: the model {show(model)} does not exist; this server serves "
                            f"`{ctx.served_model_name}`", param="model", code="model_not_found")


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous usage) from stream_options (only valid with stream=true); vLLM's
    continuous_usage_stats puts the usage so far in every chunk, when include_usage is true too."""
    opts = body.get("stream_options")
    if opts is None:
        return False, False
    if not stream:
        raise bad("stream_options", "only allowed when stream is true")
    if not isinstance(opts, dict):
        raise bad("stream_options", "must be an object")
    for key in ("include_usage", "continuous_usage_stats"):
        if opts.get(key) is not None and not isinstance(opts[key], bool):
            raise bad(f"stream_options.{key}", f"must be a boolean, got {show(opts[key])}")
    usage = bool(opts.get("include_usage"))
    return usage, usage and bool(opts.get("continuous_usage_stats"))


def _stop(body: dict, ctx: ModelContext) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or any(not isinstance(s, str) for s in stop):
        raise bad("stop", "must be a string or a list of strings")
    for s in stop:
        check_text(s, "stop", ctx)  # a longer one could never match; the engine scans for each every step
    return stop


def _logit_bias(body: dict, ctx: ModelContext) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad("logit_bias", f"must be an object mapping token ids to biases, got {show(bias)}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token_id = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 20 else -1
        if not 0 <= token_id < ctx.vocab_size:
            raise bad("logit_bias", f"key {show(key)} is not a token id in the vocabulary [0, {ctx.vocab_size})")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"the bias of token {token_id} must be a number in [-100, 100], got {show(value)}")
        out[token_id] = float(value)
    return out or None


def _bad_words(body: dict, ctx: ModelContext) -> list[str] | None:
    """vLLM's bad_words: strings never generated (tokenized by the front end's InputProcessor)."""
    words = body.get("bad_words")
    if words is None:
        return None
    if not isinstance(words, list) or any(not isinstance(w, str) for w in words):
        raise bad("bad_words", "must be a list of strings")
    if len(words) > MAX_BAD_WORDS:
        raise bad("bad_words", f"at most {MAX_BAD_WORDS} bad words, got {len(words)}")
    for w in words:
        check_text(w, "bad_words", ctx)
    return words


def sampling_params(body: dict, ctx: ModelContext, max_tokens: int | None, logprobs: int | None,
                    max_tokens_param: str = "max_tokens") -> SamplingParams:
    """Every sampling field both APIs share; max_tokens None means up to the context left
    (max_tokens_param: the field that gave it)."""
    _str(body, "user")  # not acted on, but a string (as OpenAI's and vLLM's schemas require)
    from engine.server.protocol_structured import structured_outputs_params  # it imports this module
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None:
        _token_ids(stop_token_ids, "stop_token_ids", ctx.vocab_size, ctx.vocab_size)
    allowed_token_ids = body.get("allowed_token_ids")
    if allowed_token_ids is not None:
        _token_ids(allowed_token_ids, "allowed_token_ids", ctx.vocab_size, ctx.vocab_size)
    if _bool(body, "use_beam_search"):  # its greedy steps rank the model's own logprobs (engine/server/beam.py)
        for name in ("allowed_token_ids", "bad_words", "prompt_logprobs"):
            if body.get(name) not in (None, []):
                raise bad(name, "not supported with use_beam_search")
    if body.get("prompt_logprobs") is not None and body.get("stream") is True:  # as vLLM: they come whole
        raise bad("prompt_logprobs", "not available when stream is true")
    if max_tokens is not None and max_tokens > ctx.max_model_len:
        raise bad(max_tokens_param, f"must be <= max_model_len ({ctx.max_model_len}), got {max_tokens}")
    kwargs: dict[str, Any] = {
        "n": _int(body, "n", 1, MAX_N),
        # with use_beam_search, best_of is the beam width (beam_search_params)
        "best_of": None if _bool(body, "use_beam_search") else _int(body, "best_of", 1, MAX_N),
        "temperature": _float(body, "temperature"),
        "top_p": _float(body, "top_p"),
        "top_k": _int(body, "top_k"),
        "min_p": _float(body, "min_p"),
        "seed": _int(body, "seed"),
        "presence_penalty": _float(body, "presence_penalty"),
        "frequency_penalty": _float(body, "frequency_penalty"),
        "repetition_penalty": _float(body, "repetition_penalty"),
        "min_tokens": _int(body, "min_tokens"),
        "prompt_logprobs": _int(body, "prompt_logprobs"),  # vLLM's: top-k at each prompt position
        "stop_token_ids": stop_token_ids,
        "logit_bias": _logit_bias(body, ctx),
        "allowed_token_ids": allowed_token_ids,  # an empty list is refused by SamplingParams
        "bad_words": _bad_words(body, ctx),
        "ignore_eos": _bool(body, "ignore_eos"),
        "skip_special_tokens": _bool(body, "skip_special_tokens"),
        "spaces_between_special_tokens": _bool(body, "spaces_between_special_tokens"),
        "include_stop_str_in_output": _bool(body, "include_stop_str_in_output"),
        "structured_outputs": structured_outputs_params(body),  # response_format / structured_outputs
    }
    if _int(body, "priority") not in (None, 0):  # vLLM answers the same without --scheduling-policy priority
        raise bad("priority", "priority scheduling is not enabled: requests run first come, first served (priority 0)")
    if not _bool(body, "use_beam_search"):  # vLLM's: the model's defaults where the request set nothing
        kwargs = with_defaults(kwargs, ctx.default_sampling)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, stop=_stop(body, ctx), **kwargs)
    except SamplingParamsError as e:
        raise bad(e.param, str(e).split(": ", 1)[-1]) from None


def beam_search_params(body: dict, ctx: ModelContext, params: SamplingParams, stream: bool,
                       logprobs_field: str | None) -> BeamSearchParams | None:
    """use_beam_search and its fields (engine/server/beam.py reads them with this module's readers)."""
    from engine.server.beam import parse_beam_search

    return parse_beam_search(body, ctx, params, stream, logprobs_field)


# vLLM request fields this server does not act on: a 400 naming each, never a 200 that ignored it
VLLM_UNSUPPORTED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                    "guided_whitespace_pattern")


def prompt_truncation(body: dict, ctx: ModelContext) -> int | None:
    """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: max_model_len); None: keep them all."""
    k = _int(body, "truncate_prompt_tokens", -1, ctx.max_model_len)
    if k == 0:
        raise bad("truncate_prompt_tokens", "must be -1 (max_model_len) or at least 1, got 0")
    return ctx.max_model_len if k == -1 else k


def _unsupported(body: dict, *names: str) -> None:
    for name in names:
        if body.get(name) not in (None, [], {}, False):
            raise bad(name, "is not supported by this server")
