"""SamplingParams: how one request is decoded (vLLM's names and defaults).

Every field is checked at construction for a type and range the sampler can represent, so a
request that builds can never make the engine raise; values past what float32 or the
vocabulary can hold are clamped where that keeps their meaning (see ModelRunner)."""
from __future__ import annotations

import copy
import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from engine.structured.params import StructuredOutputsError, StructuredOutputsParams


class SamplingParamsError(ValueError):
    """A bad sampling parameter; `param` names it (the server maps this to HTTP 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


MAX_STOP_STRINGS = 64
MAX_BAD_WORDS = 128  # bad_words strings; each may tokenize to two sequences (with and without a leading space)
MAX_LOGPROBS = 20
MAX_N_SEQUENCES = 16384  # vLLM's bound on n and best_of (VLLM_MAX_N_SEQUENCES' default)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is an int64


def _show(v: Any) -> str:
    """A short rendering of a bad value for an error message (a huge int has no repr)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**40:
        return f"an integer of {v.bit_length()} bits"
    text = repr(v[:60] if isinstance(v, (str, bytes, list, tuple)) else v)
    return text if len(text) <= 50 else text[:47] + "..."


def _int(param: str, v: Any) -> int:
    """v as a Python int (numpy integers included); bools and floats are refused."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise SamplingParamsError(param, f"must be an integer, got {_show(v)}")
    return int(v)


def _float(param: str, v: Any) -> float:
    """v as a finite Python float; bools, strings, inf and nan are refused."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise SamplingParamsError(param, f"must be a number, got {_show(v)}")
    try:
        f = float(v)
    except OverflowError:  # an int too large for a float
        f = math.inf
    if not math.isfinite(f):
        raise SamplingParamsError(param, f"must be a finite number, got {_show(v)}")
    return f


