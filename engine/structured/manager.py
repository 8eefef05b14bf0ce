"""StructuredOutputManager: the engine core's side of structured outputs (vLLM v1 keeps it there too).

Grammars are compiled once per spec against the tokenizer's vocabulary (xgrammar's compiler cache);
each constrained sample has its own GrammarMatcher, advanced with the tokens the scheduler accepts
and dropped when its request finishes or is aborted. Before a step runs, the matchers of the
scheduled samples fill one bitmask row each; it travels in the SchedulerOutput to the sampler.
A request's grammar compiles on a worker thread from its arrival (start_request; xgrammar releases the GIL), as
vLLM's does: a costly grammar (a regex of many bounded repeats compiled for 23 s on CPU) held every stream while
the engine loop compiled it. Its request waits (ready) until collect() gives its samples their matchers.
With a reasoning parser a sample's grammar waits until its <think> section ends (reasoning.py).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from engine.core_messages import EngineCoreOutput
from engine.sequence import Request, Sequence
from engine.structured.json_schema import json_object_grammar, json_schema_grammar
from engine.structured.params import StructuredOutputsError, StructuredOutputsParams
from engine.structured.reasoning import PARSERS, ReasoningGate, ThinkTokens

logger = logging.getLogger("gantry.engine")
# Python's thread switch interval while a fill runs on the worker: the worker needs the GIL for a few lines
# around xgrammar's call, and with the default 5 ms it got it only once the loop's thread, busy with pure
# Python (scheduling), blocked on the result, so nothing overlapped (CPU: fill done at 5.0 ms vs 1.7 ms)
FILL_SWITCH_INTERVAL_S = 1e-4


@dataclass
class SampleGrammar:
    """One constrained sample's grammar state."""

    matcher: Any  # xgrammar.GrammarMatcher
    gate: ReasoningGate | None = None  # with a reasoning parser: where the sample is around <think>
    num_accepted: int = 0  # tokens of the sample seen (the scheduler's num_output_tokens once collected)
    min_tokens: int = 0  # the request's: why its grammar could refuse a sampled token (the stop token banned)
    ignore_eos: bool = False  # the request's: the sample goes on past the grammar's end (stop tokens only, then)
    dropped: bool = False  # its grammar refused a sampled token: the sample fails (take_refused)
    terminated: bool = False  # the matcher's is_terminated() after its last accepted token (one call a step)

    @property
    def constrained(self) -> bool:
        reasoning = self.gate is not None and not self.gate.constrained
        return not (self.dropped or reasoning or (self.terminated and not self.ignore_eos))


