"""Tensor-parallel linear layers; each parameter carries a weight_loader that takes the full
checkpoint tensor (or a lazy slice of it) and copies this rank's shard.

A "loaded" tensor here is anything with .shape that supports slicing with narrow-like
indexing and .to(): a torch.Tensor or a safetensors slice (see engine/loader.py).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.quant import QuantizationConfig
from engine.lora.punica import current_lora_batch
from engine.parallel import divide, get_parallel_state, tp_all_reduce


def shard(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows/cols [start, start + size) of `loaded` along dim, read lazily when it is a slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def materialize(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


# safetensors dtype names of floating-point tensors (a slice's get_dtype())
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_loaded(loaded: Any, expected: tuple[int, ...]) -> None:
    """A float weight's checkpoint tensor, whole (before this rank's shard), is floating point and of
    `expected` shape: copy_ broadcasts [1, N] over [M, N] (or a bias [1] over [N]), a slice clamps and
    narrow cuts a longer tensor to this rank's rows, and an integer tensor converts, all silently.
    Raises ValueError; the loader names the file, the tensor and the parameter."""
    if isinstance(loaded, torch.Tensor):
        shape, is_float, dtype = tuple(loaded.shape), loaded.is_floating_point(), str(loaded.dtype)
    elif not hasattr(loaded, "get_dtype"):  # GGUF blocks: engine.loader.iter_gguf checked their shape
        return
    else:  # a safetensors slice
        shape, dtype = tuple(loaded.get_shape()), loaded.get_dtype()
        is_float = dtype in _FLOAT_DTYPES
    if shape != tuple(expected):
        raise ValueError(f"expected shape {tuple(expected)}")
    if not is_float:
        raise ValueError(f"expected floating-point weights, got {dtype}")


# one-row decode on the GPU streams bf16/fp16 weights through gantry_kernels/weight_gemv.py (4-8 whole rows a program,
# no split-K reduce) instead of cuBLAS: W1's projections at 0.70-0.98 of read bandwidth against cuBLAS's 0.52-0.84
# (benchmarks/decode_gemv_bench.py; at 2 rows cuBLAS wins); GANTRY_DENSE_GEMV=0 keeps cuBLAS (A/B runs)
DENSE_GEMV = os.environ.get("GANTRY_DENSE_GEMV", "1") != "0"


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias); one row on the GPU through the decode GEMV."""
    if (DENSE_GEMV and x.is_cuda and x.numel() == x.shape[-1] and weight.dtype in (torch.bfloat16, torch.float16)
            and x.dtype == weight.dtype and weight.stride(1) == 1):
        from gantry_kernels.weight_gemv import weight_gemv

        return weight_gemv(x.reshape(1, -1).contiguous(), weight, None, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None,
                 quant_config: QuantizationConfig | None = None):
        super().__init__()
        state = get_parallel_state()
        self.tp_rank, self.tp_size, self.tp_dim = state.tp_rank, state.tp_size, tp_dim
        self.quant_method = quant_config.get_linear_method() if quant_config is not None else None
        if self.quant_method is None:
            self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        else:
            self.quant_method.create_weights(self, output_size, input_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.lora = None  # an engine.lora.layers.LoRALinear when LoRA is enabled

    def add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus this batch's adapter deltas; free when no adapter is in the batch."""
        batch = current_lora_batch() if self.lora is not None else None
        return y if batch is None else self.lora.apply(batch, x, y)

    def plain_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight^T (+ bias) with this batch's adapter deltas; augmented-K LoRA folds them into the GEMM."""
        batch = current_lora_batch() if self.lora is not None else None
        if batch is not None and self.lora.augmented:
            return self.lora.linear(batch, x, bias)
        return self.add_lora(x, dense_linear(x, self.weight, bias))

    def is_float_param(self, param: nn.Parameter) -> bool:
        """Whether param is this layer's weight or bias in the checkpoint's [out, in] / [out] layout (float,
        or FP8 and GGUF weights, whose blocks engine.loader.iter_gguf checked); a quantization's packed
        tensors pass in its own views and shapes: its loaders check them."""
        return param is self.bias or param is getattr(self, "weight", None)

    def weight_loader(self, param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
        """Every checkpoint tensor's way into param: a float weight or bias is checked whole against the
        checkpoint's shape (check_loaded), then this rank's shard is stored (store_shard)."""
        if self.is_float_param(param):
            check_loaded(loaded, self.checkpoint_shape(param, *shard_id))
        self.store_shard(param, loaded, *shard_id)

    def checkpoint_shape(self, param: nn.Parameter, *shard_id: Any) -> tuple[int, ...]:
        """The whole checkpoint tensor's shape (before this rank's shard) of param's shard_id."""
        return tuple(param.shape)

    def store_shard(self, param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
        """This rank's shard of the checkpoint tensor `loaded` into param."""
        self.store(param, loaded)

    def store(self, param: nn.Parameter, loaded: Any, offset: int = 0, size: int | None = None) -> None:
        """Copy a checkpoint shard into param (rows [offset, offset + size) when size is given); a
        quantized weight keeps the shard as the checkpoint stores it."""
        if self.quant_method is not None and param is self.weight:
            self.quant_method.load_shard(self, loaded, offset)
            return
        dst = param.data if size is None else param.data.narrow(0, offset, size)
        dst.copy_(materialize(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.add_lora(x, self.quant_method.apply(self, x, self.bias))
        return self.plain_linear(x, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None):
        super().__init__(input_size, output_size, bias, None, quant_config)


class ColumnParallelLinear(LinearBase):
    """Output features split over TP ranks; no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None):
        tp_size = get_parallel_state().tp_size
        super().__init__(input_size, divide(output_size, tp_size, "output size"), bias, 0, quant_config)

    def checkpoint_shape(self, param: nn.Parameter, *shard_id: Any) -> tuple[int, ...]:
        return (param.shape[0] * self.tp_size, *param.shape[1:])

    def store_shard(self, param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
        size = param.data.shape[0]
        self.store(param, shard(loaded, 0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj and up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_config: QuantizationConfig | None = None):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, quant_config)

    def checkpoint_shape(self, param: nn.Parameter, shard_id: int) -> tuple[int, ...]:
        return (self.output_sizes[shard_id], *param.shape[1:])

    def store_shard(self, param: nn.Parameter, loaded: Any, shard_id: int) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        self.store(param, shard(loaded, 0, self.tp_rank * size, size), offset, size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads split over TP ranks. When tp_size exceeds
    the KV head count, each KV head is replicated on tp_size / num_kv_heads ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None):
        tp_size = get_parallel_state().tp_size
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp_size, "num_attention_heads")
        if tp_size >= num_kv_heads:
            divide(tp_size, num_kv_heads, "tensor_parallel_size over num_key_value_heads")
            self.num_kv_heads = 1
        else:
            self.num_kv_heads = divide(num_kv_heads, tp_size, "num_key_value_heads")
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias, quant_config)

    def _rows(self, shard_id: str) -> tuple[int, int, int]:
        """(offset, size, replicas): shard_id's rows in our weight, and the ranks that hold the same heads."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q_size, 1
        return q_size + (kv_size if shard_id == "v" else 0), kv_size, self.kv_replicas

    def checkpoint_shape(self, param: nn.Parameter, shard_id: str) -> tuple[int, ...]:
        _, size, replicas = self._rows(shard_id)  # the checkpoint's heads: ours times the ranks over their replicas
        return (size * (self.tp_size // replicas), *param.shape[1:])

    def store_shard(self, param: nn.Parameter, loaded: Any, shard_id: str) -> None:
        offset, size, replicas = self._rows(shard_id)
        self.store(param, shard(loaded, 0, self.tp_rank // replicas * size, size), offset, size)


class RowParallelLinear(LinearBase):
    """Input features split over TP ranks; partial outputs are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None):
        tp_size = get_parallel_state().tp_size
        super().__init__(divide(input_size, tp_size, "input size"), output_size, bias, 1, quant_config)

    def checkpoint_shape(self, param: nn.Parameter, *shard_id: Any) -> tuple[int, ...]:
        if param.dim() == 1:  # bias: whole on every rank
            return tuple(param.shape)
        return (param.shape[0], param.shape[1] * self.tp_size)

    def store_shard(self, param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
        if param.data.dim() == 1:  # bias: added once, after the reduce
            self.store(param, loaded)
            return
        size = param.data.shape[1]
        self.store(param, shard(loaded, 1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # partial deltas (A split on its input) summed by the all-reduce
        y = self.plain_linear(x, None) if self.quant_method is None else self.add_lora(x, self.quant_method.apply(self, x))
        if self.tp_size > 1:
            y = tp_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
