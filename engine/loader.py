"""Weights into the model, one tensor at a time: safetensors (sharded, sliced per rank),
GGUF (dequantized by engine.gguf_file) and dummy (random, for benchmarks).

Each checkpoint tensor goes to its parameter's weight_loader, which copies only this rank's
shard, so peak host memory stays about one tensor (or one shard) above the model; once a float
parameter's tensors are in, it is checked for NaN and inf on its device (one sum).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from engine import startup
from engine.errors import ModelLoadError
from engine.gguf_file import open_gguf
from engine.layers.linear import LinearBase, check_loaded, materialize
from engine.layers.quant.dummy import fill_dummy_quantized
from engine.layers.quant.fp8_kv import take_kv_scale
from engine.layers.quant.gguf import GGUFBlocks
from engine.lora.adapter import SUPPORTED_MODULES, ModelDims
from engine.model_config import ModelConfig
from engine.tensor_checks import all_finite

logger = logging.getLogger("gantry.engine")


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(index, f"corrupt index: {e}") from None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(index, f"corrupt index: weight_map must map tensor names to files, got {type(weight_map).__name__}")
        for tensor, name in weight_map.items():  # a file name in the model directory, not a path out of it
            if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
                raise ModelLoadError(index, f"corrupt index: weight_map[{tensor!r}] = {name!r} is not a file name in {path}")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise ModelLoadError(file, "listed in model.safetensors.index.json but missing")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(path, "no *.safetensors weight files found")
    return files


def iter_safetensors(path: str) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) pairs; a slice reads from disk only the rows/cols asked of it."""
    for _, name, loaded in iter_safetensors_files(path):
        yield name, loaded


def iter_safetensors_files(path: str) -> Iterator[tuple[str, str, Any]]:
    """(file, name, lazy slice): iter_safetensors with the shard file each tensor is in, for errors to name."""
    from safetensors import SafetensorError, safe_open

    seen: dict[str, str] = {}  # tensor name -> the file that held it
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                names = list(f.keys())
            for name in names:
                if name in seen:  # the later copy would overwrite the first, whichever is right
                    raise ModelLoadError(file, f"tensor {name!r} is also in {seen[name]}")
                seen[name] = file
                # Reopened per tensor: pages read through the memory map count in this process's
                # RSS until it is unmapped, so one open file would hold all of it that we touched.
                with safe_open(file, framework="pt") as f:
                    yield file, name, f.get_slice(name)
        except (SafetensorError, OSError) as e:
            raise _unreadable(file, e) from None


def _unreadable(file: str, e: Exception) -> ModelLoadError:
    """A shard safetensors refuses (SafetensorError) or the OS cannot open: a directory or a dangling link
    named *.safetensors, a file this user may not read (its OSError escaped as a traceback)."""
    if isinstance(e, OSError):
        return ModelLoadError(file, f"cannot read the weights file: {e}")
    return ModelLoadError(file, f"corrupt safetensors file: {e}")


def _layer_index(file: str, name: str, architecture: str) -> int | None:
    """The layer of checkpoint tensor `name` (model.layers.<i>.*), None outside the layers. An index that is
    not a plain number is refused: model.layers.abc.* escaped as a ValueError, and model.layers.-1.* or
    model.layers.1_0.* were skipped without a word."""
    if not name.startswith("model.layers."):
        return None
    index = name.split(".")[2]
    if not re.fullmatch(r"0|[1-9][0-9]*", index):
        raise ModelLoadError(file, f"unexpected tensor {name!r} for {architecture}: {index!r} is not a layer number")
    return int(index)


def _checkpoint_table(model_config: ModelConfig) -> Iterator[tuple[str, str, tuple[int, ...], str]]:
    """(file, HF name, shape, the tensor as an error names it) of every checkpoint tensor, from the GGUF
    tensor table or the safetensors headers: no weights are read."""
    if model_config.load_format == "gguf":
        for info in open_gguf(model_config.path).tensors:
            name = gguf_hf_name(info.name)
            if name is not None:
                yield model_config.path, name, tuple(info.shape), f"tensor {info.name} ({name})"
        return
    from safetensors import SafetensorError, safe_open

    for file in _safetensors_files(model_config.path):
        try:
            with safe_open(file, framework="pt") as f:
                table = [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]
        except (SafetensorError, OSError) as e:
            raise _unreadable(file, e) from None
        for name, shape in table:
            yield file, name, shape, f"tensor {name!r}"


