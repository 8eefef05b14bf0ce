"""The sampler's per-row inputs of one step (SamplingMetadata), built from the runner's request states,
and the pinned host-to-device copy every step's inputs take."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.layers.sampler import SamplingMetadata
from engine.sampling_params import mix_seed

if TYPE_CHECKING:
    from engine.model_runner import RunnerRequestState

# float32-safe bounds for user floats: past them the sampled distribution no longer changes
# (uniform for a huge temperature; seen tokens forced or banned for an extreme repetition
# penalty), while float32 would overflow to inf and turn the logits into nan.
MAX_TEMPERATURE = 1e30
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-20, 1e20


def to_device(x: np.ndarray | list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data to the device without waiting for the step in flight: a pinned copy is
    queued behind it (a pageable copy would wait for the device to go idle)."""
    host = torch.as_tensor(x, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def build_sampling_metadata(states: list[RunnerRequestState], vocab: int, device: torch.device,
                            default_generator: torch.Generator | None) -> SamplingMetadata:
    """One row per state, in order: temperatures, top-k/p, min-p, seeded generators, min_tokens bans,
    penalties (token counts scattered on the device) and the most logprobs any row asks for."""
    params = [s.sampling_params for s in states]
    n, dev = len(states), device

    def to_dev(x: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(x, dtype, device)

    top_k = [min(p.top_k, vocab) or vocab for p in params]  # larger than the vocabulary: off
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    generators: dict[int, torch.Generator] = {}
    min_tokens_mask: list[tuple[int, torch.Tensor]] = []
    for row, (state, p) in enumerate(zip(states, params)):
        num_output = len(state.token_ids) - p.num_prompt_tokens
        if p.seed is not None and p.temperature > 0:
            # re-seeded per position: the same text whatever the batch, preemptions included
            generators[row] = torch.Generator(device=dev).manual_seed(mix_seed(p.seed, num_output))
        if num_output < p.min_tokens:
            banned = sorted(t for t in set(p.stop_token_ids) | set(p.eos_token_ids) if t < vocab)
            min_tokens_mask.append((row, to_dev(banned, torch.long)))
    md = SamplingMetadata(
        temperature=to_dev([min(p.temperature, MAX_TEMPERATURE) for p in params], torch.float32),
        top_k=to_dev(top_k, torch.long) if any(k < vocab for k in top_k) else None,
        top_p=to_dev(top_p, torch.float32) if any(v < 1.0 for v in top_p) else None,
        min_p=to_dev(min_p, torch.float32) if any(v > 0 for v in min_p) else None,
        all_greedy=all(p.temperature == 0 or p.top_k == 1 for p in params),
        generators=generators, default_generator=default_generator, min_tokens_mask=min_tokens_mask,
    )
    if any(p.has_penalties for p in params):
        # (row, token) pairs of generated and of prompt tokens, scattered on the device
        out_rows, out_ids, prompt_rows, prompt_ids = [], [], [], []
        for row, (state, p) in enumerate(zip(states, params)):
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
        md.presence_penalty = to_dev([p.presence_penalty for p in params], torch.float32)
        md.frequency_penalty = to_dev([p.frequency_penalty for p in params], torch.float32)
        md.repetition_penalty = to_dev([min(max(p.repetition_penalty, MIN_REPETITION_PENALTY),
                                            MAX_REPETITION_PENALTY) for p in params], torch.float32)
    logprobs = [p.logprobs for p in params if p.logprobs is not None]
    md.max_num_logprobs = min(max(logprobs), vocab) if logprobs else None
    return md
