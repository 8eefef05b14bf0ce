"""The sampler's per-row inputs of one step (SamplingMetadata), built from the runner's request states
(SamplingMetadataBuilder keeps the params' tensors while the batch is unchanged), and the pinned
host-to-device copy every step's inputs take."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.layers.sampler import SamplingMetadata
from engine.sampling_params import mix_seed

if TYPE_CHECKING:
    from engine.model_runner import RunnerRequestState
    from engine.outputs import RequestSamplingParams

# float32-safe bounds for user floats: past them the sampled distribution no longer changes
# (uniform for a huge temperature; seen tokens forced or banned for an extreme repetition
# penalty), while float32 would overflow to inf and turn the logits into nan.
MAX_TEMPERATURE = 1e30
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-20, 1e20
# a bias this large already forces (or forbids) its token, and divided by MIN_REPETITION_PENALTY it stays finite
MAX_LOGIT_BIAS = 1e10


def to_device(x: np.ndarray | list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data to the device without waiting for the step in flight: a pinned copy is
    queued behind it (a pageable copy would wait for the device to go idle)."""
    host = torch.as_tensor(x, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class _RowParams:
    """What one step's SamplingMetadata takes from its rows' params alone (not from their tokens)."""

    params: list[RequestSamplingParams]  # the rows' params objects: the key (compared by identity)
    temperature: torch.Tensor
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    all_greedy: bool
    seeded_rows: list[int]  # rows that draw from their own generator
    min_tokens_rows: list[int]  # rows with min_tokens: their bans depend on the output length
    penalties: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # presence, frequency, repetition
    max_num_logprobs: int | None
    processors: _ProcessorRows  # allowed_token_ids, logit_bias, bad_words


@dataclass
class _ProcessorRows:
    """allowed_token_ids, logit_bias and bad_words of the rows that have them (None or empty when none has)."""

    allowed_token_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # SamplingMetadata's
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # SamplingMetadata's
    single_token_bans: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids): one-token bad words
    # (row, its bad words of several tokens): their last token is banned while the output ends with the rest
    multi_token_bad_words: list[tuple[int, list[list[int]]]] = field(default_factory=list)


