"""LoRAManager (one per rank): attaches LoRA slots to the model's linear layers, keeps adapters
in a host LRU (max_cpu_loras) and max_loras of them resident in device slots, swapped between
steps, and builds each step's LoRABatch (None when no request of the step has an adapter).
Adapters are read ahead of their first step, off the engine loop (prefetch.py: read, admit), else inside
the step; one a step cannot read (its files removed or spoiled since) runs that step on the base model and
is reported (take_failed): the engine core fails its requests alone."""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.lora.adapter import LoRAError, LoRAModel, ModelDims, read_adapter
from engine.lora.augmented import AugmentedLoRALinear, lora_path, use_augmented
from engine.lora.layers import LoRALinear, LoRASlice
from engine.lora.punica import LoRABatch, lora_batch
from engine.lora.request import LoRARequest

logger = logging.getLogger("gantry.engine")


DECODE_TILE, PREFILL_TILE = 32, 64  # tokens per SGMV tile (measured on an H200)


def tile_segments(counts: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(seg_start, seg_slot) int32: each slot's tokens (counts per slot, grouped in perm) cut into tiles of at
    most `tile`, so the kernel's grid has one program row per tile and none for empty slots."""
    starts, slots, pos = [0], [], 0
    for slot, count in enumerate(counts.tolist()):
        for offset in range(0, count, tile):
            pos += min(tile, count - offset)
            starts.append(pos)
            slots.append(slot)
    return np.array(starts, dtype=np.int32), np.array(slots, dtype=np.int32)


def stack_rank(max_lora_rank: int) -> int:
    """Rank of the slot stacks: max_lora_rank rounded up to 16 (tl.dot's smallest tile); zeros pad."""
    return -(-max_lora_rank // 16) * 16


def attach_lora(model: nn.Module, dims: ModelDims, max_loras: int, rank: int, dtype: torch.dtype,
                device: torch.device) -> dict[int, list[LoRALinear | AugmentedLoRALinear]]:
    """LoRA slots on every q/k/v/o/gate/up/down projection this rank holds: layer index -> its four.
    Augmented K (one GEMM) where the base weight is plain and GANTRY_LORA_PATH is augmented (the default),
    else SGMV."""
    path = lora_path()
    attached: dict[int, list[LoRALinear | AugmentedLoRALinear]] = {}
    for idx, layer in model.model.layers.items():
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = attn.qkv_proj, mlp.gate_up_proj
        tp_rank, tp_size = qkv.tp_rank, qkv.tp_size
        q, kv = qkv.num_heads * qkv.head_dim, qkv.num_kv_heads * qkv.head_dim
        kv_start = tp_rank // qkv.kv_replicas * kv
        inter = dims.intermediate // tp_size
        specs = [
            (qkv, [LoRASlice("q_proj", 0, q, tp_rank * q), LoRASlice("k_proj", q, kv, kv_start),
                   LoRASlice("v_proj", q + kv, kv, kv_start)], dims.hidden, False),
            (attn.o_proj, [LoRASlice("o_proj", 0, dims.hidden, 0)], dims.q_size // tp_size, True),
            (gate_up, [LoRASlice("gate_proj", 0, inter, tp_rank * inter),
                       LoRASlice("up_proj", inter, inter, tp_rank * inter)], dims.hidden, False),
            (mlp.down_proj, [LoRASlice("down_proj", 0, dims.hidden, 0)], inter, True),
        ]
        attached[int(idx)] = []
        for linear, slices, in_local, row_parallel in specs:
            in_start = tp_rank * in_local if row_parallel else 0
            if use_augmented(path, linear, dtype):
                linear.lora = AugmentedLoRALinear(slices, in_local, in_start, row_parallel, max_loras, rank, linear)
            else:
                linear.lora = LoRALinear(slices, in_local, in_start, row_parallel, max_loras, rank, dtype, device)
            attached[int(idx)].append(linear.lora)
    return attached


def pin_weights(weights: dict[Any, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
                ) -> dict[Any, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's (A, B) pairs as views of one pinned host buffer in the slots' dtype: one pinned allocation,
    not two per module, and the rounding the slot copy would do, done once here (same values)."""
    flat = torch.empty(sum(a.numel() + b.numel() for a, b in weights.values()), dtype=dtype, pin_memory=True)
    pinned, at = {}, 0
    for key, pair in weights.items():
        views = []
        for t in pair:
            views.append(flat[at : at + t.numel()].view(t.shape).copy_(t))
            at += t.numel()
        pinned[key] = (views[0], views[1])
    return pinned


class LoRAManager:
    def __init__(self, model: nn.Module, hf_config: Any, max_loras: int, max_cpu_loras: int, max_lora_rank: int,
                 max_num_seqs: int, dtype: torch.dtype, device: torch.device, use_triton: bool | None = None):
        self.dims = ModelDims.from_hf(hf_config)
        self.max_loras, self.max_cpu_loras, self.max_lora_rank = max_loras, max_cpu_loras, max_lora_rank
        # Triton kernels and static decode buffers: on CUDA (tests force them on CPU under Triton's interpreter)
        self.device, self.use_triton = device, device.type == "cuda" if use_triton is None else use_triton
        self.dtype = dtype
        self.layers = attach_lora(model, self.dims, max_loras, stack_rank(max_lora_rank), dtype, device)
        self.cpu_cache: OrderedDict[int, LoRAModel] = OrderedDict()  # lora_int_id -> adapter, LRU first
        self.slot_ids: list[int | None] = [None] * max_loras  # lora_int_id resident in each slot
        self.slot_lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_loras))  # least recent first
        # a decode step's tokens grouped by slot, in static buffers that CUDA graphs captured with LoRA read;
        # each token's slot (augmented path), -1 past the step's tokens (rows graphs pad a batch with)
        self.static_token_slots = torch.full((max_num_seqs,), -1, dtype=torch.int32, device=device)
        self.static_perm = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.max_tiles = -(-max_num_seqs // DECODE_TILE) + max_loras  # each slot's last tile may be partial
        self.static_seg_start = torch.zeros(self.max_tiles + 1, dtype=torch.int32, device=device)
        self.static_seg_slot = torch.full((self.max_tiles,), -1, dtype=torch.int32, device=device)
        # the SGMV layers' shrink outputs side by side, zeroed once per decode step (one memset, not one each)
        sgmv_layers = [lin for lins in self.layers.values() for lin in lins if not lin.augmented]
        num_cols = 0
        for lin in sgmv_layers:
            lin.shrink_col, num_cols = num_cols, num_cols + lin.a_stack.shape[1]
        self.segments = bool(sgmv_layers)  # whether a step needs its tokens grouped by slot (augmented: no)
        self.static_shrink = None
        if self.use_triton and num_cols:  # [max_num_seqs, num_cols] float32
            self.static_shrink = torch.zeros(max_num_seqs, num_cols, dtype=torch.float32, device=device)
        self.graphs = None  # DecodeCUDAGraphs captured with LoRA on (CUDA, not enforce_eager)
        self.failed: dict[int, LoRAError] = {}  # lora_int_id -> why a step could not read it, until take_failed

    def read(self, req: LoRARequest) -> LoRAModel:
        """The adapter from its files, checked (NaN and inf too: LoRAError naming `model`), pinned on CUDA. Touches
        nothing of the manager: the prefetcher's threads call it (prefetch.py), and _host when none did."""
        model = read_adapter(req.lora_path, req.lora_int_id, self.dims, self.max_lora_rank, param="model")
        if self.device.type == "cuda":  # pinned: slot swaps copy without waiting for the device
            with torch.cuda.device(self.device):  # a read thread's current device is 0: no context made there
                model.weights = pin_weights(model.weights, self.dtype)
        logger.info("LoRA adapter %s (id %d, rank %d) loaded from %s", req.lora_name, req.lora_int_id, model.rank,
                    req.lora_path)
        return model

    def admit(self, model: LoRAModel) -> None:
        """A read adapter into the host cache, most recent; the least recently used ones past max_cpu_loras leave."""
        self.cpu_cache[model.lora_int_id] = model
        self.cpu_cache.move_to_end(model.lora_int_id)
        while len(self.cpu_cache) > self.max_cpu_loras:
            self.cpu_cache.popitem(last=False)

    def resident(self, lora_int_id: int) -> bool:
        """Whether a step can use the adapter without reading its files: in a device slot or in the host cache
        (moved to its most recent end, so that admitting another does not evict it before the step)."""
        if lora_int_id in self.cpu_cache:
            self.cpu_cache.move_to_end(lora_int_id)
            return True
        return lora_int_id in self.slot_ids

    def _host(self, req: LoRARequest) -> LoRAModel:
        model = self.cpu_cache.get(req.lora_int_id)
        if model is None:  # not read ahead (prefetch.py): read here, inside the step
            model = self.read(req)
            self.admit(model)
        self.cpu_cache.move_to_end(req.lora_int_id)
        return model

    def activate(self, reqs: list[LoRARequest]) -> dict[int, int]:
        """Make these adapters (at most max_loras: the scheduler's limit) resident; lora_int_id -> slot. One whose
        read fails gets no slot (its rows run on the base model) and goes to self.failed."""
        wanted = {r.lora_int_id: r for r in reqs}
        assert len(wanted) <= self.max_loras, "the scheduler let more adapters than max_loras into one step"
        slot_of = {i: s for s, i in enumerate(self.slot_ids) if i in wanted}
        for lora_id, req in wanted.items():
            if lora_id not in slot_of:
                # an empty slot, else the least recently used one no adapter of this step holds
                slot = next(s for s in self.slot_lru if self.slot_ids[s] not in slot_of)
                try:  # from disk unless the host cache holds it: removed or spoiled since its requests were checked
                    weights = self._host(req).weights
                except LoRAError as e:
                    logger.warning("LoRA adapter %s (id %d) could not be read again: %s", req.lora_name, lora_id, e)
                    self.failed[lora_id] = e
                    continue
                for layer_idx, linears in self.layers.items():
                    for linear in linears:
                        linear.set_slot(slot, {s.module: weights[(layer_idx, s.module)] for s in linear.slices
                                               if (layer_idx, s.module) in weights})
                self.slot_ids[slot], slot_of[lora_id] = lora_id, slot
            self.slot_lru.move_to_end(slot_of[lora_id])
        return slot_of

    def take_failed(self) -> dict[int, LoRAError]:
        """The adapters steps could not read since the last call (lora_int_id -> error), forgotten here."""
        failed, self.failed = self.failed, {}
        return failed

    def prepare(self, loras: list[LoRARequest | None], num_tokens: list[int], is_decode: bool) -> LoRABatch | None:
        """The step's LoRABatch: loras and num_tokens per request in batch order; None without adapters."""
        if all(r is None for r in loras):
            return None
        slot_of = self.activate([r for r in loras if r is not None])
        if not slot_of:  # every adapter of the step failed to read: the base model alone
            return None
        slots = np.array([-1 if r is None else slot_of.get(r.lora_int_id, -1) for r in loras], dtype=np.int32)
        token_slots = np.repeat(slots, num_tokens)  # [num_tokens]
        if not self.use_triton:
            return LoRABatch(torch.from_numpy(token_slots), None, None, None, None, False)
        if not self.segments:  # every layer augmented: each token's slot is all the kernels read
            return self._token_slots_only(token_slots, is_decode)
        keep = np.nonzero(token_slots >= 0)[0]
        perm = keep[np.argsort(token_slots[keep], kind="stable")].astype(np.int32)  # rows grouped by slot
        counts = np.bincount(token_slots[keep], minlength=self.max_loras)
        tile = DECODE_TILE if is_decode else PREFILL_TILE
        seg_start, seg_slot = tile_segments(counts, tile)
        if is_decode:  # static buffers: CUDA graphs captured with LoRA read them; unused tiles are -1
            num = len(seg_slot)
            seg_start = np.concatenate([seg_start, np.full(self.max_tiles - num, seg_start[-1], dtype=np.int32)])
            seg_slot = np.concatenate([seg_slot, np.full(self.max_tiles - num, -1, dtype=np.int32)])
            if self.static_shrink is not None:  # stream-ordered after the previous step's reads, before this one
                self.static_shrink.zero_()
            self._write_static_slots(token_slots)
            self.static_perm[: len(perm)].copy_(self._dev(perm))
            self.static_seg_start.copy_(self._dev(seg_start))
            self.static_seg_slot.copy_(self._dev(seg_slot))
            return self._static_batch()
        return LoRABatch(self._dev(token_slots), self._dev(perm), self._dev(seg_start), self._dev(seg_slot),
                         min(tile, int(counts.max())), True)

    def _token_slots_only(self, token_slots: np.ndarray, is_decode: bool) -> LoRABatch:
        """Each token's slot on the device, and nothing grouped by slot."""
        if not is_decode:
            return LoRABatch(self._dev(token_slots), None, None, None, None, True)
        self._write_static_slots(token_slots)
        return self._static_batch()

    def _write_static_slots(self, token_slots: np.ndarray) -> None:
        """A decode step's token slots into the static buffer CUDA graphs read, -1 past the step's tokens."""
        padded = np.full(len(self.static_token_slots), -1, dtype=np.int32)
        padded[: len(token_slots)] = token_slots
        self.static_token_slots.copy_(self._dev(padded))

    def _static_batch(self) -> LoRABatch:
        return LoRABatch(self.static_token_slots, self.static_perm, self.static_seg_start, self.static_seg_slot,
                         DECODE_TILE, True, self.static_shrink)

    def _dev(self, x: np.ndarray) -> torch.Tensor:
        """Host ints to the device behind the step in flight (pinned, non-blocking)."""
        if self.device.type != "cuda":
            return torch.as_tensor(x, dtype=torch.int32).to(self.device)
        return torch.as_tensor(x, dtype=torch.int32).pin_memory().to(self.device, non_blocking=True)

    def capture_graphs(self, graphs: Any) -> None:
        """Capture decode CUDA graphs with the LoRA kernels in them, reading the static buffers."""
        with lora_batch(self._static_batch()):
            graphs.capture()
        self.graphs = graphs
