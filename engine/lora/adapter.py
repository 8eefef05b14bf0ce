"""PEFT adapters from disk: adapter_config.json + adapter_model.safetensors, checked against the
base model (target modules, ranks up to max_lora_rank, shapes, finite values) and read as (A, B) pairs
per (layer, module) with the scaling (lora_alpha / r, or / sqrt(r) for rsLoRA) folded into B."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import RequestError
from engine.tensor_checks import all_finite

if TYPE_CHECKING:  # imported where adapters are read: the API process imports ModelDims without torch
    import torch

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT's names: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_TENSOR_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_UNSUPPORTED_OPTIONS = (  # (field, value that is fine): anything else changes the math we implement
    ("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("modules_to_save", None), ("alpha_pattern", {}),
)


class LoRAError(RequestError):
    """An adapter we cannot serve; `param` names the request or config field, the message the file."""


@dataclass(frozen=True)
class ModelDims:
    """The base model's projection shapes, as PEFT's lora_A [r, in] / lora_B [out, r] must match."""

    num_layers: int
    hidden: int
    intermediate: int
    q_size: int  # num_attention_heads * head_dim
    kv_size: int  # num_key_value_heads * head_dim

    @staticmethod
    def from_hf(hf: Any) -> ModelDims:
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return ModelDims(hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size,
                         hf.num_attention_heads * head_dim, hf.num_key_value_heads * head_dim)

    def shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_size, self.kv_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[module]


@dataclass
class LoRAModel:
    """One adapter on the host: float32 (A [r, in], B [out, r] * scaling) per (layer, module)."""

    lora_int_id: int
    rank: int  # the largest rank among its modules
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def read_adapter_config(path: str, max_lora_rank: int, param: str = "lora_path") -> dict[str, Any]:
    """adapter_config.json, checked: every refusal names the file and its field."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise LoRAError(param, f"adapter directory {path} does not exist")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise LoRAError(param, f"{file} is missing (a PEFT adapter directory holds {CONFIG_FILE} "
                        f"and {WEIGHTS_FILE})") from None
    except (OSError, ValueError) as e:
        raise LoRAError(param, f"{file} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise LoRAError(param, f"{file} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(param, f"{file} peft_type: only LORA adapters are served, got {config['peft_type']!r}")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAError(param, f"{file} r: must be an integer >= 1, got {r!r}")
    if r > max_lora_rank:
        raise LoRAError(param, f"{file} r: rank {r} exceeds max_lora_rank {max_lora_rank}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise LoRAError(param, f"{file} lora_alpha: must be a number > 0, got {alpha!r}")
    for key, fine in _UNSUPPORTED_OPTIONS:
        value = config.get(key, fine)
        if value != fine and not (fine is None and not value):
            raise LoRAError(param, f"{file} {key}: {value!r} is not supported (only {fine!r})")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unsupported = [t for t in targets if t not in SUPPORTED_MODULES]
        if unsupported:
            raise LoRAError(param, f"{file} target_modules: {unsupported[0]!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_MODULES)})")
    return config


def check_adapter_files(path: str, max_lora_rank: int, param: str = "lora_request") -> dict[str, Any]:
    """The adapter directory holds a readable config and a weights file: the config (read_adapter's first check,
    and the engine core's when a request arrives, so files removed after registration fail that request alone)."""
    config = read_adapter_config(path, max_lora_rank, param)
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise LoRAError(param, f"{file} is missing (only the safetensors format is read)")
    return config


def _scaling(config: dict[str, Any], rank: int) -> float:
    alpha = float(config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter(path: str, lora_int_id: int, dims: ModelDims, max_lora_rank: int, load: bool = True,
                 param: str = "lora_path", check_values: bool = False) -> LoRAModel:
    """Check an adapter against the base model. load=False reads only the safetensors header (the front end's
    check of a request's adapter), the returned weights then empty; check_values adds each tensor, one at a time,
    checked for NaN and inf (registration). A load checks each tensor so, once, as it reads it."""
    import torch
    from safetensors import SafetensorError, safe_open

    config = check_adapter_files(path, max_lora_rank, param)
    file = os.path.join(path, WEIGHTS_FILE)
    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                m = _TENSOR_NAME.search(name)
                if m is None:
                    raise LoRAError(param, f"{file}: tensor {name} is not a LoRA A/B of a supported module "
                                    f"({', '.join(SUPPORTED_MODULES)})")
                layer, module, which = int(m.group(1)), m.group(2), m.group(3)
                if module not in SUPPORTED_MODULES:
                    raise LoRAError(param, f"{file}: tensor {name}: target module {module!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_MODULES)})")
                if layer >= dims.num_layers:
                    raise LoRAError(param, f"{file}: tensor {name}: the base model has {dims.num_layers} layers")
                tensor = f.get_tensor(name) if load or check_values else None
                # NaN in, NaN out: empty or garbage text
                if tensor is not None and not all_finite(tensor):
                    raise LoRAError(param, f"{file}: tensor {name} holds NaN or inf values")
                pairs.setdefault((layer, module), {})[which] = tensor if load else f.get_slice(name)
    except SafetensorError as e:
        raise LoRAError(param, f"{file} is corrupt: {e}") from None
    except OSError as e:  # removed or unreadable since check_adapter_files looked
        raise LoRAError(param, f"{file} is not readable: {e}") from None
    if not pairs:
        raise LoRAError(param, f"{file} holds no LoRA tensors")
    weights, max_rank = {}, 0
    for (layer, module), ab in sorted(pairs.items()):
        where = f"{file}: layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise LoRAError(param, f"{where}: lora_{'B' if 'A' in ab else 'A'} is missing")
        a_shape, b_shape = _shape(ab["A"]), _shape(ab["B"])
        in_features, out_features = dims.shape(module)
        rank = a_shape[0] if len(a_shape) == 2 else -1
        if list(a_shape) != [rank, in_features] or list(b_shape) != [out_features, rank]:
            raise LoRAError(param, f"{where}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit the base "
                            f"model (expected [r, {in_features}] / [{out_features}, r])")
        if rank < 1:  # its scaling would divide by zero inside the engine
            raise LoRAError(param, f"{where}: lora_A {list(a_shape)} has rank 0")
        if rank > max_lora_rank:
            raise LoRAError(param, f"{where}: rank {rank} exceeds max_lora_rank {max_lora_rank}")
        max_rank = max(max_rank, rank)
        if load:
            a, b = ab["A"].to(torch.float32), ab["B"].to(torch.float32)
            weights[(layer, module)] = (a.contiguous(), (b * _scaling(config, rank)).contiguous())
    return LoRAModel(lora_int_id, max_rank, weights)


def _shape(t: Any) -> list[int]:
    import torch

    return list(t.shape) if isinstance(t, torch.Tensor) else list(t.get_shape())
