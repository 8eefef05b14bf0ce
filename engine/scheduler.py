"""Continuous batching under one token budget per step.

Running sequences are served first (oldest first), then waiting ones, first come first
served, while the budget (max_num_batched_tokens) and max_num_seqs allow; a prompt larger
than the budget is computed in chunks over several steps. When pages run out the newest
running sequence is preempted: its pages are freed and it is recomputed later.

With pipeline parallel, sequences are split over `num_lanes` lanes and each lane has at
most one batch in flight, so every stage has work while the others compute.

With async scheduling (one lane), step t+1 is scheduled while step t runs: a sequence whose
token step t is sampling gets one more step with that token as a placeholder, filled on the GPU
by the model runner. num_computed_tokens therefore advances when a step is scheduled, not when
it comes back. Sequences with penalties (they need every token on the host) and those whose
placeholders already reach max_tokens wait for their token instead.

update_from_output closes the loop (vLLM v1): it appends the sampled tokens, applies the
token-level stop checks (EOS, stop tokens, min_tokens, max_tokens, the context), frees what
finished and returns one EngineCoreOutput per sample that got something. Text (stop strings,
detokenization) is the client's: it aborts a request whose text hits a stop string.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from engine.block_manager import BlockManager
from engine.core_messages import EngineCoreOutput
from engine.lora.request import LoRARequest
from engine.outputs import (
    CachedRequestData, ModelRunnerOutput, NewRequestData, RequestSamplingParams, SchedulerOutput,
)
from engine.sampling_params import mix_seed
from engine.sequence import Sequence, SequenceStatus


def request_sampling_params(seq: Sequence, eos_token_ids: list[int]) -> RequestSamplingParams:
    """What the model runner needs to sample for seq (it crosses ranks once, in NewRequestData)."""
    p = seq.params
    return RequestSamplingParams(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        seed=None if p.seed is None else mix_seed(p.seed, seq.index),  # each sample its own stream
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty, has_penalties=p.has_penalties, min_tokens=p.min_tokens,
        stop_token_ids=p.stop_token_ids, eos_token_ids=eos_token_ids, logprobs=p.logprobs,
        prompt_logprobs=p.prompt_logprobs if seq.needs_prompt_logprobs else None,
        num_prompt_tokens=seq.num_prompt_tokens, logit_bias=p.logit_bias, allowed_token_ids=p.allowed_token_ids,
        bad_words_token_ids=p.bad_words_token_ids or None,
    )


# a prompt chunk of this many new tokens at least this deep takes the long-chunk attention path on a GPU
# (gantry_kernels/cudnn_prefill.py's CUDNN_MIN_QUERY and KEY_PIECES[-1]): several cuDNN calls a layer, hundreds of
# kernel launches a step (SchedulerOutput.has_deep_chunk)
DEEP_CHUNK_TOKENS, DEEP_CHUNK_START = 512, 8192
MIN_PREFILL_CHUNK = 256  # prompt tokens a step that decodes may always give one prefill


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, eos_token_ids: list[int],
        num_lanes: int = 1, async_scheduling: bool = False, max_model_len: int | None = None,
    ):
        self.max_model_len = max_model_len or 2**62  # a sample reaching it finishes with "length"
        self.eos_token_id_set = frozenset(eos_token_ids)
        self.prompt_tokens_total = self.generation_tokens_total = 0  # prompt: cache hits included (vLLM's)
        self.num_steps = 0  # results processed so far (a hang shows as no progress while has_work)
        self.num_lanes, self.async_scheduling = num_lanes, async_scheduling
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.eos_token_ids = eos_token_ids  # masked while a sequence is under min_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished_ids: list[str] = []  # to tell the model runners next step
        # seq_id -> (tokens, block ids) the runners have seen, for every sequence they hold state for
        self._sent: dict[str, tuple[int, int]] = {}
        self.unschedulable: list[Sequence] = []  # too long for the whole KV pool; the engine fails their requests
        self.max_loras: int | None = None  # distinct adapters per step (the device slots), set when LoRA is on
        # the engine core's AdapterPrefetcher.ready when LoRA is on: False while an adapter is read off the engine
        # loop (its sequences wait, keeping their place; the others go on), so that no step reads adapter files
        self.lora_ready: Callable[[LoRARequest], bool] | None = None
        # the StructuredOutputManager's ready (request id): False while a request's grammar compiles off the
        # engine loop (its sequences wait, keeping their place; the others go on)
        self.grammar_ready: Callable[[str], bool] | None = None
        # prompt tokens per step while some sequence of the step decodes (None: the whole budget): bounds
        # how long a burst of new prompts stalls the running streams (their inter-token latency)
        self.max_prefill_tokens_while_decoding: int | None = None
        # in such a step a prompt token at position p counts 1 + p * prefill_context_cost (its linear layers
        # plus attention over p earlier tokens, in units of the linear layers): a chunk deep into a long
        # prompt gets fewer tokens, so the step's time, not its token count, stays bounded
        self.prefill_context_cost = 0.0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _lane_cap(self) -> int:
        """Most running sequences one lane may hold, so that lanes stay balanced."""
        total = len(self.running) + len(self.waiting)
        return min(-(-self.max_num_seqs // self.num_lanes), max(1, -(-total // self.num_lanes)))

    def _pick_victim(self, lane: int, scheduled: list[Sequence]) -> Sequence:
        """The newest running sequence of this lane not already in this step. With async
        scheduling it may be in the step in flight: that step's result for it is dropped."""
        for seq in reversed(self.running):
            if seq.lane == lane and seq not in scheduled and (self.async_scheduling or not seq.num_in_flight):
                return seq
        raise AssertionError("no preemptible sequence in the lane being scheduled")

    def _ready(self, seq: Sequence, lane: int) -> bool:
        """A running sequence of lane that this step may schedule."""
        return seq.lane == lane and seq.status == SequenceStatus.RUNNING and self._may_schedule(seq)

    def _may_schedule(self, seq: Sequence) -> bool:
        """A running sequence whose step is in flight may be scheduled again only if it knows
        its tokens (a prefill chunk) or, with async scheduling, can run on a placeholder."""
        if not seq.num_in_flight:
            return True
        if not self.async_scheduling or not seq.num_placeholders:
            return self.async_scheduling
        request = seq.request  # lengths read directly: this runs for every sequence of an async decode step
        return (not request.params.needs_past_tokens
                and len(seq.token_ids) - seq.num_prompt_tokens + seq.num_placeholders < request.max_tokens)

    def _lora_pending(self, lora: LoRARequest, loras: set[int]) -> bool:
        """lora's adapter is not in a device slot or host memory yet (lora_ready starts its read); one that this
        step holds already is."""
        return self.lora_ready is not None and lora.lora_int_id not in loras and not self.lora_ready(lora)

    def _input_pending(self, seq: Sequence, loras: set[int]) -> bool:
        """seq's adapter is still being read, or its grammar compiled, off the engine loop."""
        request = seq.request
        if request.lora_request is not None and self._lora_pending(request.lora_request, loras):
            return True
        return (self.grammar_ready is not None and request.params.structured_outputs is not None
                and not self.grammar_ready(request.request_id))

    def only_waits_for_inputs(self) -> bool:
        """Nothing runs, and every waiting sequence waits for its adapter's read or its grammar's compile: no step
        is due, which is no hang (the engine core's stats say it has no work to be watched for)."""
        return not self.running and bool(self.waiting) and all(self._input_pending(s, set()) for s in self.waiting)

    def _lora_fits(self, seq: Sequence, loras: set[int]) -> bool:
        """A step holds at most max_loras adapters (added to loras when seq's fits); base requests always fit."""
        lora = seq.request.lora_request
        if lora is None or lora.lora_int_id in loras:
            return True
        if self.max_loras is not None and len(loras) >= self.max_loras:
            return False
        loras.add(lora.lora_int_id)
        return True

    def _schedule_tokens(self, seq: Sequence, num_new: int, out: SchedulerOutput, scheduled: list[Sequence]) -> None:
        if seq.num_computed_tokens + num_new == len(seq.token_ids) + seq.num_placeholders:
            seq.num_placeholders += 1  # this step samples the next token
        if num_new >= DEEP_CHUNK_TOKENS and seq.num_computed_tokens >= DEEP_CHUNK_START:
            out.has_deep_chunk = True
        seq.num_computed_tokens += num_new
        seq.num_in_flight += 1
        scheduled.append(seq)
        out.num_scheduled_tokens[seq.seq_id] = num_new

    def schedule(self, lane: int = 0) -> tuple[SchedulerOutput, list[Sequence]]:
        """One step's batch for `lane`. max_prefill_tokens_while_decoding None: decodes first, prompts
        fill the rest of the budget; N: at most N prompt tokens in a step that decodes; 0: prefill
        first, as vLLM v0 and SGLang's separate prefill batches: while a prompt can be admitted or is
        part-way through its prefill, steps carry prompts only and decodes wait. A burst then costs
        each running stream one long gap (from its first token to its second), not one per step."""
        if self.max_prefill_tokens_while_decoding == 0 and self._prefill_pending(lane):
            out, scheduled = self._schedule(lane, decode=False)
            if scheduled or out.finished_req_ids:
                return out, scheduled
        return self._schedule(lane, decode=True)

    def _prefill_pending(self, lane: int) -> bool:
        """A running sequence of lane is part-way through its prompt, or the oldest waiting one may start."""
        return (any(self._ready(s, lane) and s.num_uncomputed_tokens > 1 for s in self.running)
                or (bool(self.waiting) and len(self.running) < self.max_num_seqs and not self.waiting[0].num_in_flight))

    def _schedule(self, lane: int, decode: bool) -> tuple[SchedulerOutput, list[Sequence]]:
        out = SchedulerOutput()
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        preempted = False
        loras: set[int] = set()  # adapters in this step
        prefill_budget: float | None = None  # cost units left for prompt tokens when the step decodes too
        if (self.max_prefill_tokens_while_decoding or self.prefill_context_cost) and any(
                self._ready(s, lane) and s.num_uncomputed_tokens == 1 for s in self.running):
            prefill_budget = self.max_prefill_tokens_while_decoding or budget
        first_chunk = True
        running = SequenceStatus.RUNNING
        for seq in list(self.running):
            if budget <= 0:
                break
            # _ready and num_uncomputed_tokens inlined: this loop runs once per running sequence per step
            if seq.lane != lane or seq.status is not running or (seq.num_in_flight and not self._may_schedule(seq)):
                continue
            num_new = len(seq.token_ids) + seq.num_placeholders - seq.num_computed_tokens
            if not decode and num_new == 1:
                continue  # a prefill-first step: this decode waits
            lora = seq.request.lora_request
            if lora is not None and (self._lora_pending(lora, loras) or not self._lora_fits(seq, loras)):
                continue
            if num_new > 1:
                num_new = self._prefill_chunk(seq.num_computed_tokens, num_new, budget, prefill_budget, first_chunk)
            if num_new <= 0:
                continue
            while not self.block_manager.allocate(seq, num_new):
                victim = self._pick_victim(lane, scheduled)
                if victim is seq and seq.num_in_flight:
                    # its own step is still in flight: wait for that token rather than drop it
                    # (dropping it and recomputing could repeat forever at the edge of the pool)
                    break
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                if num_new > 1 and prefill_budget is not None:
                    prefill_budget -= self._prefill_cost(seq.num_computed_tokens, num_new)
                first_chunk = first_chunk and num_new == 1
                self._schedule_tokens(seq, num_new, out, scheduled)
                budget -= num_new
        num_in_lane = sum(1 for s in self.running if s.lane == lane)
        cap = self._lane_cap()
        i, head = 0, None  # waiting[i] is next; head: the first one not passed over for its adapter
        while (i < len(self.waiting) and budget > 0 and (prefill_budget is None or prefill_budget > 0)
               and len(self.running) < self.max_num_seqs and not preempted and num_in_lane < cap):
            seq = self.waiting[i]
            if not seq.num_in_flight and self._input_pending(seq, loras):
                i += 1  # its adapter is being read or its grammar compiled: it keeps its place, those behind go on
                continue
            if head is None:
                head = seq
            if seq.num_in_flight or not self._lora_fits(seq, loras):  # in flight when preempted: wait for it
                break
            # prompt logprobs need every prompt position's logits: no prefix-cache hits (as vLLM)
            computed_blocks, num_cached = (([], 0) if seq.needs_prompt_logprobs
                                           else self.block_manager.get_computed_blocks(seq))
            num_new = self._prefill_chunk(num_cached, seq.num_tokens - num_cached, budget, prefill_budget, first_chunk)
            if num_new <= 0 or not self.block_manager.allocate(seq, num_new, computed_blocks):
                break
            if prefill_budget is not None:
                prefill_budget -= self._prefill_cost(num_cached, num_new)
            first_chunk = False
            del self.waiting[i]
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
            seq.status, seq.lane = SequenceStatus.RUNNING, lane
            num_in_lane += 1
            self.running.append(seq)
            self._schedule_tokens(seq, num_new, out, scheduled)
            budget -= num_new
        if not scheduled and not self.running and head is not None and not preempted and not head.num_in_flight:
            # the whole pool is free and the oldest sequence (whose adapter is ready) still does not fit: it never
            # will. It stays in `waiting` (status WAITING) until the engine finishes its request.
            self.unschedulable.append(head)
        for seq in scheduled:
            self._describe(seq, out)
        out.finished_req_ids, self._finished_ids = self._finished_ids, []
        return out, scheduled

    def _prefill_cost(self, start: int, num_tokens: int) -> float:
        """Cost of prompt positions start .. start + num_tokens - 1 (see prefill_context_cost)."""
        return num_tokens + self.prefill_context_cost * (num_tokens * start + num_tokens * (num_tokens - 1) / 2)

    def _prefill_chunk(self, start: int, num_left: int, budget: int, prefill_budget: float | None,
                       first_chunk: bool) -> int:
        """Prompt tokens to compute from position `start`: within the step's token budget and, in a step
        that decodes too, the most whose cost fits prefill_budget. Weighted by context, the step's first
        chunk gets at least MIN_PREFILL_CHUNK tokens, so a prompt deep into a long context still advances."""
        n = min(num_left, budget)
        if prefill_budget is None:
            return n
        if prefill_budget <= 0:
            return 0
        w = self.prefill_context_cost
        if w > 0:  # the positive root of n + w * (n * start + n * (n - 1) / 2) = prefill_budget
            b = 1 + w * (start - 0.5)
            fit = int((-b + (b * b + 2 * w * prefill_budget) ** 0.5) / w)
        else:
            fit = int(prefill_budget)
        while fit > 0 and self._prefill_cost(start, fit) > prefill_budget:  # float rounding
            fit -= 1
        if first_chunk and w > 0:
            fit = max(fit, min(MIN_PREFILL_CHUNK, int(prefill_budget)))
        return min(n, fit)

    def _describe(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Full data for a sequence the runners do not hold yet, only the delta otherwise; returns the
        step's first position."""
        start = seq.num_computed_tokens - out.num_scheduled_tokens[seq.seq_id]
        sent = self._sent.get(seq.seq_id)
        if sent is None:
            out.scheduled_new_reqs.append(NewRequestData(
                seq.seq_id, list(seq.token_ids), list(seq.block_table), start,
                request_sampling_params(seq, self.eos_token_ids), seq.request.lora_request,
            ))
        else:
            num_tokens_sent, num_blocks_sent = sent
            out.scheduled_cached_reqs.append(CachedRequestData(
                seq.seq_id, seq.token_ids[num_tokens_sent:], seq.block_table[num_blocks_sent:], start
            ))
        self._sent[seq.seq_id] = (len(seq.token_ids), len(seq.block_table))
        return start

    def _forget(self, seq: Sequence) -> None:
        if self._sent.pop(seq.seq_id, None) is not None:
            self._finished_ids.append(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_placeholders = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self._forget(seq)

    def update_from_output(self, scheduler_output: SchedulerOutput, scheduled: list[Sequence],
                           result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Apply one step's result to the sequences it was scheduled for (scheduler_output,
        scheduled: what schedule() returned). A sequence finished, aborted or preempted while
        the step was in flight gets nothing from it."""
        self.num_steps += 1
        by_id: dict[str, Sequence] = {}
        for seq in scheduled:
            seq.num_in_flight -= 1
            by_id[seq.seq_id] = seq
        outputs: dict[str, EngineCoreOutput] = {}  # seq id -> its output; batch order
        for seq_id, chunk in (result.prompt_logprobs or {}).items():
            seq = by_id.get(seq_id)
            if seq is None or seq.status != SequenceStatus.RUNNING:
                continue  # finished, aborted, or preempted in flight (it recomputes what it lacks)
            request = seq.request
            request.num_prompt_logprobs = max(request.num_prompt_logprobs, chunk.first_position + len(chunk.entries))
            self._output(seq, outputs).new_prompt_logprobs = (chunk.first_position, chunk.entries)
        running, logprobs, num_generated = SequenceStatus.RUNNING, result.logprobs, 0
        for i, (seq_id, token_id) in enumerate(zip(result.req_ids, result.sampled_token_ids)):
            seq = by_id.get(seq_id)
            if seq is None or seq.status is not running:
                continue
            seq.num_placeholders -= 1
            seq.token_ids.append(token_id)
            num_generated += 1
            if seq.index == 0 and len(seq.token_ids) == seq.num_prompt_tokens + 1:
                self.prompt_tokens_total += seq.num_prompt_tokens  # a request's first token: its whole prompt
            out = self._output(seq, outputs)
            out.new_token_ids.append(token_id)
            if logprobs and logprobs[i] is not None:
                if out.new_logprobs is None:
                    out.new_logprobs = []
                out.new_logprobs.append(logprobs[i])
            if self._check_stop(seq, token_id):
                out.finish_reason, out.stop_reason = seq.finish_reason, seq.stop_reason
                self.finish([seq])
        self.generation_tokens_total += num_generated
        return list(outputs.values())

    def _output(self, seq: Sequence, outputs: dict[str, EngineCoreOutput]) -> EngineCoreOutput:
        out = outputs.get(seq.seq_id)
        if out is None:
            out = outputs[seq.seq_id] = EngineCoreOutput(
                request_id=seq.request.request_id, index=seq.index, new_token_ids=[],
                num_cached_tokens=seq.num_cached_tokens)
        return out

    def _check_stop(self, seq: Sequence, token_id: int) -> bool:
        """Token-level stop conditions, after token_id was appended; sets finish_reason."""
        params, request = seq.params, seq.request
        num_tokens = len(seq.token_ids)
        num_output = num_tokens - seq.num_prompt_tokens
        if num_output >= params.min_tokens and (
                (token_id in self.eos_token_id_set and not params.ignore_eos) or token_id in params.stop_token_ids):
            seq.finish_reason = "stop"
            seq.stop_reason = token_id if token_id in params.stop_token_ids else None
        elif num_output >= request.max_tokens or num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

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
