"""GPTQ / AWQ tensors seen as [out, in] by the parallel layers' weight_loaders: checkpoints store them
transposed ([in, out]), some with the output dim packed `out_pack` values a word. The loaders then
shard them exactly like a float weight (column, row, fused q/k/v and gate/up), in output units.
"""
from __future__ import annotations

from typing import Any

import torch


def _packed(start: int, stop: int, out_pack: int, what: str) -> slice:
    if start % out_pack or stop % out_pack:
        raise RuntimeError(f"{what} rows [{start}, {stop}) split a word of {out_pack} packed values "
                           "(the output dim of each shard must be a multiple of it)")
    return slice(start // out_pack, stop // out_pack)


class PackedSource:
    """A checkpoint tensor (torch.Tensor or safetensors slice) stored [in, out / out_pack], indexed
    as [out, in]; reads return torch tensors [out / out_pack, in] (only the slice asked for)."""

    def __init__(self, loaded: Any, out_pack: int):
        self.loaded, self.out_pack = loaded, out_pack
        stored = tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())
        if len(stored) != 2:
            raise RuntimeError(f"expected a 2-D tensor, got shape {stored}")
        self.stored_shape = stored

    def get_shape(self) -> list[int]:
        return [self.stored_shape[1] * self.out_pack, self.stored_shape[0]]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        out_start, out_stop, _ = rows.indices(self.get_shape()[0])
        packed_rows = _packed(out_start, out_stop, self.out_pack, "checkpoint")
        return self.loaded[cols, packed_rows].t()


class PackedDest:
    """A parameter's storage (viewed [out / out_pack, in]) as the [out, in] tensor the loaders write."""

    def __init__(self, data: torch.Tensor, out_pack: int):
        self.data, self.out_pack = data, out_pack

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0] * self.out_pack, self.data.shape[1])

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> PackedDest:
        if dim == 1:
            return PackedDest(self.data.narrow(1, start, length), self.out_pack)
        rows = _packed(start, start + length, self.out_pack, "parameter")
        return PackedDest(self.data[rows], self.out_pack)

    def copy_(self, src: torch.Tensor) -> None:
        if tuple(src.shape) != tuple(self.data.shape):
            raise RuntimeError(f"a shard of {tuple(src.shape)} (stored [out / {self.out_pack}, in]) does not fit "
                               f"{tuple(self.data.shape)}")
        self.data.copy_(src)
