"""RequestStream: what a route iterates of one HTTP request's engine requests: their RequestDeltas,
in step order, batched for a handler that fell behind. AsyncLLM (async_llm.py) fills its queue."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.outputs import Logprob


@dataclass(slots=True)
class SampleDelta:
    index: int  # which of the request's n samples
    text: str  # new text since the previous delta (complete UTF-8 characters only)
    new_token_ids: list[int]  # tokens generated since the previous delta
    new_logprobs: list[dict[int, Logprob]] | None  # one dict per new token, when logprobs were asked
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None


@dataclass
class RequestDelta:
    request_id: str
    samples: list[SampleDelta]
    finished: bool
    prompt: str | None = None  # set on a request's first delta only
    prompt_token_ids: list[int] | None = None  # set on a request's first delta only
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # first delta only, when asked


class RequestStream:
    """The event-loop side of one HTTP request: deltas of its engine requests, in step order."""

    def __init__(self, request_ids: list[str]):
        self.request_ids = request_ids
        self.queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self.unfinished = set(request_ids)
        self._head: list[RequestDelta | BaseException] = []  # an item first() took off the queue

    async def first(self) -> None:
        """Wait for the first delta, raising a failure that comes instead: a streamed response starts once the
        engine has taken the request, so a refusal it finds (a grammar that does not compile against the
        vocabulary) is the same 400 streamed or not, not a 200 and an error event."""
        if not self._head:
            self._head.append(await self.queue.get())
        if isinstance(self._head[0], BaseException):
            self.unfinished.clear()
            raise self._head.pop()

    @property
    def finished(self) -> bool:
        return not self.unfinished

    async def __aiter__(self) -> AsyncIterator[RequestDelta]:
        async for batch in self.batches():
            for delta in batch:
                yield delta

    async def batches(self) -> AsyncIterator[list[RequestDelta]]:
        """Every delta queued by the time the handler runs, together: a handler that fell behind
        catches up with one write instead of one per step."""
        while self.unfinished:
            items, self._head = self._head or [await self.queue.get()], []
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            batch = []
            for item in items:
                if isinstance(item, BaseException):
                    self.unfinished.clear()
                    if batch:
                        yield batch
                    raise item
                if item.finished:
                    self.unfinished.discard(item.request_id)
                batch.append(item)
            yield batch
