"""Random weights for integer-quantized layers under load_format=dummy: packed words of uniformly random
values, zero points at the midpoint and scales that put the dequantized weights in the float dummy
weights' range, so benchmarks run a quantized model of any shape without files (see
`compressed_tensors_config`, GPTQ_4BIT and AWQ_4BIT for the config.json entries that make a dummy
checkpoint quantized, and `add_quantization_config` to write one).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from engine.layers.quant.gptq import midpoint_word

DUMMY_RANGE = 0.05  # engine.loader draws float dummy weights uniformly on [-0.05, 0.05]


def compressed_tensors_config(bits: int, group_size: int, lm_head: bool = False, embedding: bool = False
                              ) -> dict[str, Any]:
    """config.json's quantization_config as llm-compressor writes it for W4A16 / W8A16 (pack-quantized,
    symmetric int, one scale per group_size input columns; the LM head left in float unless lm_head, the
    token embedding packed too with embedding: targets Linear and Embedding)."""
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
               "dynamic": False, "actorder": None, "observer": "minmax"}
    targets = ["Linear", "Embedding"] if embedding else ["Linear"]
    group = {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": [] if lm_head else ["lm_head"]}


# config.json's quantization_config of 4-bit group-128 GPTQ (AutoGPTQ's format) and AWQ (AutoAWQ's GEMM)
GPTQ_4BIT = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
             "checkpoint_format": "gptq"}
AWQ_4BIT = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def add_quantization_config(src_dir: str, quantization_config: dict[str, Any], dst_dir: str | None = None) -> str:
    """src_dir's config.json with quantization_config set, written to dst_dir (created; default src_dir
    itself): a dummy checkpoint (load_format=dummy) of that quantization. Returns the directory written."""
    dst_dir = dst_dir or src_dir
    with open(os.path.join(src_dir, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return dst_dir


def _bits(module: nn.Module) -> int | None:
    """The integer width of a layer's quantized weight (compressed-tensors' config.num_bits, GPTQ/AWQ's
    method.bits), None for float or non-integer methods."""
    method = getattr(module, "quant_method", None)
    config = getattr(method, "config", None)
    bits = getattr(config, "num_bits", None) or getattr(method, "bits", None)
    return bits if isinstance(bits, int) else None


@torch.no_grad()
def fill_dummy_quantized(model: nn.Module, generator: torch.Generator) -> set[str]:
    """Fills the parameters of every integer-quantized layer; returns their names for the loader to skip."""
    filled: set[str] = set()
    for prefix, module in model.named_modules():
        bits = _bits(module)
        if bits is None:
            continue
        for name, param in module.named_parameters(recurse=False):
            if "g_idx" in name:  # input column k in group k // group_size (-1: one group)
                group = getattr(module.quant_method, "group_size", None) or getattr(module, "group_size", -1)
                group = group if group > 0 else param.numel()
                param.data.copy_(torch.arange(param.numel(), device=param.device) // group)
            elif "zero" in name and not param.is_floating_point():
                param.data.fill_(midpoint_word(bits, getattr(module.quant_method, "zero_offset", 0)))
            elif not param.is_floating_point():  # packed values, or a shape record the layer ignores
                info = torch.iinfo(param.dtype)
                param.data.random_(info.min, info.max, generator=generator)
            elif "scale" in name:  # |q - zero| <= 2**(bits-1): dequantized weights stay within DUMMY_RANGE
                param.data.uniform_(0.5, 1.0, generator=generator).mul_(DUMMY_RANGE / 2 ** (bits - 1))
            else:
                continue  # a float weight or bias: the loader's own dummy values
            filled.add(f"{prefix}.{name}" if prefix else name)
    return filled
