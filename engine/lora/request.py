"""LoRARequest (vLLM's): which adapter a request runs with, by name, id and directory."""
from __future__ import annotations

from collections.abc import Iterable

import msgspec


class LoRARequest(msgspec.Struct, frozen=True, array_like=True):
    """An adapter as requests name it; crosses processes and ranks as a 3-element array."""

    lora_name: str  # the name clients select it by (the request's `model`)
    lora_int_id: int  # >= 1, unique per adapter while it is registered: slot and prefix-cache key
    lora_path: str  # directory holding adapter_config.json and adapter_model.safetensors

    def __post_init__(self) -> None:
        from engine.errors import RequestError

        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise RequestError("lora_int_id", f"must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise RequestError("lora_name", "must be a non-empty string")


def count_adapters(loras: Iterable[LoRARequest | None]) -> dict[str, int]:
    """Requests per adapter name (base-model requests not counted): vLLM's lora_requests_info."""
    counts: dict[str, int] = {}
    for lora in loras:
        if lora is not None:
            counts[lora.lora_name] = counts.get(lora.lora_name, 0) + 1
    return counts
