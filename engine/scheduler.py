"""Continuous batching under one token budget per step.

Running sequences are served first (oldest first), then waiting ones, first come first
served, while the budget (max_num_batched_tokens) and max_num_seqs allow; a prompt larger
than the budget is computed in chunks over several steps. When pages run out the newest
running sequence is preempted: its pages are freed and it is recomputed later.

With pipeline parallel, sequences are split over `num_lanes` lanes and each lane has at
most one batch in flight, so every stage has work while the others compute.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from engine.block_manager import BlockManager
from engine.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus


def sampling_fields(seq: Sequence, eos_token_ids: list[int]) -> dict:
    """What the model runner needs to sample for seq, as plain data (it crosses ranks)."""
    p = seq.params
    return {
        "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
        "seed": None if p.seed is None else p.seed + seq.index,
        "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
        "repetition_penalty": p.repetition_penalty, "min_tokens": p.min_tokens,
        "stop_token_ids": p.stop_token_ids, "eos_token_ids": eos_token_ids, "logprobs": p.logprobs,
        "num_prompt_tokens": seq.num_prompt_tokens,
    }


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, eos_token_ids: list[int],
        num_lanes: int = 1,
    ):
        self.num_lanes = num_lanes
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.eos_token_ids = eos_token_ids  # masked while a sequence is under min_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished_ids: list[str] = []  # to tell the model runners next step
        # seq_id -> (tokens, block ids) the runners have seen, for every sequence they hold state for
        self._sent: dict[str, tuple[int, int]] = {}
        self.unschedulable: list[Sequence] = []  # too long for the whole KV pool; the engine ends them

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _lane_cap(self) -> int:
        """Most running sequences one lane may hold, so that lanes stay balanced."""
        total = len(self.running) + len(self.waiting)
        return min(-(-self.max_num_seqs // self.num_lanes), max(1, -(-total // self.num_lanes)))

    def _pick_victim(self, lane: int) -> Sequence:
        """The newest running sequence of this lane that is not in flight."""
        for j in range(len(self.running) - 1, -1, -1):
            if self.running[j].lane == lane and not self.running[j].in_flight:
                return self.running.pop(j)
        raise AssertionError("no preemptible sequence in the lane being scheduled")

    def schedule(self, lane: int = 0) -> tuple[SchedulerOutput, list[Sequence]]:
        out = SchedulerOutput()
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.lane != lane or seq.in_flight or seq.status != SequenceStatus.RUNNING:
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self._pick_victim(lane)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seq.in_flight = True
                scheduled.append(seq)
                out.num_scheduled_tokens[seq.seq_id] = num_new
                budget -= num_new
        num_in_lane = sum(1 for s in self.running if s.lane == lane)
        cap = self._lane_cap()
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted
               and num_in_lane < cap):
            seq = self.waiting[0]
            computed_blocks, num_cached = self.block_manager.get_computed_blocks(seq)
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(seq, num_new, computed_blocks):
                break
            self.waiting.popleft()
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
            seq.status, seq.lane, seq.in_flight = SequenceStatus.RUNNING, lane, True
            num_in_lane += 1
            self.running.append(seq)
            scheduled.append(seq)
            out.num_scheduled_tokens[seq.seq_id] = num_new
            budget -= num_new
        if not scheduled and not self.running and self.waiting and not preempted:
            self.unschedulable.append(self.waiting.popleft())
        for seq in scheduled:
            self._describe(seq, out)
        out.finished_req_ids, self._finished_ids = self._finished_ids, []
        return out, scheduled

    def _describe(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Full data for a sequence the runners do not hold yet, only the delta otherwise."""
        sent = self._sent.get(seq.seq_id)
        if sent is None:
            out.scheduled_new_reqs.append(NewRequestData(
                seq.seq_id, list(seq.token_ids), list(seq.block_table), seq.num_computed_tokens, sampling_fields(seq, self.eos_token_ids)
            ))
        else:
            num_tokens_sent, num_blocks_sent = sent
            out.scheduled_cached_reqs.append(CachedRequestData(
                seq.seq_id, seq.token_ids[num_tokens_sent:], seq.block_table[num_blocks_sent:], seq.num_computed_tokens
            ))
        self._sent[seq.seq_id] = (seq.num_tokens, len(seq.block_table))

    def _forget(self, seq: Sequence) -> None:
        if self._sent.pop(seq.seq_id, None) is not None:
            self._finished_ids.append(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.in_flight = False
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self._forget(seq)

    def update_after_step(self, scheduled: list[Sequence], num_scheduled_tokens: dict[str, int]) -> None:
        for seq in scheduled:
            seq.in_flight = False
            if seq.status == SequenceStatus.RUNNING:
                seq.num_computed_tokens += num_scheduled_tokens[seq.seq_id]

    def finish(self, seqs: Iterable[Sequence]) -> None:
        """Free finished or aborted sequences, wherever they are."""
        for seq in seqs:
            if seq.status == SequenceStatus.RUNNING:
                self.running.remove(seq)
            elif seq.status == SequenceStatus.WAITING:
                self.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
            self.block_manager.free(seq)
            self._forget(seq)
