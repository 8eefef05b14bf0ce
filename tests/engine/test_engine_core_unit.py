"""EngineCore through InprocClient without a model: a fake executor that, like a model runner,
keeps per-request state from SchedulerOutputs and samples a token depending on its position.
step() and step_with_batch_queue() give the same tokens; aborts and unschedulable requests
free everything; a step's outputs survive a msgpack round trip."""
from __future__ import annotations

from collections import defaultdict, deque

from engine.block_manager import BlockManager
from engine.core_client import InprocClient
from engine.core_messages import EngineCoreOutputs, EngineCoreRequest, decoder_for, encoder
from engine.engine_core import EngineCore
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

EOS = 2


def token_at(position: int) -> int:
    return 10 + position % 37


class FakeExecutor:
    """Tracks what a runner would (known tokens, computed tokens) from SchedulerOutputs only."""

    def __init__(self) -> None:
        self.state: dict[str, list[int]] = {}  # req id -> [tokens known, tokens computed]
        self.results: deque[ModelRunnerOutput] = deque()
        self.shut = False

    def submit(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.state.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            self.state[new.req_id] = [len(new.prompt_token_ids), new.num_computed_tokens]
        for cached in so.scheduled_cached_reqs:
            self.state[cached.req_id][0] += len(cached.new_token_ids)
            self.state[cached.req_id][1] = cached.num_computed_tokens
        req_ids, tokens = [], []
        for req_id, n in so.num_scheduled_tokens.items():
            st = self.state[req_id]
            st[1] += n
            if st[1] >= st[0]:  # reached the end of what it knows: samples the token at st[1]
                req_ids.append(req_id)
                tokens.append(token_at(st[1]))
        self.results.append(ModelRunnerOutput(req_ids, tokens))

    def collect(self) -> ModelRunnerOutput:
        return self.results.popleft()

    def shutdown(self) -> None:
        self.shut = True


def make_client(num_blocks: int = 64, budget: int = 16, async_scheduling: bool = False) -> InprocClient:
    sched = Scheduler(BlockManager(num_blocks, 4, True), 8, budget, [EOS], async_scheduling=async_scheduling,
                      max_model_len=256)
    return InprocClient(EngineCore(sched, FakeExecutor(), max_in_flight=2 if async_scheduling else 1))


def request(rid: str, prompt_len: int, max_tokens: int = 5, **params) -> EngineCoreRequest:
    return EngineCoreRequest(request_id=rid, prompt_token_ids=list(range(3, 3 + prompt_len)),
                             sampling_params=SamplingParams(max_tokens=max_tokens, **params), max_tokens=max_tokens,
                             arrival_time=0.0)


def run(client: InprocClient, max_steps: int = 1000, on_step=None) -> tuple[dict, list[EngineCoreOutputs]]:
    tokens: dict[tuple[str, int], list[int]] = defaultdict(list)
    steps = []
    for step in range(max_steps):
        if not client.core.has_work():
            return tokens, steps
        if on_step is not None:
            on_step(step, client)
        outs = client.get_output()
        steps.append(outs)
        for o in outs.outputs:
            tokens[(o.request_id, o.index)].extend(o.new_token_ids)
    raise AssertionError("the core did not finish")


def assert_all_free(client: InprocClient) -> None:
    bm = client.core.block_manager
    assert not client.core.has_work() and not client.core.requests
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def test_sync_and_batch_queue_same_tokens() -> None:
    results = []
    for async_scheduling in (False, True):
        client = make_client(num_blocks=20, budget=8, async_scheduling=async_scheduling)
        assert client.core.use_batch_queue == async_scheduling
        for i, n in enumerate((1, 7, 13, 30)):
            client.add_request(request(f"r{i}", n, max_tokens=8, n=2 if i == 1 else 1))
        tokens, steps = run(client)
        assert tokens[("r0", 0)] == [token_at(1 + j) for j in range(8)]
        assert tokens[("r1", 0)] == tokens[("r1", 1)]  # the fake samples by position only
        stats = client.get_stats()
        assert stats.generation_tokens_total == 5 * 8 and stats.num_steps > 0 and not stats.has_work
        assert_all_free(client)
        results.append(dict(tokens))
    assert results[0] == results[1]


def test_abort_frees_and_silences() -> None:
    client = make_client()
    client.add_request(request("a", 10, max_tokens=50))
    client.add_request(request("b", 10, max_tokens=6))
    after_abort = []

    def abort(step: int, c: InprocClient) -> None:
        if step == 3:
            c.abort_requests(["a", "unknown"])
        if step > 3:
            after_abort.append(step)

    tokens, steps = run(client, on_step=abort)
    assert after_abort
    assert all(o.request_id != "a" for s in steps[3:] for o in s.outputs)
    assert len(tokens[("b", 0)]) == 6
    assert_all_free(client)


def test_unschedulable_fails_alone() -> None:
    client = make_client(num_blocks=4, budget=64)  # 16 tokens in the whole pool
    client.add_request(request("big", 20, max_tokens=2))
    client.add_request(request("ok", 3, max_tokens=2))
    tokens, steps = run(client)
    errors = [o for s in steps for o in s.outputs if o.error is not None]
    assert [(o.request_id, o.finish_reason, o.error[0]) for o in errors] == [("big", "abort", "max_tokens")]
    assert len(tokens[("ok", 0)]) == 2
    assert_all_free(client)


def test_outputs_round_trip_msgpack() -> None:
    client = make_client()
    client.add_request(request("r", 5, max_tokens=3, stop_token_ids=[7]))
    req_bytes = encoder.encode(request("x", 2))
    assert decoder_for(EngineCoreRequest).decode(req_bytes).sampling_params.max_tokens == 5
    _, steps = run(client)
    decode = decoder_for(EngineCoreOutputs)
    for outs in steps:
        assert decode.decode(encoder.encode(outs)) == outs
    client.shutdown()
    assert client.core.executor.shut


class SplitExecutor(FakeExecutor):
    """FakeExecutor with the in-process executor's split submit, logging the order of the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.prepared: SchedulerOutput | None = None

    def submit(self, so: SchedulerOutput) -> None:
        self.calls.append("submit")
        super().submit(so)

    def prepare_forward(self, so: SchedulerOutput) -> None:
        assert self.prepared is None
        self.calls.append("prepare")
        self.prepared = so

    def launch_forward(self) -> None:
        assert self.prepared is not None
        self.calls.append("launch")

    def submit_sample(self, so: SchedulerOutput) -> None:
        assert so is self.prepared
        self.prepared = None
        self.calls.append("sample")
        super().submit(so)

    def collect(self) -> ModelRunnerOutput:
        self.calls.append("collect")
        return super().collect()


def test_deep_chunk_collects_the_step_in_flight_first(monkeypatch) -> None:
    """With async scheduling, a step with a deep prompt chunk is prepared, the step in flight collected, and only
    then launched; the tokens are those of the synchronous loop."""
    import engine.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "DEEP_CHUNK_TOKENS", 4)
    monkeypatch.setattr(scheduler_module, "DEEP_CHUNK_START", 8)
    results = []
    for async_scheduling in (False, True):
        sched = Scheduler(BlockManager(40, 4, True), 8, 8, [EOS], async_scheduling=async_scheduling, max_model_len=256)
        executor = SplitExecutor()
        client = InprocClient(EngineCore(sched, executor, max_in_flight=2 if async_scheduling else 1))
        client.add_request(request("short", 2, max_tokens=12))
        client.add_request(request("long", 30, max_tokens=3))  # in chunks beside the decode, most 8+ deep
        tokens, _ = run(client)
        assert_all_free(client)
        results.append(dict(tokens))
        if async_scheduling:
            order = " ".join(executor.calls)
            assert "prepare collect launch sample" in order  # the deep chunks' steps
            assert order.count("prepare") >= 2 and "submit" in order  # the other steps as before
    assert results[0] == results[1]
    assert results[1][("long", 0)] == [token_at(30 + j) for j in range(3)]
