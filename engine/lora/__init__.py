"""Multi-LoRA serving: PEFT adapters (adapter.py), per-layer slots (layers.py), host LRU and
device slots (manager.py), the batch's per-token slots and kernels dispatch (punica.py).

Light on import: engine.core_messages needs LoRARequest before the engine core is spawned, and
adapter.py pulls in torch (1.4 s of start-up on 2 cores), so LoRAError is loaded when first used."""
from typing import Any

from engine.lora.request import LoRARequest

__all__ = ["LoRAError", "LoRARequest"]


def __getattr__(name: str) -> Any:
    if name == "LoRAError":
        from engine.lora.adapter import LoRAError

        return LoRAError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