def _bool(param: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SamplingParamsError(param, f"must be true or false, got {_show(v)}")
    return v


MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    """One step of splitmix64: a bijection on 64-bit ints that mixes every input bit into every output bit."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A generator seed in [0, 2**63) from any ints (a request's int64 seed, sample index, position).

    Chained splitmix64, so nearby inputs (seed s at position p+1, seed s+1 at p) give unrelated
    seeds, and two distinct int64 seeds collide on one position with probability about 2**-63."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & MASK64))
    return h >> 1


class RequestOutputKind(enum.IntEnum):
    """What each RequestOutput of a request holds (vLLM's names)."""

    CUMULATIVE = 0  # everything generated so far (offline default)
    DELTA = 1  # only what is new since the previous output (the server streams these)
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1  # parallel samples from one prompt (they share the prompt's KV pages)
    best_of: int | None = None  # generate best_of samples, return the n with the highest cumulative logprob
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling, in (0, 1]
    top_k: int = 0  # 0 or -1: off; larger than the vocabulary: off
    min_p: float = 0.0  # drop tokens below min_p * p(top token)
    seed: int | None = None  # any int64; per-request generator: same seed, same text, whatever the batch
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI's, over generated tokens
    repetition_penalty: float = 1.0  # HF's, over prompt and generated tokens
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0  # EOS and stop tokens are masked until this many are generated
    stop: list[str] = field(default_factory=list)  # stop strings, removed from the output
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end the request (kept out of text)
    ignore_eos: bool = False  # keep going past EOS
    logprobs: int | None = None  # top-k logprobs at each sampled position (plus the sampled token)
    prompt_logprobs: int | None = None  # top-k logprobs at each prompt position (plus the prompt's token)
    skip_special_tokens: bool = True  # leave special tokens out of the text
    # vLLM's: spaces between special tokens in the text; only slow tokenizers read it (vLLM's fast
    # detokenizer, like the fast tokenizers this engine loads, ignores it)
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # keep the matched stop string
    detokenize: bool = True  # False: token ids only, no text (saves CPU in offline benchmarks)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # what each RequestOutput holds
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (engine/structured/)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len); offline LLM
    logit_bias: dict[int, float] | None = None  # token id -> added to its raw logit (before penalties, temperature)
    allowed_token_ids: list[int] | None = None  # only these may be sampled (every other token masked)
    bad_words: list[str] = field(default_factory=list)  # never generated: a word's last token masked after its prefix
    extra_args: dict[str, Any] | None = None  # vLLM's: free-form arguments for custom code; the engine ignores them
    # bad_words tokenized by the front end (update_from_tokenizer), as vLLM's; None until then
    _bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self._normalize_types()
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _normalize_types(self) -> None:
        """Each field to its plain Python type, or a SamplingParamsError naming it."""
        self.n = _int("n", self.n)
        self.top_k = _int("top_k", self.top_k)
        self.min_tokens = _int("min_tokens", self.min_tokens)
        for name in ("best_of", "max_tokens", "logprobs", "prompt_logprobs", "seed", "truncate_prompt_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, _int(name, getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            setattr(self, name, _float(name, getattr(self, name)))
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
                     "detokenize"):
            setattr(self, name, _bool(name, getattr(self, name)))
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not isinstance(stop, (list, tuple)):
            raise SamplingParamsError("stop", f"must be a string or a list of strings, got {_show(stop)}")
        self.stop = list(stop or [])
        ids = self.stop_token_ids
        if ids is not None and not isinstance(ids, (list, tuple)):
            raise SamplingParamsError("stop_token_ids", f"must be a list of token ids, got {_show(ids)}")
        self.stop_token_ids = [_int("stop_token_ids", t) for t in ids or []]
        extra = self.extra_args
        if extra is not None and (not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra)):
            raise SamplingParamsError("extra_args", f"must be a dict with string keys, got {_show(extra)}")
        kind = _int("output_kind", self.output_kind)
        if kind not in {k.value for k in RequestOutputKind}:
            raise SamplingParamsError("output_kind", f"must be one of {[k.name for k in RequestOutputKind]}, got {kind}")
        self.output_kind = RequestOutputKind(kind)
        self._normalize_logits_processor_types()
        so = self.structured_outputs
        try:
            if isinstance(so, dict):
                so = self.structured_outputs = StructuredOutputsParams.from_dict(so)
        except StructuredOutputsError as e:
            raise SamplingParamsError(e.param, e.message) from None
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise SamplingParamsError("structured_outputs", f"must be StructuredOutputsParams, got {_show(so)}")

    def _normalize_logits_processor_types(self) -> None:
        """logit_bias, allowed_token_ids and bad_words to plain types (string keys of logit_bias to ints, as vLLM)."""
        bias = self.logit_bias
        if bias is not None and not isinstance(bias, dict):
            raise SamplingParamsError("logit_bias", f"must be a dict of token id -> bias, got {_show(bias)}")
        converted: dict[int, float] = {}
        for key, value in (bias or {}).items():
            try:
                token_id = _int("logit_bias", int(key) if isinstance(key, str) else key)
            except ValueError:
                raise SamplingParamsError("logit_bias", f"keys must be token ids, got {_show(key)}") from None
            converted[token_id] = _float("logit_bias", value)
        self.logit_bias = converted or None
        allowed = self.allowed_token_ids
        if allowed is not None:
            if not isinstance(allowed, (list, tuple)):
                raise SamplingParamsError("allowed_token_ids", f"must be a list of token ids, got {_show(allowed)}")
            self.allowed_token_ids = list(dict.fromkeys(_int("allowed_token_ids", t) for t in allowed))
        words = self.bad_words
        if words is not None and (not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words)):
            raise SamplingParamsError("bad_words", f"must be a list of strings, got {_show(words)}")
        self.bad_words = list(dict.fromkeys(words or []))  # duplicates dropped, as vLLM
        ids = self._bad_words_token_ids
        if ids is not None:
            self._bad_words_token_ids = [[_int("bad_words", t) for t in word] for word in ids]

    def _validate(self) -> None:
        def bad(param: str, message: str) -> SamplingParamsError:
            return SamplingParamsError(param, message)

        if not 1 <= self.n <= MAX_N_SEQUENCES:
            raise bad("n", f"must be in [1, {MAX_N_SEQUENCES}], got {_show(self.n)}")
        if self.best_of is not None and self.best_of > MAX_N_SEQUENCES:
            raise bad("best_of", f"must be at most {MAX_N_SEQUENCES}, got {_show(self.best_of)}")
        if self.best_of is not None and self.best_of < self.n:
            raise bad("best_of", f"must be >= n ({self.n}), got {_show(self.best_of)}")
        if self.temperature < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad("top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be >= 1, got {_show(self.max_tokens)}")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be >= 0, got {_show(self.min_tokens)}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {_show(self.min_tokens)}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        if self.stop and not self.detokenize:
            raise bad("stop", "stop strings need detokenize=True")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "token ids must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {_show(self.logprobs)}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise bad("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {_show(self.prompt_logprobs)}")
        if self.logit_bias is not None and any(t < 0 for t in self.logit_bias):
            raise bad("logit_bias", "token ids must be >= 0")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise bad("allowed_token_ids", "must not be empty (no token could be sampled)")
        if self.allowed_token_ids is not None and any(t < 0 for t in self.allowed_token_ids):
            raise bad("allowed_token_ids", "token ids must be >= 0")
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise bad("bad_words", f"at most {MAX_BAD_WORDS} bad words, got {len(self.bad_words)}")
        if any(not w.strip() for w in self.bad_words):
            raise bad("bad_words", "bad words must be non-empty strings")
        truncate = self.truncate_prompt_tokens
        if truncate is not None and not (truncate == -1 or truncate >= 1):
            raise bad("truncate_prompt_tokens", f"must be -1 (max_model_len) or >= 1, got {_show(truncate)}")
        if self.seed is not None and not INT64_MIN <= self.seed <= INT64_MAX:
            raise bad("seed", f"must be a 64-bit integer in [-2**63, 2**63 - 1], got {_show(self.seed)}")

    def update_from_tokenizer(self, tokenizer: Any) -> None:
        """vLLM's: tokenize bad_words, each both as given and after a space (a word at the start of the text
        and one inside it are different tokens); the spaced form is kept when it tokenizes differently."""
        if not self.bad_words:
            return
        token_ids: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            if not plain:
                raise SamplingParamsError("bad_words", f"{_show(word)} tokenizes to no token")
            token_ids.append(plain)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                token_ids.append(spaced)
        self._bad_words_token_ids = token_ids

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """bad_words as token ids, once the front end tokenized them (update_from_tokenizer)."""
        return self._bad_words_token_ids

    def clone(self) -> SamplingParams:
        """vLLM's: a deep copy (its lists and structured_outputs not shared)."""
        return copy.deepcopy(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Penalties need every earlier token on the host when sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_past_tokens(self) -> bool:
        """Sampling reads this request's earlier tokens on the host (penalties; a bad word of several tokens,
        masked after its prefix): with async scheduling it waits for its last token, never a placeholder."""
        words = self._bad_words_token_ids  # read for every running sequence of an async step: has_penalties inlined
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or (words is not None and any(len(word) > 1 for word in words)))
