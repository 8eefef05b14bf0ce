"""AsyncMPClient: an API process's side of the engine core's sockets (see engine/core_proc.py).

Sends are fire-and-forget on the event loop (ZMQ queues them); get_output_async() yields the
core's messages in order: READY (CoreInfo), FAILED (while loading), OUTPUTS (a step's outputs
for this client's requests, or a stats heartbeat) and DEAD.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from engine.core_messages import CoreInfo, EngineCoreOutputs, EngineCoreRequest, encoder
from engine.core_proc import ABORT, ADD, DEAD, EOS, FAILED, OUTPUTS, READY, SHUTDOWN, CoreAddresses, CoreLoadFailure

logger = logging.getLogger("gantry.server")

CoreMessage = CoreInfo | CoreLoadFailure | EngineCoreOutputs | str  # str: DEAD's reason


class AsyncMPClient:
    def __init__(self, addresses: CoreAddresses, client_index: int):
        self.client_index = client_index
        self.ctx = zmq.asyncio.Context()
        self.inputs = self.ctx.socket(zmq.PUSH)
        self.inputs.setsockopt(zmq.LINGER, 0)
        self.inputs.connect(addresses.input)
        self.outputs = self.ctx.socket(zmq.PULL)
        self.outputs.bind(addresses.outputs[client_index])
        self._decoders: dict[bytes, msgspec.msgpack.Decoder] = {
            OUTPUTS: msgspec.msgpack.Decoder(EngineCoreOutputs), READY: msgspec.msgpack.Decoder(CoreInfo),
            FAILED: msgspec.msgpack.Decoder(CoreLoadFailure), DEAD: msgspec.msgpack.Decoder(str),
        }

    def _send(self, kind: bytes, payload: Any) -> None:
        fut = self.inputs.send_multipart((kind, encoder.encode(payload)), copy=False)
        fut.add_done_callback(_log_send_error)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(ADD, request)

    def abort_requests(self, request_ids: Iterable[str | tuple[str, int]]) -> None:
        self._send(ABORT, list(request_ids))

    def add_eos_token_ids(self, token_ids: Iterable[int]) -> None:
        self._send(EOS, sorted(token_ids))

    def shutdown_core(self) -> None:
        self._send(SHUTDOWN, None)

    async def get_output_async(self) -> CoreMessage:
        kind, payload = await self.outputs.recv_multipart()
        return self._decoders[kind].decode(payload)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _log_send_error(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        logger.error("cannot send to the engine core: %s", fut.exception())
