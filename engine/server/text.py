"""Front-end text work in the API process: request bodies -> validated requests with token ids.

A small body is parsed and tokenized inline on the event loop with the API's own copy of the
tokenizer (a hop to another process costs more); a larger one goes to a small pool of worker
processes, each with its own copy, at lower CPU priority, so a big request holds neither the
event loop nor the GIL the engine thread needs. The engine's tokenizer is never used here.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Any

from engine import startup
from engine.errors import RequestError
from engine.server.tools import ToolsRequest, apply_tool_constraint, parse_tools, template_tools, with_tool_fields
from engine.server.protocol import APIError, ModelContext, bad, parse_json_body
from engine.server.protocol_chat import ChatRequest, parse_chat_request, parse_tokenize_request
from engine.server.protocol_completion import CompletionRequest, parse_completion_request, parse_detokenize_request
from engine.server.protocol_structured import constrain_after_reasoning
from engine.tokenizer import apply_chat_template, check_encoded_ids, warn_if_beyond_vocab

logger = logging.getLogger("gantry.server")

# Bodies up to this size are handled on the event loop: parsing, templating and tokenizing 1 KB
# takes under a millisecond (about 0.6 ms more per KB), about what the round trip to a worker adds.
INLINE_MAX_BODY_BYTES = 1024
NUM_WORKERS = 2  # two, so that one huge request does not queue every other large one
# A machine with at most this many cores the process may use (a laptop) gets one worker, started at the
# first body over INLINE_MAX_BODY_BYTES: each worker holds its own tokenizer and transformers (~100 MiB),
# and there a second one would only compete with the engine core for the same cores.
SMALL_MACHINE_CORES = 4
WORKER_NICE = 10  # below the engine thread and the event loop: a big request slows itself first


@dataclass
class PreparedCompletion:
    request: CompletionRequest  # its prompts replaced by their token ids
    prompt_texts: list[str | None]  # the text of each prompt as sent (for echo); None: given as token ids


@dataclass
class PreparedChat:
    request: ChatRequest  # its messages dropped once templated
    prompt_token_ids: list[int]
    tools: ToolsRequest | None = None  # tools and tool_choice (None: none, or tool_choice "none")


# ---- the work itself: runs inline with the API's tokenizer or in a worker with the worker's ----

def _encode(tokenizer: Any, text: str, name: str, add_special_tokens: bool = True) -> list[int]:
    if tokenizer is None:
        raise bad(name, "this model has no tokenizer (load_format=dummy): give token ids")
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _check_vocab(token_ids: list[int], name: str, ctx: ModelContext) -> None:
    try:
        check_encoded_ids(token_ids, ctx.vocab_size, name)
    except RequestError as e:
        raise bad(e.param, e.message) from None


def _apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                         tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
                         chat_template_kwargs: Any = None, add_special_tokens: bool = False) -> list[int]:
    try:  # the offline LLM's renderer
        return apply_chat_template(tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                   continue_final_message=continue_final_message,
                                   chat_template_kwargs=chat_template_kwargs, add_special_tokens=add_special_tokens)
    except RequestError as e:  # as an APIError: it crosses back from a text worker intact
        raise bad(e.param, e.message) from None


def _check_room(token_ids: list[int], name: str, ctx: ModelContext) -> None:
    if len(token_ids) >= ctx.max_model_len:
        raise bad(name, f"the prompt has {len(token_ids)} tokens; this model's maximum context length is "
                        f"{ctx.max_model_len}, which leaves no room to generate")


def prepare_completion(raw: bytes, ctx: ModelContext, tokenizer: Any) -> PreparedCompletion:
    req = parse_completion_request(parse_json_body(raw), ctx)
    texts: list[str | None] = []
    token_ids: list[list[int]] = []
    for i, prompt in enumerate(req.prompts):
        name = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            ids = _encode(tokenizer, prompt, name, req.add_special_tokens)
            _check_vocab(ids, name, ctx)
        else:
            ids = prompt
        cut = req.truncate is not None and len(ids) > req.truncate
        ids = ids[-req.truncate:] if cut else ids
        _check_room(ids, name, ctx)
        token_ids.append(ids)
        # only echo needs the text back; a truncated prompt echoes as its kept tokens decode
        texts.append(prompt if isinstance(prompt, str) and req.echo and not cut else None)
    req.prompts = token_ids  # type: ignore[assignment]
    return PreparedCompletion(req, texts)


def prepare_chat(raw: bytes, ctx: ModelContext, tokenizer: Any) -> PreparedChat:
    body = parse_json_body(raw)
    req = parse_chat_request(body, ctx)
    tools = parse_tools(body, ctx.enable_auto_tool_choice, ctx.tool_call_parser)
    if tools is not None:
        apply_tool_constraint(tools, req.params)
    constrain_after_reasoning(req.params, ctx.reasoning_parser)
    ids = _apply_chat_template(tokenizer, with_tool_fields(req.messages, body["messages"]), req.add_generation_prompt,
                               template_tools(body), req.continue_final_message, req.chat_template_kwargs,
                               req.add_special_tokens)
    _check_vocab(ids, "messages", ctx)
    ids = ids[-req.truncate:] if req.truncate is not None else ids
    _check_room(ids, "messages", ctx)
    req.messages = []
    return PreparedChat(req, ids, tools)


def tokenize(raw: bytes, ctx: ModelContext, tokenizer: Any) -> tuple[list[int], list[str] | None]:
    """The token ids, and their vocabulary strings when return_token_strs asks for them."""
    body = parse_json_body(raw)
    req = parse_tokenize_request(body, ctx)
    if req.messages is not None:  # templated as chat templates them (tool fields, an open last message)
        ids = _apply_chat_template(tokenizer, with_tool_fields(req.messages, body["messages"]),
                                   req.add_generation_prompt, template_tools(body), req.continue_final_message,
                                   req.chat_template_kwargs, req.add_special_tokens)
    else:
        assert req.prompt is not None
        ids = _encode(tokenizer, req.prompt, "prompt", req.add_special_tokens)
    return ids, tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None


def detokenize(raw: bytes, ctx: ModelContext, tokenizer: Any) -> str:
    tokens = parse_detokenize_request(parse_json_body(raw), ctx)
    if tokenizer is None:
        raise bad("tokens", "this model has no tokenizer (load_format=dummy)")
    return tokenizer.decode(tokens)


WORK: dict[str, Callable[[bytes, ModelContext, Any], Any]] = {
    "completion": prepare_completion, "chat": prepare_chat, "tokenize": tokenize, "detokenize": detokenize,
}


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for: its vocabulary string is at least as long
    (byte-level BPE: one symbol per byte; SentencePiece: one per character)."""
    return max(len(t) for t in tokenizer.get_vocab())


