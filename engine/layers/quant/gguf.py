"""GGUF weights kept in their ggml blocks: Q4_0, Q4_1, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K are
matmul'd from the blocks (engine.layers.quant.ggml_cpu); other types are dequantized at load, with a log
line naming them. Shards are cut on block boundaries: a split inside a block is a QuantizationError.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.gguf_file import GGML_BLOCK_SIZES, dequantize
from engine.layers.embed_head import VocabParallelEmbedding, lookup, sampled_logits
from engine.layers.quant import QuantizationConfig, QuantizationError
from engine.layers.quant.ggml_cpu import BLOCK_BYTES, dequantize_rows, ggml_linear

logger = logging.getLogger("gantry.engine")


@dataclass
class GGUFBlocks:
    """One quantized GGUF tensor (or a shard of it) as its raw blocks. Sliced like a safetensors
    slice (see engine.layers.linear.shard), on block boundaries only."""

    path: str  # the file, for errors
    name: str  # the checkpoint tensor name, for errors
    ggml_type: int
    data: torch.Tensor  # uint8 [rows, cols / block_size * block_bytes]
    cols: int  # weights per row

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> GGUFBlocks:
        rows, cols = (index + (slice(None),))[:2] if isinstance(index, tuple) else (index, slice(None))
        start, stop, _ = cols.indices(self.cols)
        block_size, block_bytes = GGML_BLOCK_SIZES[self.ggml_type]
        if start % block_size or stop % block_size:
            raise QuantizationError(self.path, self.name, f"columns [{start}, {stop}) of this rank's shard do not fall "
                                    f"on its {block_size}-weight block boundaries (tensor_parallel_size must "
                                    f"split the {self.cols} columns into multiples of {block_size})")
        data = self.data[rows, start // block_size * block_bytes : stop // block_size * block_bytes]
        return GGUFBlocks(self.path, self.name, self.ggml_type, data, stop - start)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], as gguf.dequantize computes it."""
        raw = self.data.contiguous().numpy()
        return dequantize(np.ascontiguousarray(raw).reshape(-1), self.ggml_type, self.shape, self.path, self.name)


def _finish(param: nn.Parameter, shards: list[tuple[int, Any]], what: str, rows: int, device: torch.device,
            dtype: torch.dtype) -> None:
    """Turn the loaded shards (row offset, GGUFBlocks or float tensor) into param's data: the blocks
    themselves when all share one kept type, else float weights (and a log line saying why)."""
    shards = [s for _, s in sorted(shards, key=lambda s: s[0])]
    types = {s.ggml_type if isinstance(s, GGUFBlocks) else None for s in shards}
    kept = len(types) == 1 and next(iter(types)) in BLOCK_BYTES
    if kept:
        data = torch.cat([s.data for s in shards]).contiguous()
        param.ggml_type = next(iter(types))
    else:
        names = [s.name for s in shards if isinstance(s, GGUFBlocks)]
        if names:
            why = "mixed types in one fused matmul" if len(types) > 1 else "no block kernel for this type"
            logger.info("GGUF: %s dequantized at load (%s)", ", ".join(names), why)
        data = torch.cat([s.dequantize() if isinstance(s, GGUFBlocks) else s for s in shards]).to(dtype)
        param.ggml_type = None
    cols = shards[0].cols if isinstance(shards[0], GGUFBlocks) else shards[0].shape[1]
    if data.shape[0] < rows:  # vocabulary padding: all-zero blocks are zero weights
        data = torch.cat([data, data.new_zeros(rows - data.shape[0], data.shape[1])])
    assert data.shape[0] == rows, (what, data.shape, rows)
    param.data = data.to(device)
    param.num_cols = cols


def _placeholder(rows: int, cols: int) -> nn.Parameter:
    """A weight whose storage arrives with the checkpoint (its type is per tensor in GGUF)."""
    # [rows, cols] over one element: the loaders read its shape; set_data needs a real device
    param = nn.Parameter(torch.empty(1).expand(rows, cols), requires_grad=False)
    param.accepts_gguf_blocks = True
    param.gguf_shards = []
    return param


def _matmul(x: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
    if weight.ggml_type is None:
        return F.linear(x, weight)
    return ggml_linear(x, weight.data, weight.ggml_type, weight.num_cols).to(x.dtype)


class GGUFLinearMethod:
    """The weight of a linear layer as GGUF blocks (vLLM's LinearMethodBase verbs)."""

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        layer.weight = _placeholder(output_size, input_size)
        layer.weight.weight_loader = layer.weight_loader
        layer.weight_device = torch.empty(0).device  # the device the model is being built on
        layer.weight_dtype = torch.get_default_dtype()

    def load_shard(self, layer: nn.Module, loaded: Any, offset: int) -> None:
        loaded = loaded[:] if isinstance(loaded, GGUFBlocks) else loaded
        if loaded.shape[1] != layer.weight.shape[1] or offset + loaded.shape[0] > layer.weight.shape[0]:
            raise RuntimeError(f"rows [{offset}, {offset + loaded.shape[0]}) x {loaded.shape[1]} columns do not fit "
                               f"the weight's {tuple(layer.weight.shape)}")
        layer.weight.gguf_shards.append((offset, loaded))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        w = layer.weight
        if w.gguf_shards:
            _finish(w, w.gguf_shards, type(layer).__name__, w.shape[0], layer.weight_device, layer.weight_dtype)
            del w.gguf_shards

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = _matmul(x, layer.weight)
        return y if bias is None else y + bias


class GGUFVocabParallelEmbedding(VocabParallelEmbedding):
    """The token embedding kept in blocks; looked-up rows are dequantized (exactly) per step."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        nn.Module.__init__(self)  # not the parent's: it would allocate the float table
        self._partition(num_embeddings)
        self.weight = _placeholder(self.num_per_partition, embedding_dim)
        self.weight.weight_loader = self.weight_loader
        self.weight_device, self.weight_dtype = torch.empty(0).device, torch.get_default_dtype()

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        size = self.vocab_end - self.vocab_start
        rows = loaded[self.vocab_start : self.vocab_start + size]
        param.gguf_shards.append((0, rows))

    def process_weights_after_loading(self) -> None:
        w = self.weight
        if getattr(w, "gguf_shards", None):  # a tied LM head shares (and finished) this parameter
            _finish(w, w.gguf_shards, type(self).__name__, self.num_per_partition, self.weight_device, self.weight_dtype)
            del w.gguf_shards

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        w = self.weight
        if w.ggml_type is None:
            return F.embedding(ids, w)
        return dequantize_rows(w.data, w.ggml_type, w.num_cols, ids).to(self.weight_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return lookup(self, input_ids, self._rows)


class GGUFParallelLMHead(GGUFVocabParallelEmbedding):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_sampled, vocab], only at the sampled positions."""
        return sampled_logits(self, hidden_states, lambda h: _matmul(h, self.weight))



class GGUFConfig(QuantizationConfig):
    name = "gguf"

    def get_linear_method(self) -> GGUFLinearMethod:
        return GGUFLinearMethod()

    def embedding_classes(self) -> tuple[type, type]:
        return GGUFVocabParallelEmbedding, GGUFParallelLMHead
