"""Prompt logprobs (vLLM's SamplingParams.prompt_logprobs): for every scheduled prompt position
of the requests that asked, the log-probability of the prompt's next token, its rank and the
top k, from the LM head's float32 log_softmax. Chunked prefill computes them chunk by chunk.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.core_messages import TokenLogprobs
from engine.outputs import Logprob, PromptLogprobs, PromptLogprobsChunk, SchedulerOutput

if TYPE_CHECKING:  # torch only in the engine's half: the API process (extend_prompt_logprobs) runs without it
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from engine.forward_context import ForwardContext
    from engine.model_runner import RunnerRequestState

# LM-head rows per pass: bounds the [rows, vocab] float32 logits of a long prompt chunk
MAX_ROWS_PER_PASS = 512


@dataclass
class PromptLogprobsPlan:
    """Which rows of this step's hidden states score which prompt tokens."""

    req_ids: list[str]  # requests with prompt positions to score this step
    first_positions: list[int]  # per request: prompt index of its first scored token (>= 1)
    num_rows: list[int]  # per request: tokens scored this step
    num_logprobs: list[int]  # per request: top k asked
    rows: list[int]  # [total rows] index into the step's tokens; row r predicts target r
    targets: list[int]  # [total rows] the prompt token that follows each row's token


def plan_prompt_logprobs(so: SchedulerOutput, requests: dict[str, RunnerRequestState]) -> PromptLogprobsPlan | None:
    """Call before the step advances num_computed_tokens (the runner's requests are updated). The token at position p scores prompt token p + 1,
    so a chunk [start, end) scores prompt tokens start + 1 .. min(end, num_prompt - 1)."""
    plan = PromptLogprobsPlan([], [], [], [], [], [])
    offset = 0  # this request's first row among the step's tokens (prepare_inputs' order)
    for req_id, num_new in so.num_scheduled_tokens.items():
        state = requests[req_id]
        k = state.sampling_params.prompt_logprobs
        start, num_prompt = state.num_computed_tokens, state.sampling_params.num_prompt_tokens
        last = min(start + num_new, num_prompt - 1)  # exclusive end of the rows that score prompt tokens
        if k is not None and start < last:
            plan.req_ids.append(req_id)
            plan.first_positions.append(start + 1)
            plan.num_rows.append(last - start)
            plan.num_logprobs.append(k)
            plan.rows.extend(range(offset, offset + last - start))
            plan.targets.extend(state.token_ids[start + 1 : last + 1])
        offset += num_new
    return plan if plan.req_ids else None


def compute_prompt_logprobs(model: nn.Module, hidden: torch.Tensor, ctx: ForwardContext,
                            plan: PromptLogprobsPlan) -> dict[str, PromptLogprobsChunk]:
    """hidden: [num_tokens, hidden_size] of the last pipeline stage. Every TP rank runs this with
    the same plan (the LM head gathers over TP). Returns plain data for ModelRunnerOutput."""
    import torch

    from engine.forward_context import forward_context

    device = hidden.device
    rows = torch.tensor(plan.rows, dtype=torch.long, device=device)  # [num_rows]
    targets = torch.tensor(plan.targets, dtype=torch.long, device=device)  # [num_rows]
    k = max(plan.num_logprobs)
    ids_parts, lp_parts, rank_parts = [], [], []
    for s in range(0, len(plan.rows), MAX_ROWS_PER_PASS):
        with forward_context(dataclasses.replace(ctx, logits_indices=rows[s : s + MAX_ROWS_PER_PASS])):
            logits = model.compute_logits(hidden)  # [rows, vocab] in the model dtype
        logprobs = logits.float().log_softmax(dim=-1)  # [rows, vocab] float32
        target = targets[s : s + MAX_ROWS_PER_PASS].unsqueeze(1)  # [rows, 1]
        target_lp = logprobs.gather(-1, target)  # [rows, 1]
        rank_parts.append((logprobs > target_lp).sum(dim=-1) + 1)  # [rows]; 1 = the most likely token
        top_lp, top_ids = logprobs.topk(k, dim=-1)  # [rows, k]
        ids_parts.append(torch.cat((target, top_ids), dim=1))  # [rows, 1 + k]
        lp_parts.append(torch.cat((target_lp, top_lp), dim=1))
    # one copy to the host (it waits for this step; prompt logprobs are rare enough)
    ids, lps, ranks = (torch.cat(p).cpu().tolist() for p in (ids_parts, lp_parts, rank_parts))
    out: dict[str, PromptLogprobsChunk] = {}
    r = 0
    for req_id, first, n, kr in zip(plan.req_ids, plan.first_positions, plan.num_rows, plan.num_logprobs):
        out[req_id] = PromptLogprobsChunk(first, [TokenLogprobs(ids[i][: kr + 1], lps[i][: kr + 1], ranks[i])
                                                  for i in range(r, r + n)])
        r += n
    return out


def extend_prompt_logprobs(lps: PromptLogprobs, first: int, entries: list[TokenLogprobs],
                           tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Append a chunk's entries (scoring prompt tokens first, first + 1, ...) to a request's
    prompt logprobs; positions already there (recomputed after a preemption) are skipped."""
    new = entries[len(lps) - first :] if first <= len(lps) else []
    ids = [t for e in new for t in e.token_ids]
    # one batched decode for the chunk: a long prompt has (1 + k) tokens to name per position
    texts = tokenizer.batch_decode([[t] for t in ids]) if tokenizer is not None else [None] * len(ids)
    k = 0
    for e in new:
        # the prompt's own token first, whatever its rank (vLLM's order), then the top k
        entry = {e.token_ids[0]: Logprob(e.logprobs[0], e.rank, texts[k])}
        for r in range(1, len(e.token_ids)):
            entry.setdefault(e.token_ids[r], Logprob(e.logprobs[r], r, texts[k + r]))
        lps.append(entry)
        k += len(e.token_ids)
