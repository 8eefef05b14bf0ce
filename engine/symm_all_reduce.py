"""TP all-reduce over CUDA symmetric memory for decode-sized messages (one NVLink hop, no NCCL ring).

A decode step all-reduces [num_tokens, hidden] twice per layer. At batch 256 on two H200s NCCL picks
its low-latency ring protocol and spends ~36 us per 1.8 MB message (benchmarks/allreduce_bench.py).
Here each rank copies its partial sum into a buffer every rank of the TP group has mapped (torch's
symmetric memory) and one kernel reads the peers' buffers and adds (one-shot) or reduce-scatters
then all-gathers over them (two-shot). Both are plain kernels, so they are captured in CUDA graphs.

Both kernels end with a barrier over the group, so the buffer is free again when any rank leaves
the kernel: one buffer serves every call. Messages larger than it go to NCCL, as do CPU tensors.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger("gantry.engine")

# Measured on two H200s (RESULTS.md, "TP all-reduce"): one-shot is fastest up to ~1 MB (128 tokens x
# hidden 3584-5120), two-shot above it, and both beat NCCL at every size up to 2048 tokens (20 MB).
ONE_SHOT_MAX_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 16 << 20  # 2048 tokens x hidden 3584 in bf16; larger prefill chunks go to NCCL
ALGORITHMS = ("auto", "one_shot", "two_shot")


class SymmMemAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, algorithm: str = "auto",
                 max_bytes: int = DEFAULT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        if algorithm not in ALGORITHMS:
            raise ValueError(f"all-reduce algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
        self.group_name = group.group_name
        self.algorithm, self.max_bytes = algorithm, max_bytes
        ops = torch.ops.symm_mem
        self.copy_in_kernel = hasattr(ops, "one_shot_all_reduce_copy_out")  # torch >= 2.9: no separate copy
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.9, a no-op after
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)  # [max_bytes]
        symm_mem.rendezvous(self.buffer, self.group_name)

    def can_reduce(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and x.is_contiguous() and x.numel() * x.element_size() <= self.max_bytes
                and x.dtype in (torch.bfloat16, torch.float32))  # the kernels' types

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the TP group, in place; returns x. Every rank must call with the same shape."""
        nbytes = x.numel() * x.element_size()
        buf = self.buffer[:nbytes].view(x.dtype)  # [numel]
        flat = x.view(-1)
        ops = torch.ops.symm_mem
        two_shot = self.algorithm == "two_shot" or (self.algorithm == "auto" and nbytes > ONE_SHOT_MAX_BYTES)
        if two_shot:
            buf.copy_(flat)
            ops.two_shot_all_reduce_out(buf, "sum", self.group_name, flat)
        elif self.copy_in_kernel:
            ops.one_shot_all_reduce_copy_out(buf, flat, "sum", self.group_name, flat)
        else:
            buf.copy_(flat)
            ops.one_shot_all_reduce_out(buf, "sum", self.group_name, flat)
        return x


def build(group: dist.ProcessGroup | None, tp_size: int, device: torch.device) -> SymmMemAllReduce | None:
    """The symmetric-memory all-reduce for this TP group, or None (NCCL for everything): CPU, tp 1,
    GANTRY_ALL_REDUCE=nccl, or symmetric memory unavailable (logged once). GANTRY_ALL_REDUCE=one_shot
    or two_shot forces one kernel (benchmarks)."""
    choice = os.environ.get("GANTRY_ALL_REDUCE", "auto")
    if choice not in ALGORITHMS + ("nccl",):
        from engine.config import ConfigError

        raise ConfigError("GANTRY_ALL_REDUCE", f"{choice!r} is not one of nccl, {', '.join(ALGORITHMS)}")
    if group is None or tp_size == 1 or device.type != "cuda" or choice == "nccl":
        return None
    try:
        impl = SymmMemAllReduce(group, device, choice)
    except Exception as e:  # noqa: BLE001 - old driver, no P2P between the GPUs, no symmetric memory in torch
        logger.info("symmetric-memory all-reduce unavailable (%s); NCCL does every all-reduce", e)
        return None
    logger.info("TP all-reduce: %s over symmetric memory up to %d MiB, NCCL above", choice, impl.max_bytes >> 20)
    return impl