def check_checkpoint_sizes(model_config: ModelConfig) -> None:
    """Before the model is built: the checkpoint holds every one of num_hidden_layers layers, and each float
    weight or bias has the shape the config gives it. A size in config.json or the GGUF metadata far beyond
    the weights (num_hidden_layers 10**6, hidden_size 2**20, llama.embedding_length 2**31) built a model of
    terabytes first: killed for memory, or a raw allocator error naming nothing."""
    if model_config.load_format == "dummy":
        return
    hf, is_gguf = model_config.hf_config, model_config.load_format == "gguf"
    layers: set[int] = set()
    for file, name, shape, label in _checkpoint_table(model_config):
        layer = _layer_index(file, name, model_config.architecture)
        if layer is not None and layer >= hf.num_hidden_layers:
            raise ModelLoadError(file, f"tensor {name!r} is beyond the model's layers: "
                                 f"config num_hidden_layers is {hf.num_hidden_layers}")
        if layer is not None:
            layers.add(layer)
        expected = gguf_expected_shape(name, hf) if name.rpartition(".")[2] in ("weight", "bias") else None
        if expected is None or shape == expected:
            continue
        if is_gguf:
            raise ModelLoadError(file, f"{label} of shape {shape}: expected {expected} from the file's metadata")
        raise ModelLoadError(file, f"{label} of shape {shape} does not fit the model config: expected shape {expected}")
    missing = next(i for i in range(hf.num_hidden_layers + 1) if i not in layers)  # not a set of range(10**9)
    if missing < hf.num_hidden_layers:
        raise ModelLoadError(model_config.path, f"config num_hidden_layers is {hf.num_hidden_layers}, but the "
                             f"checkpoint has no tensors of layer {missing}")


# GGUF tensor names -> HF names (llama.cpp's naming for Llama/Qwen2/Qwen3)
_GGUF_NAMES = [
    (r"^token_embd\.", "model.embed_tokens."),
    (r"^output_norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^blk\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blk\.(\d+)\.attn_q_norm\.", r"model.layers.\1.self_attn.q_norm."),
    (r"^blk\.(\d+)\.attn_k_norm\.", r"model.layers.\1.self_attn.k_norm."),
    (r"^blk\.(\d+)\.attn_q\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.ffn_gate\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^blk\.(\d+)\.ffn_up\.", r"model.layers.\1.mlp.up_proj."),
    (r"^blk\.(\d+)\.ffn_down\.", r"model.layers.\1.mlp.down_proj."),
]


