"""Sharded safetensors loading with tp2 under torchrun/gloo: each rank reads only its slices, so its
peak host memory during load is about half the weights (its float32 model shard) plus one tensor."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_tiny_tokenizer
from tests.engine.test_distributed import REPO, dist_env, free_port

pytestmark = pytest.mark.slow

MiB = 2**20
# Allocator and interpreter noise (gloo buffers, KV pool, rotary tables: about 13 MiB measured). Kept
# small on purpose: holding one file's memory map open while loading (about 60 MiB more here) must fail.
SLACK = 16 * MiB
CONFIG = {  # about 300 MiB of float32 weights in few layers; the largest tensor is the embedding
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def write_sharded_checkpoint(path: Path, config: dict, num_files: int) -> tuple[int, int]:
    """Random float32 weights over num_files safetensors files plus the index; returns
    (total bytes, largest tensor bytes)."""
    from safetensors.torch import save_file

    shapes = llama_shapes(config)
    sizes = {name: 4 * torch.Size(shape).numel() for name, shape in shapes.items()}
    total, per_file = sum(sizes.values()), -(-sum(sizes.values()) // num_files)
    files: list[dict[str, tuple[int, ...]]] = [{}]
    filled = 0
    for name, shape in shapes.items():
        if filled >= per_file * len(files):
            files.append({})
        files[-1][name] = shape
        filled += sizes[name]
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, group in enumerate(files):
        file_name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        tensors = {n: torch.randn(s, generator=generator) * 0.02 for n, s in group.items()}
        save_file(tensors, str(path / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in group})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    write_tiny_tokenizer(str(path), config["vocab_size"])
    return total, max(sizes.values())


def test_tp2_rank_peak_memory_is_half_the_weights_plus_one_tensor(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    total, largest = write_sharded_checkpoint(model, CONFIG, num_files=3)
    assert total >= 200 * MiB and len(list(model.glob("*.safetensors"))) >= 3
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "tests.engine.dist_load", str(model), str(out)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    budget = total / 2 + largest + SLACK
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        grown = report["peak_rss"] - report["rss_before"]
        assert grown <= budget, (f"rank {rank}: loading grew peak RSS by {grown / MiB:.0f} MiB > budget "
                                 f"{budget / MiB:.0f} MiB (weights {total / MiB:.0f} MiB, largest tensor "
                                 f"{largest / MiB:.0f} MiB)")
