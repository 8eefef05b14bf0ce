"""CUDA graphs for decode batches: one graph per padded batch size, captured once after the
KV pool exists, replayed with the step's inputs copied into static buffers.

Only the model's forward (to hidden states) is captured; the LM head and the sampler run
eagerly on the real rows. Padding rows store nothing (slot -1) and attend over one token.
"""
from __future__ import annotations

import bisect
import logging

import torch
from torch import nn

from engine.forward_context import ForwardContext, forward_context

logger = logging.getLogger("gantry.engine")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 513, 32))
    return [s for s in sizes if s <= max_num_seqs] or [1]


class DecodeCUDAGraphs:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device):
        self.model = model
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((self.max_bs,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(self.max_bs, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(self.max_bs, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _context(self, bs: int) -> ForwardContext:
        return ForwardContext(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs], seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1], logits_indices=self.logits_indices[:bs],
            max_query_len=1, max_seq_len=self.max_model_len, is_decode=True,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            with forward_context(self._context(bs)):
                self.model(self.input_ids[:bs], self.positions[:bs])  # warm-up: Triton autotune, allocator
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, ctx: ForwardContext) -> bool:
        return ctx.is_decode and ctx.seq_lens.shape[0] <= self.max_bs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """[bs] tokens of a decode step -> hidden states [bs, hidden]."""
        bs = input_ids.shape[0]
        gs = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[:bs].copy_(ctx.slot_mapping)
        self.slot_mapping[bs:gs].fill_(-1)
        self.seq_lens[:bs].copy_(ctx.seq_lens)
        self.seq_lens[bs:gs].fill_(1)
        self.block_tables[:bs, : ctx.block_tables.shape[1]].copy_(ctx.block_tables)
        self.block_tables[bs:gs, 0].fill_(0)
        self.graphs[gs].replay()
        return self.outputs[gs][:bs]
