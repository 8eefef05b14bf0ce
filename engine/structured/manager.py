"""StructuredOutputManager: the engine core's side of structured outputs (vLLM v1 keeps it there too).

Grammars are compiled once per spec against the tokenizer's vocabulary (xgrammar's compiler cache);
each constrained sample has its own GrammarMatcher, advanced with the tokens the scheduler accepts
and dropped when its request finishes or is aborted. Before a step runs, the matchers of the
scheduled samples fill one bitmask row each; it travels in the SchedulerOutput to the sampler.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from engine.core_messages import EngineCoreOutput
from engine.sequence import Request, Sequence
from engine.structured.params import StructuredOutputsError, StructuredOutputsParams

logger = logging.getLogger("gantry.engine")


class StructuredOutputManager:
    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int):
        self._load_tokenizer = load_tokenizer  # called at the first constrained request (seconds)
        self.vocab_size = vocab_size  # the model's (the logits' width), >= the tokenizer's
        self._compiler: Any = None  # xgrammar.GrammarCompiler once a tokenizer is loaded
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher: fills many rows on several threads
        self.matchers: dict[str, list[Any]] = {}  # request id -> one GrammarMatcher per sample
        self._num_accepted: dict[str, list[int]] = {}  # request id -> tokens each matcher took

    @property
    def num_requests(self) -> int:
        return len(self.matchers)

    def _compiler_for(self, eos_token_ids: list[int]) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            tokenizer = self._load_tokenizer()
            if tokenizer is None:
                raise StructuredOutputsError("structured_outputs", "this model has no tokenizer to compile "
                                             "grammars against (dummy weights without one)")
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=sorted(eos_token_ids) or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=4)
            self._batch = xgr.BatchGrammarMatcher()
            logger.info("structured outputs: grammars compiled against a vocabulary of %d tokens", self.vocab_size)
        return self._compiler

    def compile(self, p: StructuredOutputsParams, eos_token_ids: list[int]) -> Any:
        """The CompiledGrammar of p (cached by xgrammar per spec); StructuredOutputsError if it fails."""
        compiler = self._compiler_for(eos_token_ids)
        kind, spec = p.grammar_key()
        try:
            if kind == "json":
                return compiler.compile_json_schema(p.json_text(), any_whitespace=not p.disable_any_whitespace)
            if kind == "json_object":  # any object: OpenAI's json_object
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False,
                                                    any_whitespace=not p.disable_any_whitespace)
            if kind == "regex":
                return compiler.compile_regex(spec)
            return compiler.compile_grammar(spec)
        except Exception as e:  # checked at SamplingParams construction; this is the vocabulary's turn
            raise StructuredOutputsError(f"structured_outputs.{p.kind}", f"cannot be compiled: {e}") from None

    def add_request(self, request: Request, eos_token_ids: list[int]) -> None:
        """One matcher per sample of a constrained request; raises StructuredOutputsError."""
        import xgrammar as xgr

        p = request.params.structured_outputs
        assert p is not None
        compiled = self.compile(p, eos_token_ids)
        self.matchers[request.request_id] = [xgr.GrammarMatcher(compiled) for _ in request.seqs]
        self._num_accepted[request.request_id] = [0] * len(request.seqs)

    def free(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)
        self._num_accepted.pop(request_id, None)

    def accept_tokens(self, outputs: Iterable[EngineCoreOutput]) -> None:
        """Advance the matchers with the tokens the scheduler appended this step."""
        for out in outputs:
            matchers = self.matchers.get(out.request_id)
            if matchers is None or not out.new_token_ids:
                continue
            matcher = matchers[out.index]
            for token_id in out.new_token_ids:
                if matcher.is_terminated():
                    break  # the grammar ended with its stop token; nothing after it is constrained
                if not matcher.accept_token(token_id):
                    # only a token the bitmask allowed can be sampled, unless min_tokens banned the stop
                    # token when it was the only one left; the sample goes on unconstrained
                    logger.warning("request %s sample %d: token %d not accepted by its grammar",
                                   out.request_id, out.index, token_id)
                    break
            self._num_accepted[out.request_id][out.index] += len(out.new_token_ids)

    def grammar_bitmask(self, scheduled: list[Sequence]) -> tuple[torch.Tensor | None, list[str]]:
        """[k, ceil(vocab / 32)] int32 (host): one row per constrained sample scheduled this step, and
        their sequence ids; (None, []) when none is. Each matcher has taken every token of its sample
        (the engine core collects a constrained sample's step before scheduling its next)."""
        import xgrammar as xgr

        seq_ids, matchers = [], []
        for seq in scheduled:
            per_sample = self.matchers.get(seq.request.request_id)
            if per_sample is None:
                continue
            assert self._num_accepted[seq.request.request_id][seq.index] == seq.num_output_tokens, seq.seq_id
            matcher = per_sample[seq.index]
            if matcher.is_terminated():
                continue  # its stop token was sampled; it is finishing
            seq_ids.append(seq.seq_id)
            matchers.append(matcher)
        if not matchers:
            return None, []
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask)
        return bitmask, seq_ids
