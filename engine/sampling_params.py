"""SamplingParams: how one request is decoded (vLLM's names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """A bad sampling parameter; `param` names it (the server maps this to HTTP 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


MAX_STOP_STRINGS = 64
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1  # parallel samples from one prompt (they share the prompt's KV pages)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling, in (0, 1]
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # drop tokens below min_p * p(top token)
    seed: int | None = None  # per-request generator: same seed, same text, whatever the batch
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
    include_stop_str_in_output: bool = False  # keep the matched stop string
    detokenize: bool = True  # False: token ids only, no text (saves CPU in offline benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, message: str) -> SamplingParamsError:
            return SamplingParamsError(param, message)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", f"must be an integer >= 1, got {self.n!r}")
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
            raise bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        if self.stop and not self.detokenize:
            raise bad("stop", "stop strings need detokenize=True")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise bad("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Penalties need every earlier token on the host when sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