def _processor_rows(params: list[RequestSamplingParams], vocab: int, device: torch.device) -> _ProcessorRows:
    """Small index tensors, copied once per batch of params (a [k, vocab] mask only for the k rows with
    allowed_token_ids); nothing at all when no row has these fields."""
    def to_dev(x: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(x, dtype, device)

    out = _ProcessorRows()
    if all(p.logit_bias is None and p.allowed_token_ids is None and p.bad_words_token_ids is None for p in params):
        return out  # the usual batch: one pass over its params
    allowed = [(row, p.allowed_token_ids) for row, p in enumerate(params) if p.allowed_token_ids is not None]
    if allowed:
        local = [i for i, (_, ids) in enumerate(allowed) for t in ids if t < vocab]
        ids = [t for _, ids in allowed for t in ids if t < vocab]
        disallowed = torch.ones(len(allowed), vocab, dtype=torch.bool, device=device)  # [k, vocab]
        disallowed[to_dev(local, torch.long), to_dev(ids, torch.long)] = False
        out.allowed_token_mask = (to_dev([row for row, _ in allowed], torch.long), disallowed)
    bias = [(row, t, min(max(b, -MAX_LOGIT_BIAS), MAX_LOGIT_BIAS))
            for row, p in enumerate(params) for t, b in (p.logit_bias or {}).items() if t < vocab]
    if bias:
        rows, ids, values = zip(*bias)
        out.logit_bias = (to_dev(rows, torch.long), to_dev(ids, torch.long), to_dev(values, torch.float32))
    single = [(row, w[0]) for row, p in enumerate(params) for w in p.bad_words_token_ids or () if len(w) == 1]
    if single:
        rows, ids = zip(*single)
        out.single_token_bans = (to_dev(rows, torch.long), to_dev(ids, torch.long))
    out.multi_token_bad_words = [(row, words) for row, p in enumerate(params)
                                 if (words := [w for w in p.bad_words_token_ids or () if len(w) > 1])]
    return out


def _row_params(params: list[RequestSamplingParams], vocab: int, device: torch.device) -> _RowParams:
    def to_dev(x: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(x, dtype, device)

    top_k = [min(p.top_k, vocab) or vocab for p in params]  # larger than the vocabulary: off
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    penalties = None
    if any(p.has_penalties for p in params):
        penalties = (to_dev([p.presence_penalty for p in params], torch.float32),
                     to_dev([p.frequency_penalty for p in params], torch.float32),
                     to_dev([min(max(p.repetition_penalty, MIN_REPETITION_PENALTY), MAX_REPETITION_PENALTY)
                             for p in params], torch.float32))
    logprobs = [p.logprobs for p in params if p.logprobs is not None]
    return _RowParams(
        params=params,
        temperature=to_dev([min(p.temperature, MAX_TEMPERATURE) for p in params], torch.float32),
        top_k=to_dev(top_k, torch.long) if any(k < vocab for k in top_k) else None,
        top_p=to_dev(top_p, torch.float32) if any(v < 1.0 for v in top_p) else None,
        min_p=to_dev(min_p, torch.float32) if any(v > 0 for v in min_p) else None,
        all_greedy=all(p.temperature == 0 or p.top_k == 1 for p in params),
        seeded_rows=[row for row, p in enumerate(params) if p.seed is not None and p.temperature > 0],
        min_tokens_rows=[row for row, p in enumerate(params) if p.min_tokens > 0],
        penalties=penalties, max_num_logprobs=min(max(logprobs), vocab) if logprobs else None,
        processors=_processor_rows(params, vocab, device),
    )


class SamplingMetadataBuilder:
    """build_sampling_metadata that keeps the per-row tensors of the params (temperatures, top-k/p,
    min-p, penalty factors, allowed-token masks, logit biases, one-token bad words) while a step's rows have the
    same params objects in the same order: a steady decode batch rebuilds only what depends on its tokens
    (seeded generators, min_tokens bans, penalty counts, bad words that their tokens complete). Those
    tensors are only read by the sampler, so steps in flight may share them."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self._rows: _RowParams | None = None

    def build(self, states: list[RunnerRequestState], default_generator: torch.Generator | None) -> SamplingMetadata:
        params = [s.sampling_params for s in states]
        rows = self._rows
        if rows is None or len(rows.params) != len(params) or not all(map(operator.is_, params, rows.params)):
            rows = self._rows = _row_params(params, self.vocab, self.device)
        return _metadata(states, rows, self.vocab, self.device, default_generator)


def build_sampling_metadata(states: list[RunnerRequestState], vocab: int, device: torch.device,
                            default_generator: torch.Generator | None) -> SamplingMetadata:
    """One row per state, in order: temperatures, top-k/p, min-p, seeded generators, min_tokens bans,
    penalties (token counts scattered on the device), allowed_token_ids, bad_words, logit_bias and the most
    logprobs any row asks for."""
    rows = _row_params([s.sampling_params for s in states], vocab, device)
    return _metadata(states, rows, vocab, device, default_generator)


def _ends_with(state: RunnerRequestState, prefix: list[int]) -> bool:
    """state's generated tokens end with prefix (vLLM's bad-words test: the prompt does not count)."""
    num_output = len(state.token_ids) - state.sampling_params.num_prompt_tokens
    return num_output >= len(prefix) and state.token_ids[len(state.token_ids) - len(prefix):] == prefix


def _metadata(states: list[RunnerRequestState], rows: _RowParams, vocab: int, device: torch.device,
              default_generator: torch.Generator | None) -> SamplingMetadata:
    """rows (the states' params) plus what depends on the states' tokens."""
    n, dev = len(states), device

    def to_dev(x: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(x, dtype, device)

    generators: dict[int, torch.Generator] = {}
    for row in rows.seeded_rows:
        state = states[row]
        p = state.sampling_params
        # re-seeded per position: the same text whatever the batch, preemptions included
        num_output = len(state.token_ids) - p.num_prompt_tokens
        generators[row] = torch.Generator(device=dev).manual_seed(mix_seed(p.seed, num_output))
    min_tokens_mask: list[tuple[int, torch.Tensor]] = []
    for row in rows.min_tokens_rows:
        state = states[row]
        p = state.sampling_params
        if len(state.token_ids) - p.num_prompt_tokens < p.min_tokens:
            banned = sorted(t for t in set(p.stop_token_ids) | set(p.eos_token_ids) if t < vocab)
            min_tokens_mask.append((row, to_dev(banned, torch.long)))
    proc = rows.processors
    md = SamplingMetadata(
        temperature=rows.temperature, top_k=rows.top_k, top_p=rows.top_p, min_p=rows.min_p,
        all_greedy=rows.all_greedy, generators=generators, default_generator=default_generator,
        min_tokens_mask=min_tokens_mask, allowed_token_mask=proc.allowed_token_mask, logit_bias=proc.logit_bias,
        bad_words_bans=[proc.single_token_bans] if proc.single_token_bans is not None else [],
    )
    bans = [(row, word[-1]) for row, words in proc.multi_token_bad_words
            for word in words if _ends_with(states[row], word[:-1])]
    if bans:
        md.bad_words_bans.append((to_dev([r for r, _ in bans], torch.long), to_dev([t for _, t in bans], torch.long)))
    if rows.penalties is not None:
        # (row, token) pairs of generated and of prompt tokens, scattered on the device
        out_rows, out_ids, prompt_rows, prompt_ids = [], [], [], []
        for row, state in enumerate(states):
            p = state.sampling_params
            if not p.has_penalties:
                continue  # neutral row; it may run ahead on a placeholder token
            num_prompt = p.num_prompt_tokens
            out_ids += state.token_ids[num_prompt:]
            out_rows += [row] * (len(state.token_ids) - num_prompt)
            prompt_ids += state.token_ids[:num_prompt]
            prompt_rows += [row] * num_prompt
        counts = torch.zeros(n, vocab, dtype=torch.int32, device=dev)
        counts.index_put_((to_dev(out_rows, torch.long), to_dev(out_ids, torch.long)),
                          torch.ones(len(out_ids), dtype=torch.int32, device=dev), accumulate=True)
        prompt_mask = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
        prompt_mask[to_dev(prompt_rows, torch.long), to_dev(prompt_ids, torch.long)] = True
        md.output_token_counts, md.prompt_token_mask = counts, prompt_mask
        md.presence_penalty, md.frequency_penalty, md.repetition_penalty = rows.penalties
    md.max_num_logprobs = rows.max_num_logprobs
    return md
