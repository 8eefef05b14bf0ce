"""FP8 weights and scales sharded over tensor-parallel ranks (#14): each rank's q/k/v and o_proj hold exactly
the rows/columns of the full checkpoint's dequantized weights (per channel, per tensor, blocks, dynamic),
KV heads replicated when tp_size exceeds them; a rank whose columns cut a scale block is refused."""
from __future__ import annotations

import pytest
import torch

from engine.layers.linear import QKVParallelLinear, RowParallelLinear
from engine.layers.quant.fp8 import Fp8Config, quantize_rows
from engine.parallel import ParallelState, get_parallel_state, set_parallel_state

FP8 = torch.float8_e4m3fn
HIDDEN, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS = 128, 32, 4, 2
BLOCK = 32


def checkpoint(w: torch.Tensor, kind: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(tensors of one layer as the checkpoint stores them, the float weight they dequantize to)."""
    if kind == "dynamic":
        return {"weight": w}, w
    if kind == "block":
        rows, cols = w.shape[0] // BLOCK, w.shape[1] // BLOCK
        scale = w.reshape(rows, BLOCK, cols, BLOCK).abs().amax(dim=(1, 3)) / 448  # [rows, cols]
        full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        q = (w / full).to(FP8)
        return {"weight": q, "weight_scale": scale}, q.float() * full
    scale = w.abs().amax(dim=1, keepdim=True) / 448 if kind == "channel" else w.abs().amax().reshape(()) / 448
    q = (w / scale).to(FP8)
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def config(kind: str) -> Fp8Config:
    if kind == "dynamic":
        return Fp8Config.dynamic()
    if kind == "block":
        return Fp8Config(True, "block", "dynamic", (BLOCK, BLOCK), "weight_scale")  # compressed-tensors' name
    return Fp8Config(True, kind)


def load(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], *shard_id: str) -> None:
    for name, t in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, t, *shard_id)


def dequantized(layer: torch.nn.Module) -> torch.Tensor:
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.dtype == FP8
    return layer.weight.float() * layer.weight_scale[:, None]


@pytest.fixture
def tp_state():
    before = get_parallel_state()

    def set_rank(tp_rank: int, tp_size: int) -> None:
        set_parallel_state(ParallelState(tp_rank=tp_rank, tp_size=tp_size))

    yield set_rank
    set_parallel_state(before)


@pytest.mark.parametrize("kind", ["channel", "tensor", "block", "dynamic"])
@pytest.mark.parametrize("tp_size", [2, 4])  # 4 > NUM_KV_HEADS: each KV head on two ranks
def test_rank_shards_equal_the_full_weights(tp_state, kind: str, tp_size: int) -> None:
    torch.manual_seed(tp_size)
    q_w, k_w, v_w = (torch.randn(n * HEAD_DIM, HIDDEN) * s for n, s in ((NUM_HEADS, 1), (NUM_KV_HEADS, 3), (NUM_KV_HEADS, .1)))
    o_w = torch.randn(HIDDEN, NUM_HEADS * HEAD_DIM)
    parts = {name: checkpoint(w, kind) for name, w in (("q", q_w), ("k", k_w), ("v", v_w), ("o", o_w))}
    # what one process holds: a rank's rows are a slice of these (dynamic / block: requantized per row)
    reference = {n: (quantize_rows(f)[0].float() * quantize_rows(f)[1][:, None] if kind in ("dynamic", "block") else f)
                 for n, (_, f) in parts.items()}
    for rank in range(tp_size):
        tp_state(rank, tp_size)
        qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, quant_config=config(kind))
        for shard_id in "qkv":
            load(qkv, parts[shard_id][0], shard_id)
        q_rows, kv_rows = NUM_HEADS * HEAD_DIM // tp_size, qkv.num_kv_heads * HEAD_DIM
        kv_rank = rank // qkv.kv_replicas
        want = torch.cat((reference["q"][rank * q_rows : (rank + 1) * q_rows],
                          reference["k"][kv_rank * kv_rows : (kv_rank + 1) * kv_rows],
                          reference["v"][kv_rank * kv_rows : (kv_rank + 1) * kv_rows]))
        torch.testing.assert_close(dequantized(qkv), want, rtol=0, atol=0)
        o = RowParallelLinear(NUM_HEADS * HEAD_DIM, HIDDEN, quant_config=config(kind))
        load(o, parts["o"][0])
        cols = NUM_HEADS * HEAD_DIM // tp_size
        if kind in ("block", "dynamic"):  # quantized per row at load: o_proj's rows are this rank's columns
            full = parts["o"][1][:, rank * cols : (rank + 1) * cols]
            q, s = quantize_rows(full)
            want = q.float() * s[:, None]
        else:
            want = reference["o"][:, rank * cols : (rank + 1) * cols]
        torch.testing.assert_close(dequantized(o), want, rtol=0, atol=0)


def test_a_rank_cutting_a_scale_block_is_refused(tp_state) -> None:
    tp_state(0, 2)
    o = RowParallelLinear(NUM_HEADS * HEAD_DIM, HIDDEN, quant_config=Fp8Config(True, "block", "dynamic", (128, 128)))
    with pytest.raises(RuntimeError, match="64 input columns cut a 128x128 scale block"):
        o.weight_scale_inv.weight_loader(o.weight_scale_inv, torch.ones(1, 1))
