"""Model classes by the HF `architectures` entry of config.json."""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from engine.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from torch import nn

# architecture -> (module, class): imported only when a model is built, so that the API process can
# check a config's architecture without torch (it never builds a model).
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("engine.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("engine.models.qwen3", "Qwen3ForCausalLM"),
}


def get_model_class(architectures: list[str] | None, source: str) -> type[nn.Module]:
    for arch in architectures or []:
        if arch in MODEL_CLASSES:
            module, name = MODEL_CLASSES[arch]
            return getattr(import_module(module), name)
    raise UnsupportedArchitectureError(
        source,
        f"architectures {architectures or []} not supported; supported: {', '.join(sorted(MODEL_CLASSES))}",
    )
