"""One parse of a GGUF file, shared by the model config, the tokenizer and the weight loader.

gguf's GGUFReader builds a numpy view per string of the vocabulary (seconds for a 49k-token
vocabulary, and it ran once per consumer); this reads the metadata and the tensor table once
with struct, builds the HF config (engine.gguf_config, without transformers) and the tokenizer
(transformers' own GGUF tables), and dequantizes the common block types in numpy (bit-equal to
gguf's dequantize).
"""
from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import ModelLoadError
from engine.gguf_config import GGUFConfig, gguf_hf_config_dict

if TYPE_CHECKING:  # torch only where tensors are made: the API process reads config and tokenizer without it
    import torch
    from transformers import PreTrainedTokenizerBase

# metadata value types of fixed size: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, GGML_BF16 = 0, 1, 2, 3, 8, 30
_FLOAT_TYPES = {GGML_F32: "float32", GGML_F16: "float16", GGML_BF16: "bfloat16"}  # torch dtype names
_FLOAT_BYTES = {GGML_F32: 4, GGML_F16: 2, GGML_BF16: 2}
_BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34}  # blocks of 32 weights with an f16 scale


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str  # llama.cpp's name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # torch order ([out, in] for a weight)
    ggml_type: int
    offset: int  # from the start of the file


@dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]  # llama.cpp's keys; string arrays (vocabulary, merges) as lists of str
    tensors: list[GGUFTensorInfo]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def iter_tensors(self, keep_blocks: bool = False) -> Iterator[tuple[GGUFTensorInfo, torch.Tensor]]:
        """(info, float32 tensor of info.shape), one at a time from a memory map of the file; with
        keep_blocks, a block-quantized tensor comes as its raw bytes, uint8 [rows, row_bytes]."""
        import torch

        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            for info in self.tensors:
                nbytes = _num_bytes(info.ggml_type, math.prod(info.shape))
                if nbytes is None:
                    raise ModelLoadError(self.path, f"tensor {info.name} has unknown ggml type {info.ggml_type}")
                if info.ggml_type not in _FLOAT_TYPES and info.shape[-1] % GGML_BLOCK_SIZES[info.ggml_type][0]:
                    raise ModelLoadError(self.path, f"tensor {info.name} rows of {info.shape[-1]} weights do not fill "
                                         f"whole {GGML_BLOCK_SIZES[info.ggml_type][0]}-weight blocks (corrupt?)")
                if info.offset + nbytes > len(data):
                    raise ModelLoadError(self.path, f"tensor {info.name} extends past the end of the file (truncated?)")
                raw = data[info.offset : info.offset + nbytes]
                if keep_blocks and info.ggml_type not in _FLOAT_TYPES and len(info.shape) == 2:
                    yield info, torch.from_numpy(np.array(raw).reshape(math.prod(info.shape[:-1]), -1))
                else:
                    yield info, dequantize(raw, info.ggml_type, info.shape, self.path, info.name)
        finally:
            del data  # unmap: touched pages would otherwise count in this process's RSS

    def hf_config_dict(self) -> dict[str, Any]:
        """The HF config's fields, as transformers derives them from the same metadata (engine.gguf_config)."""
        return gguf_hf_config_dict(self.path, self.metadata, {t.name for t in self.tensors})

    def hf_config(self) -> GGUFConfig:
        """The HF config as an object, without transformers."""
        return GGUFConfig(**self.hf_config_dict())

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The fast tokenizer transformers builds from this file's vocabulary and merges."""
        try:  # transformers >= 5 keeps its GGUF helpers here
            from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
        except ImportError:
            from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
        from transformers import PreTrainedTokenizerFast

        if "tokenizer.ggml.tokens" not in self.metadata:
            raise ModelLoadError(self.path, "the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
        groups = {
            group: {name: self.metadata[f"tokenizer.{key}"] for key, name in renames.items()
                    if f"tokenizer.{key}" in self.metadata}
            for group, renames in GGUF_TOKENIZER_MAPPING.items()
        }
        tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
        if tokenizer_dict.get("tokenizer_type") == "llama":
            tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece vocabularies
        tokens = tokenizer_dict["tokens"]
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise ModelLoadError(self.path, "tokenizer.ggml.tokens must be a non-empty array of strings")
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            token_id = self.metadata.get(f"tokenizer.ggml.{key}")
            if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
                raise ModelLoadError(self.path, f"tokenizer.ggml.{key} must be a token id, got {token_id!r}")
            tokenizer_config[name] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
        try:
            backend, extra = convert_gguf_tokenizer(self.architecture, tokenizer_dict)
            return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
        except Exception as e:  # the tokenizers library raises a bare Exception on merges or tokens it refuses
            raise ModelLoadError(self.path, f"cannot build the tokenizer from the GGUF metadata (tokenizer.ggml.*): "
                                 f"{type(e).__name__}: {e}") from None


class _BlockSizes(dict):
    """ggml type -> (weights per block, bytes per block), for every block type gguf knows."""

    def __missing__(self, ggml_type: int) -> tuple[int, int]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]


