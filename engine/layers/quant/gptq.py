"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout): int4/int8 values packed little-endian into int32
along the input dim (qweight [in / pack, out]), zero points packed along the output dim (qzeros
[num_groups, out / pack]; checkpoint_format gptq stores zero - 1, gptq_v2 the zero), scales
[num_groups, out] and g_idx [in], each input column's group (a permutation of groups with desc_act).
Kept packed; a matmul dequantizes in torch, or runs gantry_kernels.quant_gemm on CUDA.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError
from engine.layers.embed_head import ParallelLMHead, QuantParallelLMHead, VocabParallelEmbedding
from engine.layers.quant import QuantizationConfig
from engine.layers.quant.packed import PackedDest, PackedSource


def config_field(qc: dict[str, Any], keys: tuple[str, ...], allowed: tuple, default: Any = None) -> Any:
    """The first of `keys` present in qc (libraries spell some fields differently), checked."""
    key = next((k for k in keys if k in qc), keys[0])
    value = qc.get(key, default)
    if value not in allowed:
        raise ConfigError(f"quantization_config.{key}", f"{value!r} is not supported (supported: {allowed})")
    return value


def group_size_of(qc: dict[str, Any], keys: tuple[str, ...]) -> int:
    """group_size: -1 (one group per row) or a positive integer."""
    key = next((k for k in keys if k in qc), keys[0])
    value = qc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or value > 0):
        raise ConfigError(f"quantization_config.{key}", f"must be -1 or a positive integer, got {value!r}")
    return value


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., n / pack] words -> int32 [..., n] unsigned values, value j of a word at bits j * bits."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1)


