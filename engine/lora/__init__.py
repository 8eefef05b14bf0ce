"""Multi-LoRA serving: PEFT adapters (adapter.py), per-layer slots (layers.py), host LRU and
device slots (manager.py), the batch's per-token slots and kernels dispatch (punica.py)."""
from engine.lora.adapter import LoRAError
from engine.lora.request import LoRARequest

__all__ = ["LoRAError", "LoRARequest"]