GGML_BLOCK_SIZES = _BlockSizes({t: (32, n) for t, n in _BLOCK_BYTES.items()})


def _num_bytes(ggml_type: int, numel: int) -> int | None:
    if ggml_type in _FLOAT_TYPES:
        return numel * _FLOAT_BYTES[ggml_type]
    if ggml_type in _BLOCK_BYTES:
        return numel // 32 * _BLOCK_BYTES[ggml_type]
    from gguf import GGML_QUANT_SIZES  # the other block types

    if ggml_type not in GGML_QUANT_SIZES:
        return None
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return numel // block_size * type_size


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], path: str = "", name: str = "") -> torch.Tensor:
    """float32 [*shape] from ggml blocks, equal to gguf.dequantize. The common types in a few
    single-threaded numpy passes (no OpenMP wait behind other processes); the rest by gguf
    (a type it cannot dequantize is a QuantizationError naming the tensor `name` of `path`)."""
    import torch

    if ggml_type in _FLOAT_TYPES:
        return torch.from_numpy(raw.copy()).view(getattr(torch, _FLOAT_TYPES[ggml_type])).reshape(shape).float()
    if ggml_type in _BLOCK_BYTES:
        blocks = raw.reshape(-1, _BLOCK_BYTES[ggml_type])  # [num_blocks, block_bytes] uint8
        num_blocks = blocks.shape[0]
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [num_blocks, 1] scale
        out = np.empty((num_blocks, 32), dtype=np.float32)  # 32 weights per block
        if ggml_type == GGML_Q8_0:
            np.multiply(blocks[:, 2:].view(np.int8), d, out=out)
            return torch.from_numpy(out).reshape(shape)
        qs = blocks[:, -16:]  # 32 nibbles: low halves are weights 0..15, high halves 16..31
        q = np.empty((num_blocks, 32), dtype=np.uint8)
        np.bitwise_and(qs, 0x0F, out=q[:, :16])
        np.right_shift(qs, 4, out=q[:, 16:])
        if ggml_type == GGML_Q4_0:
            q = q.view(np.int8)
            q -= 8
            np.multiply(q, d, out=out)
        else:  # Q4_1: d * q + m
            np.multiply(q, d, out=out)
            out += blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        return torch.from_numpy(out).reshape(shape)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf import dequantize as gguf_dequantize

    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    rows = raw.reshape(*shape[:-1], shape[-1] // block_size * type_size)
    try:
        weights = gguf_dequantize(rows, GGMLQuantizationType(ggml_type))
    except NotImplementedError:
        from engine.layers.quant import QuantizationError

        kind = GGMLQuantizationType(ggml_type).name
        raise QuantizationError(path, name, f"ggml type {kind} cannot be run (no dequantization for it)") from None
    return torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).reshape(shape)


