"""The front end's adapters: names registered at start-up (lora_modules) or at run time, each
checked against the base model once (config, safetensors header, finite weights) before any request uses it."""
from __future__ import annotations

import itertools
from typing import Any

from engine.config import ConfigError, EngineConfig
from engine.errors import RequestError
from engine.lora.adapter import LoRAError, ModelDims, read_adapter
from engine.lora.request import LoRARequest


MAX_LORA_NAME_CHARS = 256  # an adapter name is a model id: in /v1/models, metrics labels and log lines


class LoRARegistry:
    def __init__(self, config: EngineConfig, hf_config: Any, base_name: str | None = None, check_values: bool = True):
        """hf_config: the base model's HF config, or its ModelDims (an API process has only those). check_values:
        read lora_modules' weights for NaN and inf; a front end whose engine core's start-up registry has done so
        passes False and reads only their headers (an adapter's weights read once, not once per process)."""
        self.enable_lora, self.max_lora_rank = config.enable_lora, config.max_lora_rank
        self.dims = hf_config if isinstance(hf_config, ModelDims) else ModelDims.from_hf(hf_config)
        self.base_name = base_name  # the served model's name: no adapter may take it
        self.by_name: dict[str, LoRARequest] = {}
        self._checked: set[LoRARequest] = set()
        self._ids = itertools.count(1)  # ids never reused: a reloaded name shares no slot or KV page
        for name, path in config.lora_modules.items():
            try:
                self.add(name, path, f"lora_modules.{name}", f"lora_modules.{name}", check_values)
            except RequestError as e:  # a start-up error: the config is at fault
                raise ConfigError(e.param, str(e)[len(e.param) + 2 :]) from None

    def check(self, req: LoRARequest | None, param: str = "lora_request.lora_path", check_values: bool = False) -> None:
        """Refuse a request's adapter we cannot serve (RequestError naming param and the file), from its header;
        check_values (registration) reads its weights too, refusing NaN or inf. A request's own adapter has its
        weights checked where the engine reads them, which fails that request alone."""
        if req is None or req in self._checked:
            return
        if not self.enable_lora:
            raise RequestError("lora_request", "LoRA adapters are not enabled on this engine (enable_lora)")
        if not isinstance(req, LoRARequest):
            raise RequestError("lora_request", f"must be a LoRARequest, got {type(req).__name__}")
        read_adapter(req.lora_path, req.lora_int_id, self.dims, self.max_lora_rank, load=False, param=param,
                     check_values=check_values)
        self._checked.add(req)

    def add(self, name: str, path: str, param: str = "lora_name", path_param: str = "lora_path",
            check_values: bool = True) -> LoRARequest:
        """Register an adapter under a new name, checked first (its weights too, with check_values); the name
        must be free."""
        if not self.enable_lora:
            raise RequestError(param, "LoRA adapters are not enabled on this engine (enable_lora)")
        if not isinstance(name, str) or not name:
            raise RequestError(param, "must be a non-empty string")
        if len(name) > MAX_LORA_NAME_CHARS:
            raise RequestError(param, f"at most {MAX_LORA_NAME_CHARS} characters, got {len(name)}")
        if name in self.by_name or name == self.base_name:
            raise LoRAError(param, f"the name {name!r} is already taken")
        req = LoRARequest(name, next(self._ids), path)
        self.check(req, path_param, check_values=check_values)
        self.by_name[name] = req
        return req

    def remove(self, name: str, param: str = "lora_name") -> LoRARequest:
        req = self.by_name.pop(name, None)
        if req is None:
            raise LoRAError(param, f"no adapter named {name!r} is loaded")
        self._checked.discard(req)
        return req
