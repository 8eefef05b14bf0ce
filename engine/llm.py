"""Offline API with vLLM's names: LLM(...).generate(prompts, sampling_params) and .chat(...).

A prompt is vLLM's: a string, {"prompt": str} (TextPrompt), {"prompt_token_ids": [...]}
(TokensPrompt), or a list of token ids; generate() takes one or a list of them.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import threading
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm import tqdm

from engine.beam_search import (
    BeamSearchOutput,
    BeamSearchParams,
    beam_search_offline,
    best_of_params,
    keep_best_of,
)
from engine.config import EngineConfig
from engine.errors import RequestError
from engine.llm_engine import LLMEngine
from engine.lora.request import LoRARequest
from engine.sampling_defaults import log_sampling_defaults
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.vllm_args import VLLM_ARGS, log_warnings, resolve_vllm_args

Prompt = str | list[int]  # what the engine takes
PromptType = str | list[int] | dict[str, Any]  # what generate() takes (vLLM's PromptType, text only)
PROMPT_KEYS = ("prompt", "prompt_token_ids")
Conversation = list[dict[str, Any]]


def _show_engine_logs() -> None:
    """Offline users see the engine's info lines (model loaded, KV pool size) as vLLM users do,
    unless the application configured logging itself."""
    logger = logging.getLogger("gantry")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class LLM:
    """LLM(model=None) serves the embedded SmolLM2-135M-Instruct; keyword arguments are
    EngineConfig fields (dtype, max_model_len, block_size, gpu_memory_utilization, ...) and the vLLM
    arguments of engine/vllm_args.py (num_gpu_blocks_override, swap_space, seed=None, ...)."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        known = {f.name for f in dataclasses.fields(EngineConfig)} | set(VLLM_ARGS)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown argument {unknown[0]!r}; known: {', '.join(sorted(known))}")
        _show_engine_logs()
        kwargs, warnings = resolve_vllm_args(kwargs)
        config = EngineConfig(model=model, **kwargs)
        log_warnings(warnings)
        self.llm_engine = LLMEngine(config)
        self.llm_engine.stream_outputs = False  # generate() returns finished requests only
        model_config = self.llm_engine.model_config
        log_sampling_defaults(model_config.default_sampling_params, model_config.generation_config_source)
        self._counter = itertools.count()
        # one call at a time: a call's step loop keeps its own requests' outputs only, so two calls
        # stepping at once (threads) would each drop the other's and both wait forever
        self._lock = threading.Lock()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams() with the generation config's defaults (temperature, top_p, top_k, min_p,
        repetition_penalty; max_new_tokens as max_tokens); what generate() and chat() use for None."""
        return SamplingParams(**self.llm_engine.model_config.default_sampling_params)

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
        *,
        priority: SequenceABC[int] | None = None,
    ) -> list[RequestOutput]:
        """prompts: one prompt or a list (see the module docstring); sampling_params: one for all,
        one per prompt, or None for get_default_sampling_params(); lora_request: an adapter for
        all, one (or None: the base model) per prompt, or None. priority: vLLM's, one per prompt; requests
        run first come, first served (vLLM's default policy), where every priority must be 0."""
        parsed = _parse_prompts(prompts)
        _check_priority(priority, len(parsed))
        return self._run(parsed, sampling_params, use_tqdm, lora_request, "prompts")

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """vLLM's positional order (messages, sampling_params, use_tqdm, lora_request); the rest by keyword.
        messages: one conversation or a list of them; lora_request as generate()'s. chat_template: a Jinja
        string instead of the tokenizer's; continue_final_message: leave the last (assistant) message open,
        with add_generation_prompt=False; tools: OpenAI tool dicts, the template's `tools`;
        chat_template_kwargs: more template variables (e.g. {"enable_thinking": False})."""
        if not isinstance(messages, list):
            raise RequestError("messages", f"must be a list of messages or of conversations, got {type(messages).__name__}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = []
        for i, conversation in enumerate(conversations):
            try:
                prompts.append(self.llm_engine.apply_chat_template(
                    conversation, add_generation_prompt, continue_final_message=continue_final_message, tools=tools,
                    chat_template=chat_template, chat_template_kwargs=chat_template_kwargs))
            except RequestError as e:  # an option's own error (tools, chat_template...) is the same for all
                if e.param.startswith("messages"):
                    _name_entry(e, "messages", i, len(conversations))
                raise
        return self._run(prompts, sampling_params, use_tqdm, lora_request, "messages")

    def beam_search(self, prompts: PromptType | SequenceABC[PromptType],
                    params: BeamSearchParams | SequenceABC[BeamSearchParams],
                    lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
                    use_tqdm: bool = True) -> list[BeamSearchOutput]:
        """vLLM's: one BeamSearchOutput per prompt, its beam_width sequences best first (transformers'
        beam search semantics; see engine/beam_search.py). params: one for all, or one per prompt.
        lora_request: in vLLM's place, but beams run on the base model, so an adapter is refused (as the
        server's use_beam_search refuses one) rather than ignored."""
        loras = [lora_request] if not isinstance(lora_request, SequenceABC) else list(lora_request)
        if any(lora is not None for lora in loras):
            raise RequestError("lora_request", "not supported with beam search (the beams run on the base model)")
        if not isinstance(params, BeamSearchParams) and not (
                isinstance(params, SequenceABC) and all(isinstance(p, BeamSearchParams) for p in params)):
            raise RequestError("params", f"must be a BeamSearchParams or a list of them, got {type(params).__name__}")
        engine = self.llm_engine
        token_ids = [engine.encode(p) if isinstance(p, str) else p for p in _parse_prompts(prompts)]
        request_ids = (f"beam-{next(self._counter)}" for _ in itertools.count())
        # checked again, as generate()'s SamplingParams: fields set after construction
        per_prompt = dataclasses.replace(params) if isinstance(params, BeamSearchParams) else [
            dataclasses.replace(p) for p in params]
        with self._lock:
            return beam_search_offline(engine, token_ids, per_prompt, request_ids, use_tqdm)

    def _run(
        self, prompts: list[Prompt], sampling_params: SamplingParams | SequenceABC[SamplingParams] | None, use_tqdm: bool,
        lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None, where: str,
    ) -> list[RequestOutput]:
        with self._lock:
            return self._run_locked(prompts, sampling_params, use_tqdm, lora_request, where)

    def _run_locked(
        self, prompts: list[Prompt], sampling_params: SamplingParams | SequenceABC[SamplingParams] | None, use_tqdm: bool,
        lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None, where: str,
    ) -> list[RequestOutput]:
        """where: what the caller's list is called (prompts, messages), to say which entry a refusal is about."""
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = _per_prompt(sampling_params, SamplingParams, "sampling_params", len(prompts))
        loras = _per_prompt(lora_request, LoRARequest, "lora_request", len(prompts))
        engine = self.llm_engine
        run_params = _offline_params(params_list)  # before any request is added
        ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for i, (prompt, params, lora) in enumerate(zip(prompts, run_params, loras)):
                request_id = str(next(self._counter))
                try:
                    engine.add_request(request_id, _truncated(engine, prompt, params), params, lora_request=lora)
                except RequestError as e:
                    _name_entry(e, where, i, len(prompts))
                    raise
                ids.append(request_id)
            ours = set(ids)
            # a bar only on a terminal: in a log file every refresh would append to one ever-longer line
            show = use_tqdm and sys.stderr.isatty()
            with tqdm(total=len(ids), desc="Generating", unit="req", disable=not show) as bar:
                while len(finished) < len(ids):
                    for output in engine.step():
                        if output.finished and output.request_id in ours:
                            finished[output.request_id] = output
                            bar.update(1)
        except BaseException:  # a refused prompt, or an interrupt (Ctrl-C): nothing of this call keeps running
            _abort(engine, [i for i in ids if i not in finished])
            raise
        for request_id, lora in zip(ids, loras):
            finished[request_id].lora_request = lora
        return [keep_best_of(finished[i], p) for i, p in zip(ids, params_list)]


def _abort(engine: LLMEngine, request_ids: list[str]) -> None:
    """Free request_ids in the engine and collect their final outputs, so no page stays held and the next
    call starts idle; a failure while collecting (the engine itself down) leaves the caller's exception."""
    engine.abort_request(request_ids)
    try:
        engine.step()
    except Exception:
        logging.getLogger("gantry").debug("collecting aborted requests failed", exc_info=True)


def _name_entry(e: RequestError, where: str, i: int, count: int) -> None:
    """Say in e which entry of the caller's list it is about, when there are several (its type, LoRAError
    included, kept)."""
    if count > 1:
        e.message = f"{e.message} ({where}[{i}])"
        e.args = (f"{e.param}: {e.message}",)


def _check_priority(priority: Any, count: int) -> None:
    """vLLM's refusal of a non-zero priority without priority scheduling, which this engine does not have."""
    if priority is None:
        return
    if not isinstance(priority, SequenceABC) or isinstance(priority, str):
        raise RequestError("priority", f"must be a list of one int per prompt, got {type(priority).__name__}")
    if len(priority) != count:
        raise RequestError("priority", f"{len(priority)} given for {count} prompts")
    for i, p in enumerate(priority):
        if p != 0 or isinstance(p, bool) or not isinstance(p, int):
            raise RequestError(f"priority[{i}]", f"must be 0: requests run first come, first served (no priority "
                                                 f"scheduling), got {p!r}")


def _truncated(engine: LLMEngine, prompt: Prompt, params: SamplingParams) -> Prompt:
    """prompt cut to its last params.truncate_prompt_tokens tokens (vLLM's; -1: max_model_len), as token ids."""
    k = params.truncate_prompt_tokens
    if k is None:
        return prompt
    limit = engine.max_model_len
    if k > limit:
        raise RequestError("truncate_prompt_tokens", f"must be at most max_model_len ({limit}), got {k}")
    token_ids = engine.encode(prompt) if isinstance(prompt, str) else prompt
    return token_ids[-(limit if k == -1 else k):]


def _per_prompt(value: Any, cls: type, name: str, count: int) -> list[Any]:
    """value (a cls, or for lora_request None) for every prompt, or a list of one per prompt; anything
    else is a RequestError naming the argument or its entry."""
    optional = cls is LoRARequest  # None: the base model
    if isinstance(value, cls) or (optional and value is None):
        return [value] * count
    if not isinstance(value, SequenceABC) or isinstance(value, str):
        raise RequestError(name, f"must be a {cls.__name__} or a list of one per prompt, got {type(value).__name__}")
    items = list(value)
    for i, item in enumerate(items):
        if not (isinstance(item, cls) or (optional and item is None)):
            raise RequestError(f"{name}[{i}]", f"must be a {cls.__name__}{' or None' if optional else ''},"
                                               f" got {type(item).__name__}")
    if len(items) != count:
        raise RequestError(name, f"{len(items)} given for {count} prompts")
    return items


def _offline_params(params_list: list[SamplingParams]) -> list[SamplingParams]:
    """What the engine runs for each prompt's params: a copy checked and normalized again (vLLM scripts set
    fields after construction: top_k=-1, stop="...", or a value out of range), best_of samples
    (best_of_params), and the whole final output whatever output_kind says, as vLLM's LLM returns (DELTA
    would keep only the last step's tokens). One copy per distinct params object."""
    copies: dict[int, SamplingParams] = {}
    for params in params_list:
        if id(params) not in copies:
            run = dataclasses.replace(params)  # __post_init__ again: a SamplingParamsError names the field
            if run.output_kind == RequestOutputKind.DELTA:
                run.output_kind = RequestOutputKind.FINAL_ONLY
            copies[id(params)] = best_of_params(run, None)
    return [copies[id(params)] for params in params_list]


def _parse_prompts(prompts: Any) -> list[Prompt]:
    """One prompt or a list of them (see the module docstring), as the engine takes them."""
    single = isinstance(prompts, (str, dict)) or (
        isinstance(prompts, list) and bool(prompts) and all(isinstance(t, int) for t in prompts))
    if not single and not isinstance(prompts, SequenceABC):
        raise RequestError("prompts", f"must be a prompt or a list of prompts, got {type(prompts).__name__}")
    items = [prompts] if single else list(prompts)
    return [_parse_prompt(p, "prompts" if single else f"prompts[{i}]") for i, p in enumerate(items)]


def _parse_prompt(prompt: Any, where: str) -> Prompt:
    """One of vLLM's prompt forms as the engine takes it: text or token ids."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - set(PROMPT_KEYS))
        if unknown:
            raise RequestError(f"{where}.{unknown[0]}", "not supported (a text model: give 'prompt' or 'prompt_token_ids')")
        if len(prompt) != 1:
            raise RequestError(where, "give exactly one of 'prompt' (text) or 'prompt_token_ids'")
        key, value = next(iter(prompt.items()))
        if key == "prompt":
            if not isinstance(value, str):
                raise RequestError(f"{where}.prompt", f"must be a string, got {type(value).__name__}")
            return value
        where = f"{where}.prompt_token_ids"
        prompt = value
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise RequestError(where, "must be a string, a list of token ids, {'prompt': str} or {'prompt_token_ids': [...]}")