def _parse(path: str) -> GGUFFile:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelLoadError(path, "not a GGUF file (no GGUF magic bytes)")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ModelLoadError(path, f"GGUF version {version} is not supported (2 or 3)")
        pos = 24

        def string(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, pos)
            if n > len(buf) - pos - 8:  # the slice would stop at the end and decode the rest of the file
                raise ModelLoadError(path, f"corrupt GGUF file (a string of {n} bytes at offset {pos} runs past "
                                     "the end)")
            return buf[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n

        def value(pos: int, vtype: int) -> tuple[Any, int]:
            if vtype in _SCALAR:
                fmt = _SCALAR[vtype]
                return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
            if vtype == _STRING:
                return string(pos)
            if vtype == _ARRAY:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if count > len(buf) - pos:  # every element takes a byte at least
                    raise ModelLoadError(path, f"corrupt GGUF metadata (an array of {count} elements)")
                if etype == _ARRAY:  # llama.cpp refuses them too; nested deep they were a RecursionError
                    raise ModelLoadError(path, "corrupt GGUF metadata (an array of arrays)")
                if etype in _SCALAR:
                    fmt = _SCALAR[etype]
                    items = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos))
                    return items, pos + count * struct.calcsize(fmt)
                items = []
                for _ in range(count):
                    item, pos = value(pos, etype)
                    items.append(item)
                return items, pos
            raise ModelLoadError(path, f"corrupt GGUF metadata (value type {vtype})")

        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            metadata[key], pos = value(pos + 4, vtype)
        table = []
        names = set()
        for _ in range(num_tensors):
            name, pos = string(pos)
            (num_dims,) = struct.unpack_from("<I", buf, pos)
            if not 1 <= num_dims <= 4:  # ggml's GGML_MAX_DIMS
                raise ModelLoadError(path, f"corrupt GGUF tensor table (tensor {name} of {num_dims} dimensions)")
            dims = struct.unpack_from(f"<{num_dims}Q", buf, pos + 4)
            if 0 in dims:  # a reshape of its zero bytes escaped as a ValueError
                raise ModelLoadError(path, f"corrupt GGUF tensor table (tensor {name} of dimensions {dims})")
            if name in names:  # the later copy would load over the first, whichever is right
                raise ModelLoadError(path, f"corrupt GGUF tensor table (tensor {name} listed twice)")
            names.add(name)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * num_dims)
            pos += 4 + 8 * num_dims + 12
            table.append((name, tuple(reversed(dims)), ggml_type, offset))  # ggml lists the fastest dim first
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1:
            raise ModelLoadError(path, f"corrupt GGUF metadata (general.alignment {alignment!r})")
        data_start = -(-pos // alignment) * alignment
    tensors = [GGUFTensorInfo(name, shape, t, data_start + off) for name, shape, t, off in table]
    _check_no_overlap(path, tensors)
    return GGUFFile(path, metadata, tensors)


def _check_no_overlap(path: str, tensors: list[GGUFTensorInfo]) -> None:
    """No tensor's data runs into the next one's (llama.cpp checks each offset too): a tensor whose type
    or shape was corrupted to a larger size read its neighbours' bytes as weights. Tensors of an unknown
    type are left to iter_tensors, which names them."""
    spans = sorted((t.offset, t.offset + n, t.name) for t in tensors
                   if (n := _num_bytes(t.ggml_type, math.prod(t.shape))) is not None)
    for (_, end, name), (start, _, following) in zip(spans, spans[1:]):
        if end > start:
            raise ModelLoadError(path, f"tensor {name} runs {end - start} bytes into tensor {following}'s data "
                                 "(corrupt type or shape?)")


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return _parse(path)


def forget_parses() -> None:
    """Drop the cached parses (the API process, once its tokenizer is built, reads no more of the file)."""
    _cached.cache_clear()


def open_gguf(path: str) -> GGUFFile:
    """The parsed file, cached: the config, the tokenizer and the loader share one parse."""
    try:
        st = os.stat(path)
        return _cached(os.path.realpath(path), st.st_mtime_ns, st.st_size)
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(path, f"corrupt or unreadable GGUF file: {e}") from None