def midpoint_word(bits: int, zero_offset: int = 0) -> int:
    """The int32 word whose every value is 2**(bits-1) - zero_offset: the symmetric zero point as stored
    (zero_offset 1: gptq v1 stores zero - 1)."""
    word = sum((1 << (bits - 1)) - zero_offset << shift for shift in range(0, 32, bits))
    return word - (1 << 32) if word >= 1 << 31 else word


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of unpack_cols: int [..., n] values in [0, 2**bits) -> int32 [..., n / pack]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (values.to(torch.int64).reshape(*values.shape[:-1], -1, 32 // bits) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                    bits: int, group_size: int) -> torch.Tensor:
    """float [out, in] = (q - zero[g]) * scale[g] with g = g_idx[k] (k // group_size without g_idx), the
    zeros as gptq_v2 stores them; computed in float32, returned in the scales' dtype."""
    q = unpack_cols(qweight.t(), bits).t()  # [in, out]: values of one word run down the input dim
    zeros = unpack_cols(qzeros, bits)  # [num_groups, out]
    if g_idx is None:
        g_idx = torch.arange(q.shape[0], device=q.device) // (q.shape[0] if group_size == -1 else group_size)
    g_idx = g_idx.long()
    w = (q - zeros[g_idx]).to(torch.float32) * scales[g_idx].to(torch.float32)  # [in, out]
    return w.t().to(scales.dtype)


class GPTQConfig(QuantizationConfig):
    """config.json's quantization_config as AutoGPTQ / GPTQModel write it."""

    name = "gptq"

    def __init__(self, qc: dict[str, Any]):
        self.bits: int = config_field(qc, ("bits",), (4, 8))
        self.group_size: int = group_size_of(qc, ("group_size",))
        self.desc_act: bool = config_field(qc, ("desc_act",), (True, False), False)
        config_field(qc, ("sym",), (True, False), True)  # asymmetric zeros are stored like symmetric ones
        self.checkpoint_format: str = config_field(qc, ("checkpoint_format", "format"), ("gptq", "gptq_v2"), "gptq")
        config_field(qc, ("pack_dtype",), ("int32", None))
        self.lm_head: bool = bool(config_field(qc, ("lm_head",), (False, True, None)))  # GPTQModel's lm_head=True
        if qc.get("dynamic"):
            raise ConfigError("quantization_config.dynamic", "per-module overrides are not supported")

    def get_linear_method(self) -> PackedLinearMethod:
        return PackedLinearMethod(self.bits, self.group_size, self.desc_act,
                                  zero_offset=1 if self.checkpoint_format == "gptq" else 0, layout="gptq")

    def embedding_classes(self) -> tuple[type, type]:
        return VocabParallelEmbedding, partial(QuantParallelLMHead, quant_config=self) if self.lm_head else ParallelLMHead


class PackedLinearMethod:
    """A linear layer's weight as GPTQ tensors (in memory always the gptq_v2 layout; AWQ checkpoints
    are repacked to it at load). The checkpoint's tensors pass through the layer's own weight_loader
    seen in an [out, in] orientation (engine.layers.quant.packed), so the column/row/fused sharding is
    the float weight's."""

    def __init__(self, bits: int, group_size: int, desc_act: bool, zero_offset: int, layout: str):
        self.bits, self.group_size, self.desc_act = bits, group_size, desc_act
        self.zero_offset = zero_offset  # added to stored zeros (gptq v1 stores zero - 1)
        self.layout = layout  # the checkpoint's: "gptq" or "awq"

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        bits, pack = self.bits, 32 // self.bits
        row_parallel = layer.tp_dim == 1 and layer.tp_size > 1
        full_input = input_size * (layer.tp_size if layer.tp_dim == 1 else 1)
        group = full_input if self.group_size == -1 else self.group_size
        # desc_act or one group: every rank keeps all groups (g_idx picks them); else the input split cuts groups
        layer.split_groups = row_parallel and not self.desc_act and self.group_size != -1
        num_groups = -(-(input_size if layer.split_groups else full_input) // group)
        misfit = None
        if input_size % pack:
            misfit = f"{bits}-bit values are packed {pack} a word along the input dim, and this rank has {input_size}"
        elif layer.split_groups and input_size % group:
            misfit = f"group size {group} does not divide this rank's {input_size} input columns"
        dtype = torch.get_default_dtype()
        layer.register_parameter("weight", None)  # the packed parameters below stand for it
        if self.layout == "gptq":
            layer.qweight = nn.Parameter(torch.empty(input_size // pack, output_size, dtype=torch.int32), requires_grad=False)
            layer.g_idx = nn.Parameter(torch.empty(input_size, dtype=torch.int32), requires_grad=False)
            layer.g_idx.weight_loader = self._g_idx_loader(layer, input_size, group, num_groups, misfit)
            views = {"qweight": 1}  # output values packed a word: 1 (none)
        else:  # AWQ: qweight [in, out / 8], repacked after loading
            layer.qweight = nn.Parameter(torch.empty(input_size, output_size // pack, dtype=torch.int32), requires_grad=False)
            views = {"qweight": pack}
        layer.qzeros = nn.Parameter(torch.empty(num_groups, output_size // pack, dtype=torch.int32), requires_grad=False)
        layer.scales = nn.Parameter(torch.empty(num_groups, output_size, dtype=dtype), requires_grad=False)
        views.update(qzeros=pack, scales=1)
        for name, out_pack in views.items():
            getattr(layer, name).weight_loader = self._loader(layer, out_pack, name != "qweight", misfit)

    def _loader(self, layer: nn.Module, out_pack: int, per_group: bool, misfit: str | None) -> Any:
        """The layer's weight_loader, given the checkpoint tensor and our parameter in [out, in]
        orientation; per-group tensors whose groups every rank keeps whole are copied, not split."""
        whole_groups = per_group and layer.tp_dim == 1 and not layer.split_groups

        def load(param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
            if misfit is not None:
                raise RuntimeError(f"{misfit}; use a smaller tensor_parallel_size")
            source, dest = PackedSource(loaded, out_pack), PackedDest(param.data.t(), out_pack)
            if whole_groups:  # row parallel: this rank's output rows are all of them
                dest.copy_(source[:])
                return
            layer.weight_loader(_Param(dest), source, *shard_id)

        return load

    def _g_idx_loader(self, layer: nn.Module, input_size: int, group: int, num_groups: int, misfit: str | None) -> Any:
        """g_idx is split with the input dim (row parallel) and must be the same for the projections
        fused in one layer (GPTQ orders columns by the shared input's statistics)."""
        seen: list[bool] = []

        def load(param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
            if misfit is not None:
                raise RuntimeError(f"{misfit}; use a smaller tensor_parallel_size")
            full = loaded if isinstance(loaded, torch.Tensor) else loaded[:]
            start = layer.tp_rank * input_size if layer.tp_dim == 1 else 0
            if full.shape != (input_size * (layer.tp_size if layer.tp_dim == 1 else 1),):
                raise RuntimeError(f"expected {input_size} group indices on this rank, the checkpoint has {tuple(full.shape)}")
            g_idx = full[start : start + input_size].to(torch.int32)
            in_order = torch.arange(start, start + input_size, dtype=torch.int32) // group
            if not self.desc_act and not torch.equal(g_idx, in_order):  # it would be ignored: say so
                raise RuntimeError("the columns are not in group order, but quantization_config.desc_act is false")
            if layer.split_groups:  # this rank holds groups [start / group, ...) only
                g_idx = g_idx - start // group
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
                raise RuntimeError(f"group indices outside the {num_groups} groups of quantization_config.group_size")
            if seen and not torch.equal(param.data, g_idx.to(param.device)):
                raise RuntimeError(f"g_idx of shard {shard_id[0] if shard_id else ''!s} differs from the fused layer's "
                                   "other projections; one g_idx per fused matmul is supported")
            param.data.copy_(g_idx)
            seen.append(True)

        return load

    def load_shard(self, layer: nn.Module, loaded: Any, offset: int) -> None:
        raise AssertionError("packed layers have no `weight` parameter")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.zero_offset:  # gptq v1: zero - 1 stored, modulo 2**bits (AutoGPTQ adds 1 and masks)
            zeros = (unpack_cols(layer.qzeros.data, self.bits) + self.zero_offset) & ((1 << self.bits) - 1)
            layer.qzeros.data = pack_cols(zeros, self.bits)
        # without desc_act g_idx is k // group_size: the kernels compute it (and it cannot differ by rank)
        layer.use_g_idx = self.desc_act
        # zero points all 2**(bits-1) (sym=True; v1's offset added back above): the kernels skip reading them
        layer.midpoint_zeros = bool((layer.qzeros.data == midpoint_word(self.bits)).all())

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        g_idx = layer.g_idx if layer.use_g_idx else None
        return dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, g_idx, self.bits, self.group_size)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda:
            from gantry_kernels.quant_gemm import dequant_gemm

            g_idx = layer.g_idx if layer.use_g_idx else None
            zeros = None if layer.midpoint_zeros else layer.qzeros  # None: 2**(bits-1), as stored
            return dequant_gemm(x, layer.qweight, layer.scales, zeros, g_idx, self.bits, self.group_size,
                                "gptq", bias)
        return F.linear(x, self.dequantize(layer).to(x.dtype), bias)


class _Param:
    """What the layers' weight_loaders read of a parameter: its .data."""

    def __init__(self, data: PackedDest):
        self.data = data
