"""EngineCoreClient: the one interface between a front end (LLMEngine, the API server) and the
engine core. InprocClient runs the core in this process (offline LLM, benchmarks); a ZMQ client
to a core process implements the same verbs."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from engine.core_messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from engine.engine_core import EngineCore


class EngineCoreClient(ABC):
    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: Iterable[str]) -> None: ...

    @abstractmethod
    def get_output(self) -> EngineCoreOutputs:
        """The next step's outputs (blocking until there are some, or a stats heartbeat)."""

    @abstractmethod
    def get_stats(self) -> SchedulerStats: ...

    @abstractmethod
    def shutdown(self) -> None: ...


class InprocClient(EngineCoreClient):
    """The core in this process: get_output() runs one step of it."""

    def __init__(self, core: EngineCore):
        self.core = core

    def add_request(self, request: EngineCoreRequest) -> None:
        self.core.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.core.abort_requests(list(request_ids))

    def get_output(self) -> EngineCoreOutputs:
        return self.core.step_fn()

    def get_stats(self) -> SchedulerStats:
        return self.core.get_stats()

    def shutdown(self) -> None:
        self.core.shutdown()