# ---- worker processes ----

_worker_tokenizer: Any = None  # a worker's own tokenizer
_NO_TOKENIZER = b""  # stands for "the model has none"


def _init_worker(blobs: Any, parent_pid: int) -> None:
    """Wait for the tokenizer (the server spawns workers while the model loads, so their imports
    overlap it) and take it; leave as soon as the server process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    try:
        os.nice(WORKER_NICE)
    except OSError:  # not permitted here: run at the server's priority
        pass
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="orphan-watch", daemon=True).start()
    import transformers  # noqa: F401  (the tokenizer's classes: import while the model loads)

    blob = blobs.get()
    global _worker_tokenizer
    _worker_tokenizer = pickle.loads(blob) if blob != _NO_TOKENIZER else None


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _run_in_worker(kind: str, raw: bytes, ctx: ModelContext) -> Any:
    return WORK[kind](raw, ctx, _worker_tokenizer)


def _warm_up() -> int:
    time.sleep(0.1)  # long enough that each warm-up call starts its own worker
    return os.getpid()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class TextFrontend:
    """Text work for the routes: inline for small bodies, else in a pool of worker processes.

    Created at server start (workers spawn while the model loads; lazy: at the first large body, which
    waits for them); load() hands them the tokenizer. num_workers and lazy default by usable_cores()."""

    def __init__(self, num_workers: int | None = None, lazy: bool | None = None):
        small = usable_cores() <= SMALL_MACHINE_CORES
        self.num_workers = num_workers if num_workers is not None else 1 if small else NUM_WORKERS
        self.lazy = small if lazy is None else lazy
        # the engine's, shared: both run on the event loop (the engine core is another process), so
        # a Rust tokenizer is never borrowed from two threads at once ("Already borrowed")
        self.tokenizer: Any = None
        self.ctx: ModelContext | None = None
        self._blob: bytes | None = None
        self._restart_lock = asyncio.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._blobs: Any = None
        if not self.lazy:
            self._pool, self._warm = self._start_pool()

    def _start_pool(self) -> tuple[ProcessPoolExecutor, Any]:
        # spawn, not fork: the server has threads (the engine's, torch's) that a fork would copy mid-flight.
        # A spawned worker imports the main module again (engine.serve keeps its work under __main__).
        mp = multiprocessing.get_context("spawn")
        blobs = mp.Queue()
        pool = ProcessPoolExecutor(self.num_workers, mp_context=mp, initializer=_init_worker,
                                   initargs=(blobs, os.getpid()))
        self._blobs = blobs
        if self._blob is not None:
            self._hand_out(self._blob)
        return pool, [pool.submit(_warm_up) for _ in range(self.num_workers)]

    def _hand_out(self, blob: bytes) -> None:
        for _ in range(self.num_workers):
            self._blobs.put(blob)

    @property
    def ready(self) -> bool:
        return self.ctx is not None

    def load(self, engine_tokenizer: Any, ctx: ModelContext) -> None:
        """Blocking (pickles the tokenizer for the workers): call it off the event loop before the
        first request (nothing else uses the tokenizer then)."""
        blob = pickle.dumps(engine_tokenizer) if engine_tokenizer is not None else _NO_TOKENIZER  # the workers' copies
        self.tokenizer = engine_tokenizer
        max_text_chars = ctx.max_model_len * max_token_chars(self.tokenizer) if self.tokenizer is not None else None
        self._blob = blob
        # /ready does not wait for the workers: only bodies over INLINE_MAX_BODY_BYTES need them
        if self._pool is not None:  # else a lazy pool takes it when it starts
            self._hand_out(blob)
        # a token id must be the tokenizer's and the model's: ids past the tokenizer are padding rows of the model
        # (they do not decode), and ids past the model's vocab_size have no embedding
        vocab_size = min(len(self.tokenizer), ctx.vocab_size) if self.tokenizer is not None else ctx.vocab_size
        warn_if_beyond_vocab(self.tokenizer, ctx.vocab_size)
        startup.release_memory()  # get_vocab's 49k-entry dict and the pickling: 12 MiB of RSS on SmolLM2
        self.ctx = replace(ctx, vocab_size=vocab_size, max_text_chars=max_text_chars)

    async def run(self, kind: str, raw: bytes) -> Any:
        """WORK[kind] on a request body; APIError for anything wrong with it."""
        assert self.ctx is not None, "load() first"
        if len(raw) <= INLINE_MAX_BODY_BYTES:
            return WORK[kind](raw, self.ctx, self.tokenizer)
        loop = asyncio.get_running_loop()
        if self._pool is None:  # lazy: the first large body starts the workers (it waits in their queue)
            async with self._restart_lock:
                if self._pool is None:
                    logger.info("starting %d text worker process(es) for the first body over %d bytes",
                                self.num_workers, INLINE_MAX_BODY_BYTES)
                    self._pool, self._warm = await loop.run_in_executor(None, self._start_pool)
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, _run_in_worker, kind, raw, self.ctx)
        except BrokenProcessPool:
            async with self._restart_lock:
                if pool is self._pool:  # the first to notice restarts it
                    logger.error("a text worker process died (out of memory?); starting new ones")
                    self._stop_pool(pool, self._blobs)
                    self._pool, warm = await loop.run_in_executor(None, self._start_pool)
                    await asyncio.wrap_future(warm[0])
            raise APIError(503, "the server's text workers restarted; retry the request", code="worker_restarted",
                           headers={"Retry-After": "1"}) from None

    def _stop_pool(self, pool: ProcessPoolExecutor, blobs: Any) -> None:
        # A worker busy with a huge body (or still waiting for the tokenizer) would hold up the
        # exit: stop the workers first, then the pool notices at once.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        # Tokenizer copies no worker took are still in the queue's pipe: without this its feeder
        # thread blocks on the full pipe and the interpreter's exit waits for it forever.
        blobs.cancel_join_thread()
        blobs.close()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._stop_pool(self._pool, self._blobs)
