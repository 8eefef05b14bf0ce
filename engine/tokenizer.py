"""Tokenizer loading (HF directory or GGUF) and incremental detokenisation.

The detokenizer decodes a window of recent tokens and emits only text that ends in a
complete character, so multi-byte UTF-8 (Chinese, emoji) never streams half a character,
nor ends a sequence with one.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from engine import startup
from engine.errors import ModelLoadError
from engine.gguf_file import open_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str, is_gguf: bool, required: bool = True) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer; None when it has none and none is required (dummy weights)."""
    with startup.phase("tokenizer"):
        return _load_tokenizer(path, is_gguf, required)


def _load_tokenizer(path: str, is_gguf: bool, required: bool) -> PreTrainedTokenizerBase | None:
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

        return AutoTokenizer.from_pretrained(path)
    except ModelLoadError:
        if not required:
            return None
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not required:
            return None
        raise ModelLoadError(path, f"cannot load the tokenizer: {e}") from None


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
