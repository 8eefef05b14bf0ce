"""benchmarks/profile_step.py's chain attribution: each kernel is charged its end minus the latest earlier end, so
kernels that overlap (programmatic dependent launch) are not counted twice and the shares add up to the busy time."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.profile_step import kernel_chain


class _Profile:
    def __init__(self, kernels: list[tuple[str, float, float]]) -> None:
        self.kernels = kernels

    def events(self) -> list[SimpleNamespace]:
        cuda = torch.autograd.DeviceType.CUDA
        return [SimpleNamespace(name=n, time_range=SimpleNamespace(start=s, end=e), device_type=cuda)
                for n, s, e in self.kernels]


def test_overlapping_kernels_share_the_chain() -> None:
    # gemv starts under norm and waits; a gap (no kernel) is left out; norm runs twice
    table = kernel_chain(_Profile([("norm", 0.0, 2.0), ("gemv", 1.0, 10.0), ("norm", 12.0, 13.0),
                                   ("gemv", 12.5, 20.0)]), num_steps=1)
    lines = table.splitlines()
    assert lines[0].split()[0] == "18.0"  # 2 + 8 + 1 + 7: the gap from 10 to 12 is not counted
    shares = {line.split()[-1]: (float(line.split()[0]), line.split()[2]) for line in lines[1:3]}
    assert shares == {"gemv": (15.0, "2.0x"), "norm": (3.0, "2.0x")}
