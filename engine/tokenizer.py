"""Tokenizer loading (HF directory or GGUF), chat templating and incremental detokenisation.

The detokenizer decodes a window of recent tokens and emits only text that ends in a
complete character, so multi-byte UTF-8 (Chinese, emoji) never streams half a character,
nor ends a sequence with one.
"""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

from engine import startup
from engine.errors import ModelLoadError, RequestError
from engine.gguf_file import open_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
logger = logging.getLogger("gantry.engine")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# apply_chat_template's own arguments that chat_template_kwargs may not set: they change what it returns
# (token ids, tensors, a dict), have an argument of their own (chat_template), or were refused by transformers
# in words that named no field (documents, unsupported as chat's own field is; sanitize_control_tokens; self)
NOT_TEMPLATE_KWARGS = ("chat_template", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                       "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "messages", "conversation",
                       "documents", "sanitize_control_tokens", "self")


def warn_if_beyond_vocab(tokenizer: PreTrainedTokenizerBase | None, vocab_size: int) -> None:
    """At load: a tokenizer larger than the model's vocabulary (check_encoded_ids refuses what uses the rest)."""
    if tokenizer is not None and len(tokenizer) > vocab_size:
        logger.warning("the tokenizer has %d tokens, more than the model's vocab_size %d: text that encodes to the "
                       "others is refused naming its field", len(tokenizer), vocab_size)


def check_encoded_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    """Text encoded by a tokenizer with more tokens than the model's vocab_size may hold ids the model lacks."""
    if token_ids and (top := max(token_ids)) >= vocab_size:
        raise RequestError(param, f"encodes to token id {top}, which this model does not have (vocab_size "
                                  f"{vocab_size}): its tokenizer has more tokens than the model's vocabulary")


def load_tokenizer(path: str, is_gguf: bool, required: bool = True,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer; None when it has none and none is required (dummy weights).
    trust_remote_code: EngineConfig's, for a tokenizer class in the model directory's own code."""
    with startup.phase("tokenizer"):
        return _load_tokenizer(path, is_gguf, required, trust_remote_code)


def _load_tokenizer(path: str, is_gguf: bool, required: bool,
                    trust_remote_code: bool) -> PreTrainedTokenizerBase | None:
    if not is_gguf and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone: refuse instead
        if not required:
            return None
        raise ModelLoadError(path, f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    try:
        if is_gguf:  # from the parse the model config made already (engine.gguf_file caches it)
            return open_gguf(path).tokenizer()
        # imported here: its module imports torch, which a GGUF's tokenizer (the API process's) never needs
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        if not required:
            return None
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # AttributeError: a JSON file of null
        if not required:
            return None
        not_an_object = _not_an_object(path)
        if not_an_object:
            raise ModelLoadError(not_an_object, "must hold a JSON object") from None
        raise ModelLoadError(path, f"cannot load the tokenizer: {e}") from None


def _not_an_object(path: str) -> str | None:
    """The tokenizer JSON file of directory `path` that parses to something other than an object (transformers
    read tokenizer_config.json `null` as an AttributeError), for the error to name; read on that error's path only."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        file = os.path.join(path, name)
        try:
            with open(file, encoding="utf-8") as f:
                if not isinstance(json.load(f), dict):
                    return file
        except (OSError, ValueError):
            continue
    return None


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
    continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None, chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None, add_special_tokens: bool = False,
) -> list[int]:
    """messages rendered by chat_template (a Jinja string), else the tokenizer's, and tokenized without
    special tokens (the template writes its own; add_special_tokens, vLLM's chat field, adds them too):
    the one renderer of the offline LLM and the server.
    vLLM's semantics: chat_template_kwargs go to the template and may set add_generation_prompt,
    continue_final_message and tools too; the first two open different messages, so not both.
    A RequestError names the field (the server answers it as a 400)."""
    if chat_template is not None and not isinstance(chat_template, str):
        raise RequestError("chat_template", f"must be a string (a Jinja template), got {type(chat_template).__name__}")
    if tokenizer is None or not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise RequestError("messages", "this model has no chat template")
    options: dict[str, Any] = {"add_generation_prompt": add_generation_prompt,
                               "continue_final_message": continue_final_message, "tools": tools}
    extra = _template_kwargs(chat_template_kwargs)
    options.update(extra)

    def where(name: str) -> str:  # the field that set an option
        return f"chat_template_kwargs.{name}" if name in extra else name

    if options["continue_final_message"] and options["add_generation_prompt"]:
        raise RequestError(where("continue_final_message"),
                           "cannot be true with add_generation_prompt (set add_generation_prompt to false)")
    _check_tools(options["tools"], where("tools"))
    from jinja2 import TemplateSyntaxError  # transformers' dependency, imported with it

    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False, **options)
    except TemplateSyntaxError as e:
        raise RequestError("chat_template" if chat_template is not None else "messages",
                           f"the chat template does not parse: {e}") from None
    except Exception as e:  # the template itself may reject the conversation (raise_exception)
        raise RequestError("messages", f"the chat template rejected the messages: {e}") from None
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except Exception as e:  # what a template wrote from a request's values (a lone surrogate in a kwarg)
        raise RequestError("chat_template_kwargs" if extra else "messages",
                           f"the rendered conversation cannot be tokenized: {type(e).__name__}: {e}") from None


def _template_kwargs(chat_template_kwargs: Any) -> dict[str, Any]:
    if chat_template_kwargs is None:
        return {}
    if not isinstance(chat_template_kwargs, dict) or not all(isinstance(k, str) for k in chat_template_kwargs):
        raise RequestError("chat_template_kwargs", f"must be a dict of template variables by name, "
                                                   f"got {type(chat_template_kwargs).__name__}")
    for key in chat_template_kwargs:
        if key in NOT_TEMPLATE_KWARGS:
            hint = ("give it as chat_template=" if key == "chat_template" else "the request's messages fill it"
                    if key in ("messages", "conversation") else "retrieval documents are not supported"
                    if key == "documents" else "an option of the renderer: the prompt is always rendered as text")
            raise RequestError(f"chat_template_kwargs.{key}", f"not a template variable ({hint})")
    return chat_template_kwargs


def _check_tools(tools: Any, param: str) -> None:
    """OpenAI tool dicts ({"type": "function", "function": {...}}), as vLLM takes them; transformers would
    take a Python function's signature for any other object, and fail on it deep in the template."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise RequestError(param, f"must be a list of tool dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise RequestError(f"{param}[{i}]", f"must be a dict (OpenAI's tool form), got {type(tool).__name__}")


class IncrementalDetokenizer:
    """Text of a growing token sequence, one complete character at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Decode with a few prompt tokens as left context so leading spaces come out right.
        self.token_ids: list[int] = list(prompt_token_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence: the text still held back, less a last character whose bytes
        never completed (cut by max_tokens; it would decode to U+FFFD). vLLM drops it too; its
        tokens still count as generated."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        delta = self._decode(self.token_ids[self.prefix_offset :])[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.text += delta
        return delta
