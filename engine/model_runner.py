"""ModelRunner: holds this rank's model shard and KV pool (its pages: kv_pool.py); turns a SchedulerOutput
into input tensors and a forward context, runs the model, and samples on the last PP stage."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from engine.config import EngineConfig
from engine.decode_inputs import decode_inputs
from engine.forward_context import ForwardContext, forward_context
from engine.kv_pool import (allocate_kv_pages, check_max_model_len_fits_memory, gpu_kv_budget, kv_block_bytes,
                            memory_at_start, profile_context)
from engine.layers.attention import Attention
from engine.layers.quant.fp8_kv import resolve_kv_cache_dtype
from engine.layers.rotary import rotary_positions
from engine.layers.sampler import Sampler, SamplingMetadata
from engine.loader import check_checkpoint_sizes, load_weights
from engine.lora.punica import lora_batch
from engine.lora.request import LoRARequest
from engine.model_config import ModelConfig, cpu_kv_cache_tokens
from engine.models.registry import get_model_class
from engine.outputs import ModelRunnerOutput, RequestSamplingParams, SchedulerOutput
from engine.parallel import broadcast_from_first_tp_rank, get_parallel_state
from engine.prompt_logprobs import compute_prompt_logprobs, plan_prompt_logprobs
from engine.runner_output import PendingOutput, PreparedStep, StepLogits
from engine.sampling_metadata import SamplingMetadataBuilder, to_device
from engine.structured.bitmask import sampled_bitmask

PLACEHOLDER = -1  # a token this runner sampled whose value the scheduler has not sent back yet


@dataclass
class RunnerRequestState:
    token_ids: list[int]  # prompt + output; sampled tokens not sent back yet are PLACEHOLDER
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: RequestSamplingParams
    row: int  # this request's row in ModelRunner.block_table_cpu
    num_known_tokens: int  # leading token_ids whose values are known here
    lora_request: LoRARequest | None = None  # its adapter (None: the base model)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device, show_progress: bool):
        self.config, self.model_config, self.device = config, model_config, device
        self.block_size = config.block_size
        self.parallel = get_parallel_state()
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, model_config.dtype, device)  # pages
        hf = model_config.hf_config
        model_cls = get_model_class(hf.architectures, model_config.path)
        self.memory_at_start = None  # GPU memory not this engine's (kv_pool.MemoryAtStart), when util sizes the pool
        if device.type == "cuda" and config.num_kv_blocks is None and config.kv_cache_memory_gib is None:
            self.memory_at_start = memory_at_start(device, config.gpu_memory_utilization)
        check_checkpoint_sizes(model_config)  # before a config size far beyond the weights allocates the model
        check_max_model_len_fits_memory(config, model_config, self.kv_cache_dtype, self.parallel.tp_size,
                                        self.parallel.pp_size, device)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(model_config.dtype)
        try:
            with torch.device(device), rotary_positions(model_config.max_model_len):
                self.model: nn.Module = model_cls(hf)
        finally:
            torch.set_default_dtype(previous)
        self.model.eval()
        load_weights(self.model, model_config, show_progress, config.seed)
        self.lora_manager = None  # engine.lora.manager.LoRAManager when enable_lora
        if config.enable_lora:
            from engine.lora.manager import LoRAManager

            self.lora_manager = LoRAManager(self.model, hf, config.max_loras, config.max_cpu_loras or config.max_loras,
                                            config.max_lora_rank, config.max_num_seqs, model_config.dtype, device)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler()
        self.default_generator = torch.Generator(device=device).manual_seed(config.seed)
        self.metadata_builder = SamplingMetadataBuilder(model_config.hf_config.vocab_size, device)
        self.requests: dict[str, RunnerRequestState] = {}
        self.num_blocks = 0
        self._pending_sends: list[tuple[dist.Work, torch.Tensor]] = []
        self.cuda_graphs = None  # DecodeCUDAGraphs once the KV pool exists (GPU, pp = 1, not enforce_eager)
        # [max_num_seqs, max_blocks_per_seq] block ids, one row per running request, updated in place
        max_blocks = -(-model_config.max_model_len // self.block_size)
        self.block_table_cpu = np.zeros((config.max_num_seqs, max_blocks), dtype=np.int32)
        self.free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        # the last step's sampled tokens, still on the device, to fill the next step's placeholders
        self.last_sampled: torch.Tensor | None = None
        self.last_sampled_ids: list[str] = []  # its rows' requests (_last_sampled_rows)
        self._last_sampled_index: dict[str, int] | None = None  # built from last_sampled_ids when needed
        self._num_prompt_logprobs = 0  # requests held that ask for prompt logprobs (none: no plan to build)
        # with async scheduling every TP rank feeds the next step from its own copy of the sampled
        # tokens, so they must be the first TP rank's bit for bit (random draws could differ)
        self.share_sampled = self.parallel.tp_size > 1 and config.uses_async_scheduling(device.type)

    # ---- KV pool -------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        return kv_block_bytes(self.attn_layers, self.block_size, self.kv_cache_dtype)

    @torch.inference_mode()
    def determine_num_blocks(self) -> int:
        """Blocks this rank can hold: fixed by config, or what memory is left after a profiling
        forward at the full token budget (GPU), or kv_cache_memory_gib (CPU: cpu_kv_cache_tokens)."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = self.kv_bytes_per_block()
        if self.config.kv_cache_memory_gib is not None:
            return max(1, int(self.config.kv_cache_memory_gib * 2**30 // per_block))
        if self.device.type != "cuda":
            return -(-cpu_kv_cache_tokens(self.model_config.max_model_len) // self.block_size)
        # self.kv_budget: what the pool is sized on (benchmarks read it)
        budget, self.kv_budget = gpu_kv_budget(self.device, self.config.gpu_memory_utilization, self._profile_run,
                                               self.memory_at_start)
        return max(0, int(budget // per_block))

    def _profile_run(self) -> None:
        num_tokens = min(self.config.step_token_budget(self.device.type), self.model_config.max_model_len * 4)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device) % self.model_config.max_model_len
        ctx = profile_context(num_tokens, self.config.max_num_seqs, self.device)
        with forward_context(ctx):
            if self.parallel.is_first_pp_rank:
                hidden = self.model(input_ids, positions)
            else:  # later stages profile on zeros of the shape they would receive
                zeros = torch.zeros(num_tokens, self.model_config.hf_config.hidden_size, dtype=self.model_config.dtype, device=self.device)
                hidden = self.model(input_ids, positions, (zeros, zeros.clone()))
            if self.parallel.is_last_pp_rank:
                self.model.compute_logits(hidden)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The pages (kv_pool.py), then the prefill kernels' warm-up and the decode CUDA graphs that read them."""
        allocate_kv_pages(self.attn_layers, num_blocks, self.block_size, self.kv_cache_dtype, self.device)
        self.num_blocks = num_blocks
        p = self.parallel
        if self.device.type == "cuda":  # compile the prefill kernel's variants now, not mid-serve
            from gantry_kernels import cudnn_prefill
            from gantry_kernels.prefill_attention import warmup

            layer = self.attn_layers[0]
            warmup(layer.k_cache, layer.v_cache, layer.num_heads, self.model_config.dtype, layer.scale)
            cudnn_prefill.warmup(layer.k_cache, layer.num_heads, self.model_config.dtype, layer.k_scale, layer.v_scale,
                                 self.config.step_token_budget(self.device.type), self.model_config.max_model_len)
        if self.device.type == "cuda" and not self.config.enforce_eager and p.pp_size == 1:
            from engine.cuda_graph import DecodeCUDAGraphs

            self.cuda_graphs = DecodeCUDAGraphs(
                self.model, self.config.max_num_seqs, self.model_config.max_model_len, self.block_size, self.device
            )
            self.cuda_graphs.capture()
            if self.lora_manager is not None:  # a second set with the LoRA kernels, for steps with adapters
                self.lora_manager.capture_graphs(DecodeCUDAGraphs(
                    self.model, self.config.max_num_seqs, self.model_config.max_model_len, self.block_size, self.device))

    # ---- one step --------------------------------------------------------------------------

    def update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self.free_rows.append(state.row)
                self._num_prompt_logprobs -= state.sampling_params.prompt_logprobs is not None
        for new in so.scheduled_new_reqs:
            state = RunnerRequestState(list(new.prompt_token_ids), list(new.block_ids), new.num_computed_tokens,
                                       new.sampling_params, self.free_rows.pop(), len(new.prompt_token_ids),
                                       new.lora_request)
            self.block_table_cpu[state.row, : len(state.block_ids)] = state.block_ids
            old = self.requests.get(new.req_id)
            self._num_prompt_logprobs += ((new.sampling_params.prompt_logprobs is not None)
                                          - (old is not None and old.sampling_params.prompt_logprobs is not None))
            self.requests[new.req_id] = state
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            for token_id in cached.new_token_ids:  # fill placeholders first, then append
                if state.num_known_tokens < len(state.token_ids):
                    state.token_ids[state.num_known_tokens] = token_id
                else:
                    state.token_ids.append(token_id)
                state.num_known_tokens += 1
            if cached.new_block_ids:
                n = len(state.block_ids)
                self.block_table_cpu[state.row, n : n + len(cached.new_block_ids)] = cached.new_block_ids
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def prepare_inputs(self, so: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, ForwardContext, list[str],
                                                           tuple[torch.Tensor, torch.Tensor] | None]:
        """Host data of the step on its way to the device; feed: (input positions, rows of last_sampled) of
        the placeholder tokens, gathered at launch (the previous step's sampler may not be queued yet)."""
        dev = self.to_device
        if len(so.num_scheduled_tokens) == so.total_num_scheduled_tokens:  # every request decodes one token
            ids = list(so.num_scheduled_tokens)
            d = decode_inputs([self.requests[r] for r in ids], ids, self.block_table_cpu, self.block_size,
                              PLACEHOLDER, self._last_sampled_rows)
            ctx = ForwardContext(
                slot_mapping=dev(d["slots"], torch.long), block_tables=dev(d["block_tables"], torch.int32),
                seq_lens=dev(d["seq_lens"], torch.int32), query_start_loc=dev(d["query_start_loc"], torch.int32),
                logits_indices=dev(d["logits_indices"], torch.long), max_query_len=1, max_seq_len=d["max_seq_len"],
                is_decode=True,
            )
            feed = None if d["feed_dst"] is None else (dev(d["feed_dst"], torch.long), dev(d["feed_src"], torch.long))
            return dev(d["input_ids"], torch.long), dev(d["positions"], torch.long), ctx, d["sampled_ids"], feed
        bs = self.block_size
        input_ids: list[int] = []
        feed_dst: list[int] = []  # input positions whose token is the last step's sampled one ...
        feed_src: list[int] = []  # ... at this index of self.last_sampled
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc, seq_lens, logits_indices, sampled_ids, rows = [0], [], [], [], []
        max_blocks = 0
        for req_id, num_new in so.num_scheduled_tokens.items():
            state = self.requests[req_id]
            start = state.num_computed_tokens
            end = start + num_new
            if state.token_ids[end - 1] == PLACEHOLDER:  # only the newest token can be one
                feed_dst.append(len(input_ids) + num_new - 1)
                feed_src.append(self._last_sampled_rows([req_id])[0])
            if num_new == 1:  # decode: plain ints beat numpy at this size
                input_ids.append(state.token_ids[start])
                positions.append(start)
                slots.append(state.block_ids[start // bs] * bs + start % bs)
            else:
                input_ids.extend(state.token_ids[start:end])
                pos = np.arange(start, end)
                positions.extend(pos.tolist())
                table = np.asarray(state.block_ids, dtype=np.int64)
                slots.extend((table[pos // bs] * bs + pos % bs).tolist())
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(end)
            rows.append(state.row)
            max_blocks = max(max_blocks, len(state.block_ids))
            if end == len(state.token_ids):
                logits_indices.append(query_start_loc[-1] - 1)
                sampled_ids.append(req_id)
            state.num_computed_tokens = end
        block_tables = self.block_table_cpu[rows, :max_blocks]

        max_query_len = max(so.num_scheduled_tokens.values())
        ctx = ForwardContext(
            slot_mapping=dev(slots, torch.long),
            block_tables=dev(block_tables, torch.int32),
            seq_lens=dev(seq_lens, torch.int32),
            query_start_loc=dev(query_start_loc, torch.int32),
            logits_indices=dev(logits_indices, torch.long),
            max_query_len=max_query_len, max_seq_len=max(seq_lens), is_decode=max_query_len == 1,
            query_start_loc_host=query_start_loc, seq_lens_host=seq_lens,
        )
        feed = (dev(feed_dst, torch.long), dev(feed_src, torch.long)) if feed_dst else None
        return dev(input_ids, torch.long), dev(positions, torch.long), ctx, sampled_ids, feed

    def _recv_intermediate(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden_states, residual) of this batch from the previous pipeline stage."""
        p = self.parallel
        shape = (num_tokens, self.model_config.hf_config.hidden_size)
        hidden = torch.empty(shape, dtype=self.model_config.dtype, device=self.device)
        residual = torch.empty_like(hidden)
        dist.recv(hidden, p.rank - p.tp_size, group=p.pp_group)
        dist.recv(residual, p.rank - p.tp_size, group=p.pp_group)
        return hidden, residual

    def _send_intermediate(self, intermediate: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Non-blocking, so this stage can take the next batch while the next stage works."""
        p = self.parallel
        self._pending_sends = [(w, t) for w, t in self._pending_sends if not w.is_completed()]
        for t in intermediate:
            t = t.contiguous()
            self._pending_sends.append((dist.isend(t, p.rank + p.tp_size, group=p.pp_group), t))

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run this rank's layers; the last pipeline stage returns the sampled tokens, others None."""
        pending = self.submit_model(so)
        return None if pending is None else pending.get()

    def submit_model(self, so: SchedulerOutput) -> PendingOutput | None:
        """Queue this rank's layers and the sampler on the device without waiting for them; the
        last pipeline stage returns its sampled tokens as a PendingOutput, others None."""
        forwarded = self.submit_forward(so)
        if isinstance(forwarded, StepLogits):
            return self.submit_sample(forwarded, so.grammar_bitmask, so.structured_output_req_ids)
        return forwarded

    def submit_forward(self, so: SchedulerOutput) -> StepLogits | PendingOutput | None:
        """Queue this rank's layers (and the logits) without sampling: StepLogits for submit_sample
        when the step samples, a finished PendingOutput when it does not, None off the last PP stage.
        The caller queues submit_sample before the next submit_forward (it feeds that step's inputs)."""
        return self.launch_forward(self.prepare_forward(so))

    @torch.inference_mode()
    def prepare_forward(self, so: SchedulerOutput) -> PreparedStep | PendingOutput | None:
        """submit_forward's host part: the inputs, with no device work that reads the previous step's
        tokens, so it may run before the previous step's submit_sample (its placeholders are appended at
        its launch); launch_forward follows that submit_sample."""
        self.update_states(so)
        is_last = self.parallel.is_last_pp_rank
        if not so.num_scheduled_tokens:
            return PendingOutput.empty() if is_last else None
        # before prepare_inputs advances the requests
        plan = plan_prompt_logprobs(so, self.requests) if self._num_prompt_logprobs else None
        input_ids, positions, ctx, sampled_ids, feed = self.prepare_inputs(so)
        lora = None
        if self.lora_manager is not None:  # None when no request of this step has an adapter
            lora = self.lora_manager.prepare([self.requests[r].lora_request for r in so.num_scheduled_tokens],
                                             list(so.num_scheduled_tokens.values()), ctx.is_decode)
        step = PreparedStep(input_ids, positions, ctx, sampled_ids, feed, plan, lora)
        if is_last:  # the next step's placeholders are rows of this step's tokens (set by submit_sample)
            self.last_sampled_ids, self._last_sampled_index = sampled_ids, None
        return step

    def _last_sampled_rows(self, req_ids: list[str]) -> list[int] | range:
        """Each request's row in last_sampled (the previous step's tokens): in a steady decode batch the
        same requests in the same order, so no lookup."""
        if req_ids == self.last_sampled_ids:
            return range(len(req_ids))
        if self._last_sampled_index is None:
            self._last_sampled_index = {r: i for i, r in enumerate(self.last_sampled_ids)}
        return [self._last_sampled_index[r] for r in req_ids]

    @torch.inference_mode()
    def launch_forward(self, step: PreparedStep | PendingOutput | None) -> StepLogits | PendingOutput | None:
        """submit_forward's device part: fill the placeholders from last_sampled, run the layers. What
        prepare_forward returned for a step with nothing to run passes through."""
        if not isinstance(step, PreparedStep):
            return step
        input_ids, positions, ctx = step.input_ids, step.positions, step.ctx
        if step.feed is not None:
            assert self.last_sampled is not None
            input_ids[step.feed[0]] = self.last_sampled[step.feed[1]]
        intermediate = None if self.parallel.is_first_pp_rank else self._recv_intermediate(len(input_ids))
        graphs = self.cuda_graphs if step.lora is None else self.lora_manager.graphs
        with forward_context(ctx), lora_batch(step.lora):
            if graphs is not None and graphs.can_run(ctx):
                hidden = graphs.run(input_ids, positions, ctx)
            else:
                hidden = self.model(input_ids, positions, intermediate)
            if not self.parallel.is_last_pp_rank:
                self._send_intermediate(hidden)
                return None
            logits = self.model.compute_logits(hidden)
        prompt_logprobs = None if step.plan is None else compute_prompt_logprobs(self.model, hidden, ctx, step.plan)
        sampled_ids = step.sampled_ids
        if not sampled_ids:
            self.last_sampled = None
            return PendingOutput.empty(prompt_logprobs)
        # built while the forward runs, before this step's placeholders are appended (it counts the tokens)
        states = [self.requests[r] for r in sampled_ids]
        md = self.sampling_metadata(sampled_ids, states)
        num_logprobs = [s.sampling_params.logprobs for s in states]
        for state in states:
            state.token_ids.append(PLACEHOLDER)
        return StepLogits(logits, md, sampled_ids, prompt_logprobs, num_logprobs)

    @torch.inference_mode()
    def submit_sample(self, step: StepLogits, grammar_bitmask: torch.Tensor | None,
                      bitmask_req_ids: list[str]) -> PendingOutput:
        """Queue the sampler of a step submit_forward queued (grammar_bitmask: [k, ceil(vocab / 32)]
        int32 host rows of bitmask_req_ids, or None) and the copy of its tokens to the host."""
        sampled_ids, md = step.sampled_ids, step.metadata
        md.grammar_bitmask, md.grammar_rows = sampled_bitmask(grammar_bitmask, bitmask_req_ids, sampled_ids,
                                                              step.logits.shape[-1], self.to_device)
        out = self.sampler(step.logits, md)
        if self.share_sampled:
            broadcast_from_first_tp_rank(out.sampled_token_ids)
        self.last_sampled = out.sampled_token_ids  # placeholders and last_sampled_ids: prepare_forward's
        on_gpu = self.device.type == "cuda"
        sampled = out.sampled_token_ids.to("cpu", non_blocking=on_gpu)
        logprob_parts, num_logprobs = None, []
        if out.logprobs is not None:
            logprob_parts = tuple(t.to("cpu", non_blocking=on_gpu) for t in (out.logprob_token_ids, out.logprobs, out.sampled_ranks))
            num_logprobs = step.num_logprobs  # the next step's update_states may have dropped a finished request
        event = None
        if on_gpu:
            event = torch.cuda.Event()
            event.record()
        return PendingOutput(sampled_ids, sampled, logprob_parts, num_logprobs, event, step.prompt_logprobs)

    def to_device(self, x: np.ndarray | list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(x, dtype, self.device)

    def release(self) -> None:
        """At shutdown: drop the weights, KV pages, CUDA graphs and buffers, and return the GPU memory, even while
        the LLM (or a reference to this runner) lives on, so the next engine in the process finds it free.
        Idempotent; the runner is unusable after it (see __getattr__)."""
        device = vars(self).get("device")
        vars(self).clear()
        self._released = True
        if device is not None and device.type == "cuda":
            import gc

            gc.collect()  # the model's modules reference each other (parametrized layers, LoRA wrappers)
            torch.cuda.empty_cache()

    def __getattr__(self, name: str):  # called only for a name not found: after release(), every name
        if vars(self).get("_released"):
            raise RuntimeError(f"ModelRunner.{name}: the engine was shut down (its weights and KV cache released)")
        raise AttributeError(name)

    def sampling_metadata(self, req_ids: list[str], states: list[RunnerRequestState] | None = None) -> SamplingMetadata:
        """states: req_ids' (the caller may have them already)."""
        states = [self.requests[r] for r in req_ids] if states is None else states
        return self.metadata_builder.build(states, self.default_generator)
