"""Sampler: allowed_token_ids, bad_words, logit_bias, penalties, temperature, min-p, top-k/top-p (vLLM's order) and
per-request seeded sampling, all on the logits' device with no host sync per request (one copy of the
results at the end).

Sampling uses the exponential-race trick: argmax(p / q) with q ~ Exp(1) draws from p, and a
seeded request draws its own q from its own generator, so its text does not depend on
whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.structured.bitmask import apply_grammar_bitmask

@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [num_reqs] float32; 0 = greedy
    top_k: torch.Tensor | None  # [num_reqs] int64, vocab size where off; None: off for all
    top_p: torch.Tensor | None  # [num_reqs] float32; None: off for all
    min_p: torch.Tensor | None  # [num_reqs] float32; None: off for all
    all_greedy: bool
    generators: dict[int, torch.Generator]  # row -> its request's generator (seeded requests)
    default_generator: torch.Generator | None  # for unseeded rows
    presence_penalty: torch.Tensor | None = None  # [num_reqs]; None: no penalties in this batch
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    output_token_counts: torch.Tensor | None = None  # [num_reqs, vocab] int: generated-token counts
    prompt_token_mask: torch.Tensor | None = None  # [num_reqs, vocab] bool: token occurs in the prompt
    min_tokens_mask: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (row, banned ids on the device)
    max_num_logprobs: int | None = None  # largest top-k logprobs asked in the batch
    grammar_bitmask: torch.Tensor | None = None  # [num_reqs, ceil(vocab / 32)] int32: structured outputs
    grammar_rows: list[int] | None = None  # the rows grammar_bitmask constrains (the others are unchanged)
    # vLLM's built-in logits processors (engine/sampling_metadata.py builds them from small index tensors):
    # (rows [k] int64, disallowed [k, vocab] bool): allowed_token_ids of the rows that have them
    allowed_token_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    bad_words_bans: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (rows [m], token ids [m])
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows [m], token ids [m], bias [m] f32)

    @property
    def modifies_logits(self) -> bool:
        """Some row's logits change before sampling (penalties, bans, masks, biases)."""
        return (self.output_token_counts is not None or bool(self.min_tokens_mask) or self.grammar_bitmask is not None
                or self.allowed_token_mask is not None or bool(self.bad_words_bans) or self.logit_bias is not None)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [num_reqs] int64
    logprob_token_ids: torch.Tensor | None  # [num_reqs, 1 + k]: sampled token, then the top k
    logprobs: torch.Tensor | None  # [num_reqs, 1 + k] float32
    sampled_ranks: torch.Tensor | None  # [num_reqs] rank of the sampled token (1 = most likely)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    counts = md.output_token_counts
    seen = (counts > 0) | md.prompt_token_mask
    rep = md.repetition_penalty.unsqueeze(1)
    # HF's repetition penalty: divide positive logits, multiply negative ones
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - md.frequency_penalty.unsqueeze(1) * counts.to(logits.dtype)
    return logits - md.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """vLLM V1's built-in processors in its order, in place on float32 logits: allowed_token_ids, bad_words,
    logit_bias (after the masks, before penalties and temperature)."""
    if md.allowed_token_mask is not None:
        rows, disallowed = md.allowed_token_mask
        logits[rows] = logits[rows].masked_fill_(disallowed, float("-inf"))
    for rows, token_ids in md.bad_words_bans:
        logits[rows, token_ids] = float("-inf")
    if md.logit_bias is not None:
        rows, token_ids, bias = md.logit_bias
        logits.index_put_((rows, token_ids), bias, accumulate=True)  # (row, token) pairs are distinct


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask the tokens less likely than min_p [num_reqs] times their row's most likely one."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab_size = logits.shape[-1]
    ranks = torch.arange(vocab_size, device=logits.device).unsqueeze(0)
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        mask |= ranks >= top_k.unsqueeze(1)
    if top_p is not None:
        probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above this one
        mask |= (before > top_p.unsqueeze(1)) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """logits: [num_reqs, vocab] in the model dtype; all-greedy batches argmax it as is."""
        if md.all_greedy and md.max_num_logprobs is None and not md.modifies_logits:
            return SamplerOutput(logits.argmax(dim=-1), None, None, None)
        logits = logits.float()
        # logprobs are the model's own (vLLM's default raw_logprobs): before every processor and penalty
        raw_logprobs = logits.log_softmax(dim=-1) if md.max_num_logprobs is not None else None
        apply_logits_processors(logits, md)
        for row, banned in md.min_tokens_mask:
            logits[row, banned] = float("-inf")
        if md.grammar_bitmask is not None:  # EOS stays allowed only where the grammar may end
            apply_grammar_bitmask(logits, md.grammar_bitmask, md.grammar_rows)
        if md.output_token_counts is not None:
            logits = apply_penalties(logits, md)
        greedy = logits.argmax(dim=-1)
        if md.all_greedy:
            sampled = greedy
        else:
            # Shift each row's top logit to 0 before dividing: with a tiny temperature the top
            # tokens would overflow to +inf and the softmax to nan. A row where every token is
            # banned stays -inf (its argmax, like greedy's, is then token 0).
            row_max = logits.amax(dim=-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
            temperature = torch.where(md.temperature > 0, md.temperature, 1.0).unsqueeze(1)
            logits = (logits - row_max) / temperature
            if md.min_p is not None:  # vLLM's order: min-p on the tempered distribution, then top-k/top-p on what is left
                logits = apply_min_p(logits, md.min_p)
            if md.top_k is not None or md.top_p is not None:
                logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
            probs = logits.softmax(dim=-1)
            q = torch.empty_like(probs).exponential_(generator=md.default_generator)
            for row, generator in md.generators.items():
                q[row].exponential_(generator=generator)
            sampled = torch.where(md.temperature > 0, (probs / q).argmax(dim=-1), greedy)
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        sampled_lp = raw_logprobs.gather(-1, sampled.unsqueeze(1))  # [num_reqs, 1]
        ranks = (raw_logprobs > sampled_lp).sum(dim=-1) + 1
        top_lp, top_ids = raw_logprobs.topk(md.max_num_logprobs, dim=-1)
        return SamplerOutput(
            sampled,
            torch.cat((sampled.unsqueeze(1), top_ids), dim=1),
            torch.cat((sampled_lp, top_lp), dim=1),
            ranks,
        )
