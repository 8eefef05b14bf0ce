"""LlamaForCausalLM (also Mistral-style configs); the decoder that Qwen2 and Qwen3 reuse.

Pipeline parallel: this rank builds only layers [start_layer, end_layer); the first stage
embeds, the last stage normalises and owns the LM head.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.config import ConfigError
from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.quant import get_quant_config
from engine.layers.quant.fp8 import Fp8Activation, wants_fp8_input
from engine.layers.rotary import RotaryEmbedding
from engine.parallel import get_parallel_state
from gantry_kernels import cpu_layer

# Intermediate state between pipeline stages: (hidden_states, residual), each [num_tokens, hidden].
Intermediate = tuple[torch.Tensor, torch.Tensor]


def layer_range(num_layers: int, pp_rank: int, pp_size: int, partition: list[int] | None = None) -> tuple[int, int]:
    """Layers of one pipeline stage: even split (earlier stages get the remainder) or as configured."""
    if partition is None:
        base, extra = divmod(num_layers, pp_size)
        partition = [base + (1 if i < extra else 0) for i in range(pp_size)]
    start = sum(partition[:pp_rank])
    return start, start + partition[pp_rank]


def embedding_classes(config: Any) -> tuple[type[VocabParallelEmbedding], type[VocabParallelEmbedding]]:
    """(embedding, LM head) classes: a quantization may keep them quantized too."""
    quant_config = get_quant_config(config)
    return (VocabParallelEmbedding, ParallelLMHead) if quant_config is None else quant_config.embedding_classes()


class LlamaAttention(nn.Module):
    qkv_bias_default = False  # Qwen2 overrides: q/k/v carry a bias
    use_qk_norm = False  # Qwen3 overrides: RMSNorm on each head of q and k before RoPE

    def __init__(self, config: Any):
        super().__init__()
        hidden = config.hidden_size
        total_heads, total_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // total_heads
        bias = getattr(config, "attention_bias", self.qkv_bias_default) or self.qkv_bias_default
        quant_config = get_quant_config(config)
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv, bias=bias, quant_config=quant_config)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=bool(getattr(config, "attention_bias", False)),
                                        quant_config=quant_config)
        self.rotary_emb = RotaryEmbedding.from_config(self.head_dim, config)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads)
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [num_tokens, (heads + 2 * kv_heads) * head_dim]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(o.reshape(-1, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        quant_config = get_quant_config(config)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       quant_config=quant_config)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, quant_config=quant_config)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate / tp]
        return self.down_proj(self.act_fn(gate_up, fp8_out=wants_fp8_input(self.down_proj, gate_up)))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: Any):
        super().__init__()
        self.self_attn = self.attention_cls(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> Intermediate:
        if not hidden_states.is_cuda:  # CPU: the whole layer in one C call where it applies (gantry_kernels/cpu_layer.py)
            fused = cpu_layer.decoder_layer(self, positions, hidden_states, residual)
            if fused is not None:
                return fused
        # an FP8 qkv / gate_up GEMM gets its input quantized by the norm's kernel (engine/layers/quant/fp8.py)
        fp8 = wants_fp8_input(self.self_attn.qkv_proj, hidden_states)
        if residual is None:
            hidden_states, residual = self.input_layernorm(hidden_states, fp8_out=fp8), hidden_states
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual, fp8_out=fp8)
        hidden_states = self.self_attn(positions, hidden_states)
        fp8 = wants_fp8_input(self.mlp.gate_up_proj, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual, fp8_out=fp8)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: Any, pp_partition: list[int] | None = None):
        super().__init__()
        state = get_parallel_state()
        self.is_first, self.is_last = state.is_first_pp_rank, state.is_last_pp_rank
        self.start_layer, self.end_layer = layer_range(config.num_hidden_layers, state.pp_rank, state.pp_size, pp_partition)
        if self.is_first:
            self.embed_tokens = embedding_classes(config)[0](config.vocab_size, config.hidden_size)
        # Keep global layer indices so checkpoint names map directly; other stages' slots stay empty.
        self.layers = nn.ModuleDict({str(i): self.layer_cls(config) for i in range(self.start_layer, self.end_layer)})
        if self.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: Intermediate | None = None
    ) -> torch.Tensor | Intermediate:
        if self.is_first:
            hidden_states, residual = self.embed_tokens(input_ids), None
        else:
            hidden_states, residual = intermediate
        for layer in self.layers.values():
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not self.is_last:
            return hidden_states, residual
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    model_cls: type[LlamaModel] = LlamaModel
    # checkpoint name fragment -> (our parameter fragment, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, pp_partition: list[int] | None = None):
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, pp_partition)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.model.is_last:
            self.lm_head = embedding_classes(config)[1](config.vocab_size, config.hidden_size)
            if self.tie_word_embeddings and self.lm_head.weight is None:  # kept quantized: nothing to share
                raise ConfigError("quantization_config.lm_head", "a quantized LM head cannot be tied to the "
                                  "token embedding (config.json's tie_word_embeddings is true)")
            if self.tie_word_embeddings and self.model.is_first and self.model.embed_tokens.weight is None:
                raise ConfigError("quantization_config.config_groups", "a quantized token embedding cannot be "
                                  "tied to the float LM head (config.json's tie_word_embeddings is true)")
            if self.tie_word_embeddings and self.model.is_first:
                self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: Intermediate | None = None
    ) -> torch.Tensor | Intermediate:
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def checkpoint_to_param(self, name: str) -> tuple[str, Any] | None:
        """Map a checkpoint tensor name to (our parameter name, shard id), or None if this rank
        does not hold it (another pipeline stage, or rotary buffers saved by old exports)."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if not self.model.start_layer <= layer < self.model.end_layer:
                return None
        if name.startswith("model.embed_tokens."):
            if self.tie_word_embeddings and self.model.is_last and not self.model.is_first:
                return "lm_head.weight", None
            return (name, None) if self.model.is_first else None
        if name.startswith("lm_head."):
            return (name, None) if self.model.is_last and not self.tie_word_embeddings else None
        if name.startswith("model.norm.") and not self.model.is_last:
            return None
        for ckpt, (ours, shard_id) in self.packed_modules.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{ours}."), shard_id
        return name, None
