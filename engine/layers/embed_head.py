"""Vocabulary-parallel embedding and LM head: the vocabulary is split over TP ranks
(padded to a multiple of tp_size); logits are gathered on the last pipeline stage."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import get_forward_context
from engine.layers.linear import LinearBase, check_loaded, dense_linear, materialize, shard
from engine.layers.quant import QuantizationConfig
from engine.parallel import get_parallel_state, tp_all_gather, tp_all_reduce


def lookup(layer: nn.Module, input_ids: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[num_tokens] -> [num_tokens, hidden]: rows(local ids) of this rank's slice of the vocabulary (a
    VocabParallelEmbedding's partition fields), summed over the TP ranks (ids of other ranks give zeros)."""
    if layer.tp_size == 1:
        return rows(input_ids)
    mask = (input_ids >= layer.vocab_start) & (input_ids < layer.vocab_end)
    y = rows((input_ids - layer.vocab_start) * mask)
    return tp_all_reduce(y * mask.unsqueeze(-1).to(y.dtype))


def sampled_logits(layer: nn.Module, hidden_states: torch.Tensor,
                   matmul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[num_tokens, hidden] -> [num_sampled, vocab], only at the sampled positions: matmul gives this rank's
    [num_sampled, vocab / tp] slice, gathered over the TP ranks (the last rank's padding dropped)."""
    logits = matmul(hidden_states[get_forward_context().logits_indices])
    if layer.tp_size > 1:
        logits = tp_all_gather(logits, dim=-1)[:, : layer.num_embeddings]
    return logits


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self._partition(num_embeddings)
        self.weight = nn.Parameter(torch.zeros(self.num_per_partition, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def _partition(self, num_embeddings: int) -> None:
        """This rank's slice of the vocabulary: rows [vocab_start, vocab_end)."""
        state = get_parallel_state()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.num_embeddings = num_embeddings
        self.num_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_per_partition
        self.vocab_end = min(self.vocab_start + self.num_per_partition, num_embeddings)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        check_loaded(loaded, (self.num_embeddings, param.shape[1]))  # [vocab, hidden], whole
        size = self.vocab_end - self.vocab_start
        param.data[:size].copy_(materialize(shard(loaded, 0, self.vocab_start, size)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        return lookup(self, input_ids, lambda ids: F.embedding(ids, self.weight))


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_sampled, vocab] in the model dtype, only at the sampled positions."""
        return sampled_logits(self, hidden_states, lambda h: dense_linear(h, self.weight, None))


class QuantVocabParallelEmbedding(LinearBase):
    """The token embedding kept quantized (compressed-tensors with "Embedding" in its targets): the
    vocabulary split of VocabParallelEmbedding (each rank rows [vocab_start, vocab_end), padded to
    num_per_partition), the packed table a [vocab, hidden] matrix of the quantization's linear method;
    the looked-up rows are dequantized per step."""

    def __init__(self, num_embeddings: int, embedding_dim: int, quant_config: QuantizationConfig):
        tp_size = get_parallel_state().tp_size
        super().__init__(embedding_dim, -(-num_embeddings // tp_size), False, 0, quant_config)
        VocabParallelEmbedding._partition(self, num_embeddings)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """This rank's vocabulary rows (the last rank's padding rows are never read: ids and logits stop at
        vocab_end)."""
        size = self.vocab_end - self.vocab_start
        self.store(param, shard(loaded, 0, self.vocab_start, size), 0, size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        return lookup(self, input_ids, lambda ids: self.quant_method.dequantize_rows(self, ids))


class QuantParallelLMHead(QuantVocabParallelEmbedding):
    """The LM head kept quantized (GPTQ's `lm_head: true`, compressed-tensors without lm_head in `ignore`):
    ParallelLMHead's vocabulary split, its matmul the quantization's linear method."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_sampled, vocab], only at the sampled positions."""
        return sampled_logits(self, hidden_states, lambda h: self.quant_method.apply(self, h))