def gguf_hf_name(name: str) -> str | None:
    """The HF name of GGUF tensor `name`; None for one the model computes itself (rope_freqs)."""
    for pattern, repl in _GGUF_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def _unpermute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp interleaves the rotary halves of Llama's q/k rows; undo it."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_expected_shape(name: str, c: Any) -> tuple[int, ...] | None:
    """The shape of GGUF tensor `name` (its HF name) that the model config built from the same file gives
    (torch order); None for a tensor this does not know. A quantized matrix goes to its layer in blocks,
    past the float layers' check (engine.layers.linear.check_loaded): its shape is checked here."""
    dims = ModelDims.from_hf(c)  # the projections' (in, out), as LoRA adapters are checked against them
    module, kind = name.split(".")[-2:]
    if module in SUPPORTED_MODULES:
        in_features, out_features = dims.shape(module)
        return (out_features,) if kind == "bias" else (out_features, in_features)
    if module in ("embed_tokens", "lm_head"):
        return (c.vocab_size, dims.hidden)
    if module in ("q_norm", "k_norm"):
        return (dims.q_size // c.num_attention_heads,)  # head_dim
    return (dims.hidden,) if module.endswith("norm") else None


def iter_gguf(path: str, hf_config: Any, keep_blocks: bool = False) -> Iterator[tuple[str, Any]]:
    """(HF name, float32 tensor) from the GGUF file, through the parse the model config made; with
    keep_blocks, block-quantized matrices come as GGUFBlocks (rows permuted like the floats)."""
    permute = hf_config.model_type in ("llama", "mistral")
    for info, weights in open_gguf(path).iter_tensors(keep_blocks):
        name = gguf_hf_name(info.name)
        if name is None:
            continue  # rope_freqs and other tensors we compute ourselves
        expected = gguf_expected_shape(name, hf_config)
        if expected is not None and tuple(info.shape) != expected:  # before the q/k rows are un-permuted
            raise ModelLoadError(path, f"tensor {info.name} ({name}) of shape {tuple(info.shape)}: expected {expected} "
                                 "from the file's metadata")
        if permute and name.endswith("q_proj.weight"):
            weights = _unpermute_qk(weights, hf_config.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            weights = _unpermute_qk(weights, hf_config.num_key_value_heads)
        if weights.dtype == torch.uint8:  # raw blocks: each row is whole, so rows permute as floats do
            weights = GGUFBlocks(path, info.name, info.ggml_type, weights.contiguous(), info.shape[-1])
        yield name, weights


# dtypes of the parameters checked for NaN and inf once loaded (torch has no isfinite for float8)
_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _holds_float_weights(module: nn.Module | None, param: nn.Parameter) -> bool:
    """Whether param holds checkpoint values as the model computes with them, to check for NaN and inf: a
    float weight or bias (LinearBase.is_float_param; of other layers, any float parameter), not a
    quantization's packed integers or scales (a quantized embedding's last rank has unwritten padding
    rows there), FP8 weights, or a GGUF weight kept in blocks (a one-element placeholder until then)."""
    if param.dtype not in _CHECKED_DTYPES or getattr(param, "accepts_gguf_blocks", False):
        return False
    return not isinstance(module, LinearBase) or module.is_float_param(param)


def _check_values(model_config: ModelConfig, param_name: str, param: nn.Parameter,
                  sources: list[tuple[str, str]]) -> None:
    """NaN or inf in a loaded checkpoint (or a value beyond the model dtype's range) decodes as garbage
    text: refused, naming the tensor. param is checked once, on its device, when the last of its
    checkpoint tensors (sources: (file, name), several for a packed one such as qkv_proj) is in."""
    if all_finite(param.data):
        return
    dtype = str(param.dtype).removeprefix("torch.")
    file, name = sources[0] if len(sources) == 1 else _non_finite_source(model_config, sources, param.dtype)
    raise ModelLoadError(file, f"tensor {name!r} holds NaN or inf values as {dtype} (in {param_name})")


def _non_finite_source(model_config: ModelConfig, sources: list[tuple[str, str]],
                       dtype: torch.dtype) -> tuple[str, str]:
    """Which of the tensors packed into one parameter holds the NaN or inf found there: each read again,
    on the host (this error's path only), in the parameter's dtype."""
    wanted = {name for _, name in sources}
    if model_config.load_format == "gguf":
        tensors: Iterator[tuple[str, str, Any]] = (
            (model_config.path, name, loaded) for name, loaded in iter_gguf(model_config.path, model_config.hf_config))
    else:
        tensors = iter_safetensors_files(model_config.path)
    for file, name, loaded in tensors:
        if name in wanted and not torch.isfinite(materialize(loaded).to(dtype)).all():
            return file, name
    return sources[-1]  # not reached: the parameter holds nothing but these tensors' values


def _default_loader(param: nn.Parameter, loaded: Any) -> None:
    check_loaded(loaded, tuple(param.shape))  # e.g. a norm's [hidden]: copy_ would broadcast a [1]
    param.data.copy_(materialize(loaded))


def load_weights(model: nn.Module, model_config: ModelConfig, show_progress: bool, seed: int) -> None:
    with startup.phase("weights"):
        _load_weights(model, model_config, show_progress, seed)
    drop_weight_loaders(model)


def drop_weight_loaders(model: nn.Module) -> None:
    """A parameter's weight_loader is its layer's bound method (or a closure over the layer): a cycle
    layer -> parameter -> loader -> layer. The engine gc.freeze()s what it built and a frozen cycle is
    never collected, so a dropped engine kept its weights on the device (the next engine in the process
    sized its KV pool short by them: 15 GB for W1 on the H200). Loading is over: drop the loaders."""
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.__dict__.pop("weight_loader", None)


def _load_weights(model: nn.Module, model_config: ModelConfig, show_progress: bool, seed: int) -> None:
    params = dict(model.named_parameters())
    if model_config.load_format == "dummy":
        generator = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
        filled = fill_dummy_quantized(model, generator)  # packed integer weights and their scales
        for name, param in params.items():
            if name in filled:
                continue
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                param.data.uniform_(-0.05, 0.05, generator=generator)
        process_weights_after_loading(model)  # e.g. quantization=fp8 quantizes the random weights
        return
    if model_config.load_format == "gguf":
        keep_blocks = model_config.quantization == "gguf"
        tensors: Iterator[tuple[str, str, Any]] = (
            (model_config.path, name, loaded)
            for name, loaded in iter_gguf(model_config.path, model_config.hf_config, keep_blocks))
        total = len(open_gguf(model_config.path).tensors)
    else:
        tensors = iter_safetensors_files(model_config.path)  # errors name the shard a tensor is in
        total = None
    loaded_names: set[str] = set()
    modules = dict(model.named_modules())
    sources: dict[str, list[tuple[str, str]]] = {}  # a parameter whose values are checked -> its tensors in so far
    # a bar only on a terminal: in a log file every refresh would append to one ever-longer line
    show_progress = show_progress and sys.stderr.isatty()
    for file, name, loaded in tqdm(tensors, desc="Loading weights", unit="tensor", total=total,
                                   disable=not show_progress):
        # layer numbers and sizes were checked before the model was built (check_checkpoint_sizes)
        mapped = model.checkpoint_to_param(name)
        if mapped is None:
            continue
        param_name, shard_id = mapped
        if shard_id is None and _shard_ids(model, param_name):  # its loader takes its parts (a TypeError escaped)
            parts = [ckpt for ckpt, (ours, _) in model.packed_modules.items() if f".{ours}." in param_name]
            raise ModelLoadError(file, f"unexpected tensor {name!r} for {model_config.architecture}: the "
                                 f"checkpoint holds this layer's {', '.join(parts)} as separate tensors")
        param = params.get(param_name)
        if param is None and take_kv_scale(model, param_name, loaded):  # per-layer KV scales, not parameters
            continue
        if param is None:
            raise ModelLoadError(file, f"unexpected tensor {name!r} for {model_config.architecture}")
        loader = getattr(param, "weight_loader", None)
        if isinstance(loaded, GGUFBlocks) and not getattr(param, "accepts_gguf_blocks", False):
            loaded = loaded.dequantize()  # a parameter of a layer that is not quantized
        shape = tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())
        try:
            if loader is None:
                _default_loader(param, loaded)
            elif shard_id is None:
                loader(param, loaded)
            else:
                loader(param, loaded, shard_id)
        except ModelLoadError:
            raise
        except (RuntimeError, ValueError) as e:  # ValueError: engine.layers.linear.check_loaded
            raise ModelLoadError(file, f"tensor {name!r} of shape {shape} does not fit {param_name}: {e}") from None
        loaded_names.add(param_name if shard_id is None else f"{param_name}:{shard_id}")
        if _holds_float_weights(modules.get(param_name.rpartition(".")[0]), param):
            sources.setdefault(param_name, []).append((file, name))
            if all(f"{param_name}:{s}" in loaded_names for s in _shard_ids(model, param_name)):  # its last tensor
                _check_values(model_config, param_name, param, sources.pop(param_name))
    expected = set()
    for name, param in params.items():
        shard_ids = _shard_ids(model, name)
        expected.update(f"{name}:{s}" for s in shard_ids) if shard_ids else expected.add(name)
    missing = sorted(expected - loaded_names)
    if missing:
        raise ModelLoadError(model_config.path, f"missing weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    process_weights_after_loading(model)
    logger.info("weights: %.1f MiB on this rank (quantization %s)", weight_bytes(model) / 2**20, model_config.quantization)


def process_weights_after_loading(model: nn.Module) -> None:
    """Quantized layers repack (or quantize) what they were given (vLLM's verb)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
        elif hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters hold (a tied parameter once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _shard_ids(model: nn.Module, param_name: str) -> list[Any]:
    for ours, shard_id in model.packed_modules.values():
        if f".{ours}." in param_name:
            return [s for o, s in model.packed_modules.values() if o == ours]
    return []