# Grammars compiling at once (xgrammar compiles in parallel threads, outside the GIL). vLLM v1 takes half the
# cores; at least two here, so that one costly grammar (a regex such as 'a*' * 500 takes a minute) does not hold
# every other constrained request behind it.
COMPILE_WORKERS = max(2, ((os.cpu_count() or 1) + 1) // 2)


class StructuredOutputManager:
    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int):
        self._load_tokenizer = load_tokenizer  # called at the first constrained request (seconds)
        self.vocab_size = vocab_size  # the model's (the logits' width), >= the tokenizer's
        self._compiler: Any = None  # xgrammar.GrammarCompiler once a tokenizer is loaded
        self.grammar_vocab_size = vocab_size  # the tokenizer's, once loaded: a bitmask row's bits
        self._buffer: torch.Tensor | None = None  # bitmask rows, reused across steps (_bitmask_rows)
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher: fills many rows on several threads
        self._worker: ThreadPoolExecutor | None = None  # runs a step's fill beside the engine loop's thread
        self.fill_s = 0.0  # CPU seconds filling bitmasks (benchmarks)
        self.samples: dict[str, list[SampleGrammar]] = {}  # request id -> one per sample
        self.refused: list[tuple[str, int, tuple[str, str]]] = []  # (request id, sample, (field, message)) to fail
        self.think_tokens: ThinkTokens | None = None  # the tokenizer's bytes, once a tokenizer is loaded
        self._stop_row: torch.Tensor | None = None  # [ceil(grammar_vocab_size / 32)] int32: only the stop tokens
        # request id -> (its request, its compile) until collect(); COMPILE_WORKERS at once, the first compile's
        # tokenizer load and compiler set-up (_compiler_for) run once, under _setup_lock, before any other compile
        self.compiling: dict[str, tuple[Request, Future[Any]]] = {}
        self._compile_pool: ThreadPoolExecutor | None = None
        self._setup_lock = threading.Lock()

    @property
    def num_requests(self) -> int:
        return len(self.samples)

    def _compiler_for(self, eos_token_ids: list[int]) -> Any:
        with self._setup_lock:  # compile workers: the first one sets up, the others wait for it
            return self._set_up(eos_token_ids)

    def _set_up(self, eos_token_ids: list[int]) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            tokenizer = self._load_tokenizer()
            if tokenizer is None:
                raise StructuredOutputsError("structured_outputs", "this model has no tokenizer to compile "
                                             "grammars against (dummy weights without one)")
            # The grammar's vocabulary is the tokenizer's ids only. xgrammar would take a model's padding
            # rows past them (SmolLM2's tokenizer on a Qwen2-sized head: 103k ids) as special tokens, which
            # made each accept_token 20x slower; the sampler never allows those ids (bitmask.py).
            self.grammar_vocab_size = min(len(tokenizer), self.vocab_size)
            stop_ids = sorted(i for i in eos_token_ids if i < self.grammar_vocab_size)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.grammar_vocab_size,
                                                      stop_token_ids=stop_ids or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=4)
            self.think_tokens = ThinkTokens(info.decoded_vocab, self.grammar_vocab_size, set(info.stop_token_ids))
            self._stop_row = xgr.allocate_token_bitmask(1, self.grammar_vocab_size)[0].zero_()
            for token_id in info.stop_token_ids:
                self._stop_row[token_id // 32] |= _bit(token_id % 32)
            # 4 threads filled 256 rows fastest on the H200 host (0.64 ms; 1.15 ms on its default of 8)
            self._batch = xgr.BatchGrammarMatcher(min(4, max(1, (os.cpu_count() or 2) // 2)))
            logger.info("structured outputs: grammars compiled against a vocabulary of %d tokens (the model's: %d)",
                        self.grammar_vocab_size, self.vocab_size)
        return self._compiler

    def compile(self, p: StructuredOutputsParams, eos_token_ids: list[int]) -> Any:
        """The CompiledGrammar of p (cached by xgrammar per spec); StructuredOutputsError if it fails."""
        compiler = self._compiler_for(eos_token_ids)
        kind, spec = p.grammar_key()
        try:
            if kind == "json":
                return compiler.compile_grammar(json_schema_grammar(p.json_text(), not p.disable_any_whitespace))
            if kind == "json_object":  # any object: OpenAI's json_object
                return compiler.compile_grammar(json_object_grammar(not p.disable_any_whitespace))
            if kind == "regex":
                return compiler.compile_regex(spec)
            return compiler.compile_grammar(spec)
        except Exception as e:  # checked at SamplingParams construction; this is the vocabulary's turn
            raise StructuredOutputsError(f"structured_outputs.{p.kind}", f"cannot be compiled: {e}") from None

    def add_request(self, request: Request, eos_token_ids: list[int]) -> None:
        """One matcher per sample of a constrained request, compiled here; raises StructuredOutputsError."""
        p = request.params.structured_outputs
        assert p is not None
        self._add_matchers(request, self.compile(p, eos_token_ids))

    def start_request(self, request: Request, eos_token_ids: list[int]) -> None:
        """Compile request's grammar on the worker; its samples get their matchers at collect() once it is done."""
        p = request.params.structured_outputs
        assert p is not None
        if self._compile_pool is None:
            self._compile_pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="gantry-grammar")
        self.compiling[request.request_id] = (request, self._compile_pool.submit(self.compile, p, eos_token_ids))

    def collect(self) -> list[tuple[Request, tuple[str, str]]]:
        """Compiled grammars to their requests' matchers (the engine loop's, before a step is scheduled); returns
        the requests whose grammar failed to compile, with (field, message): they fail alone."""
        failed = []
        for request_id, (request, future) in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[request_id]
            try:
                self._add_matchers(request, future.result())
            except StructuredOutputsError as e:
                failed.append((request, (e.param, e.message)))
        return failed

    def ready(self, request_id: str) -> bool:
        """Whether request_id's samples may be scheduled: its grammar is not still compiling."""
        return request_id not in self.compiling

    def wait(self, timeout: float) -> None:
        """Block until a compile finishes, at most timeout seconds (none running: return at once)."""
        if self.compiling:
            wait([f for _, f in self.compiling.values()], timeout, FIRST_COMPLETED)

    def shutdown(self) -> None:
        """Cancel the compiles not begun and wait for the one under way."""
        if self._compile_pool is not None:
            self._compile_pool.shutdown(wait=True, cancel_futures=True)
        self.compiling.clear()

    def _add_matchers(self, request: Request, compiled: Any) -> None:
        import xgrammar as xgr

        p = request.params.structured_outputs
        assert p is not None
        spec = PARSERS[p.reasoning_parser] if p.reasoning_parser and not p.enable_in_reasoning else None
        assert self.think_tokens is not None
        ignore_eos = getattr(request.params, "ignore_eos", False)  # stand-in params in unit tests lack it
        self.samples[request.request_id] = [
            SampleGrammar(xgr.GrammarMatcher(compiled), None if spec is None else ReasoningGate(spec, self.think_tokens),
                          min_tokens=request.params.min_tokens, ignore_eos=ignore_eos)
            for _ in request.seqs]

    def free(self, request_id: str) -> None:
        self.samples.pop(request_id, None)
        pending = self.compiling.pop(request_id, None)
        if pending is not None:  # aborted while compiling: a compile not begun is dropped, one begun runs out
            pending[1].cancel()

    def accept_tokens(self, outputs: Iterable[EngineCoreOutput]) -> None:
        """Advance the matchers with the tokens the scheduler appended this step."""
        for out in outputs:
            samples = self.samples.get(out.request_id)
            if samples is None or not out.new_token_ids:
                continue
            sample = samples[out.index]
            for token_id in out.new_token_ids:
                if sample.dropped or sample.terminated:
                    break  # the grammar ended with its stop token; nothing after it is constrained
                ok = sample.matcher.accept_token(token_id) if sample.gate is None else sample.gate.accept(
                    token_id, sample.matcher)
                if not ok:
                    # only a token the bitmask allowed can be sampled, unless the bitmask allowed none: min_tokens
                    # banned the stop token when it was the only one left, or the grammar matches nothing. The
                    # sample fails (a 400 naming the field) rather than going on unconstrained.
                    sample.dropped = True
                    self.refused.append((out.request_id, out.index, _refusal(sample)))
                else:
                    sample.terminated = sample.matcher.is_terminated()
            sample.num_accepted += len(out.new_token_ids)

    def take_refused(self) -> list[tuple[str, int, tuple[str, str]]]:
        """The samples whose grammar refused a token since the last call: (request id, sample, (field, message))."""
        refused, self.refused = self.refused, []
        return refused

    def _bitmask_rows(self, k: int) -> torch.Tensor:
        """[k, words] int32 rows of one buffer kept across steps. Every filled row is written whole, and
        each step's rows are copied when its step is submitted (pinned for the device, or sent to the
        ranks; on CPU the sampler reads them at once). A new tensor per step cost more than the fill:
        torch.full ran on every intra-op thread (16 ms a step on a loaded 2-core machine, about 4 of the
        H200 host's 5 ms bitmask time)."""
        import xgrammar as xgr

        if self._buffer is None or self._buffer.shape[0] < k:
            self._buffer = xgr.allocate_token_bitmask(max(k, 64), self.grammar_vocab_size)
        return self._buffer[:k]

    def grammar_bitmask(self, scheduled: list[Sequence]) -> tuple[torch.Tensor | None, list[str]]:
        """[k, ceil(grammar_vocab_size / 32)] int32 (host): one row per constrained sample scheduled this step, and
        their sequence ids; (None, []) when none is. Each matcher has taken every token of its sample
        (the engine core collects a constrained sample's step before filling its next bitmask)."""
        return self.start_grammar_bitmask(scheduled, in_thread=False).result()

    def start_grammar_bitmask(self, scheduled: list[Sequence], in_thread: bool = True) -> PendingBitmask:
        """grammar_bitmask, its fill on the worker thread (xgrammar's batch fill releases the GIL): the caller
        goes on with what does not touch these matchers and calls result() before the step samples."""
        seq_ids, rows = [], []
        for seq in scheduled:
            samples = self.samples.get(seq.request.request_id)
            if samples is None:
                continue
            sample = samples[seq.index]
            assert sample.num_accepted == seq.num_output_tokens, seq.seq_id
            if sample.constrained:  # not reasoning, not finishing after its stop token, not dropped
                seq_ids.append(seq.seq_id)
                rows.append(sample)
        if not rows:
            return PendingBitmask(None, seq_ids, rows, self.grammar_vocab_size, None)
        bitmask = self._bitmask_rows(len(rows))
        # an ended grammar (ignore_eos goes on past it) has no next mask: its row is the stop tokens (result())
        live = [k for k, sample in enumerate(rows) if not sample.terminated]
        matchers = [rows[k].matcher for k in live]
        indices = None if len(live) == len(rows) else live
        pending = PendingBitmask(bitmask, seq_ids, rows, self.grammar_vocab_size, None, stop_row=self._stop_row)
        if not matchers:
            return pending
        if not in_thread:
            self._fill(matchers, bitmask, indices)
            return pending
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gantry-bitmask")
        pending.switch_interval_s = sys.getswitchinterval()
        sys.setswitchinterval(FILL_SWITCH_INTERVAL_S)  # restored by result()
        pending.future = self._worker.submit(self._fill, matchers, bitmask, indices)
        return pending

    def _fill(self, matchers: list[Any], bitmask: torch.Tensor, indices: list[int] | None) -> None:
        """matchers' rows of bitmask: indices[i] is matchers[i]'s (None: row i)."""
        t0 = time.perf_counter()
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0 if indices is None else indices[0])
        else:
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices)
        self.fill_s += time.perf_counter() - t0


@dataclass
class PendingBitmask:
    """A step's grammar rows being filled (StructuredOutputManager.start_grammar_bitmask)."""

    bitmask: torch.Tensor | None  # [len(seq_ids), ceil(grammar_vocab_size / 32)] int32, host
    seq_ids: list[str]
    rows: list[SampleGrammar]
    grammar_vocab_size: int  # a row's bits
    future: Future | None  # the worker's fill; None: filled already
    switch_interval_s: float | None = None  # sys.getswitchinterval() to restore once the worker is done
    stop_row: torch.Tensor | None = None  # [words] int32: the row of a sample whose grammar has ended

    def result(self) -> tuple[torch.Tensor | None, list[str]]:
        """(bitmask, seq_ids) once filled; (None, []) when no sample of the step is constrained."""
        bitmask = self.bitmask
        if bitmask is None:
            return None, []
        if self.future is not None:
            try:
                self.future.result()
            finally:
                self.future = None
                sys.setswitchinterval(self.switch_interval_s)
        if self.grammar_vocab_size % 32:  # the last word's bits past the vocabulary: never allowed
            bitmask[:, -1] &= (1 << self.grammar_vocab_size % 32) - 1
        for k, sample in enumerate(self.rows):
            if sample.terminated:  # ignore_eos past the grammar's end: only stop tokens keep the text in it
                bitmask[k] = self.stop_row
                continue
            opening = None if sample.gate is None else sample.gate.start_row()
            if opening is not None:  # qwen3's start: the grammar's tokens, or <think>
                bitmask[k] |= opening
        return bitmask, self.seq_ids


def _bit(i: int) -> int:
    """Bit i of an int32 bitmask word, as a signed int32 value (bit 31 is negative)."""
    return (1 << i) - (1 << 32 if i == 31 else 0)


def _refusal(sample: SampleGrammar) -> tuple[str, str]:
    """The field to blame when a sample's grammar allowed no token after sample.num_accepted tokens."""
    if sample.num_accepted < sample.min_tokens:
        return "min_tokens", (f"the structured output can end after {sample.num_accepted} tokens, but min_tokens "
                              f"({sample.min_tokens}) asked for more; lower min_tokens")
    return "structured_outputs", f"the grammar allows no token after {sample.num_accepted} (it matches no string)"
