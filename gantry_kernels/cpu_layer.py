"""A whole Llama decoder layer in one C call on CPU (gantry_kernels/cpu_layer.c): no Python, no torch op and no
OpenMP thread wake-up between its ten ops, which at one decode token cost about as much as its matmuls.
Same arithmetic as the per-op C path. Used for float32 layers whose linears are ggml blocks (GGUF), one
rank, no LoRA, no bias, no q/k norm, at most GEMM_MAX_ROWS tokens; anything else returns None and the
layer runs op by op. GANTRY_CPU_NATIVE=0 or GANTRY_CPU_FUSED_LAYER=0: never used.
"""
from __future__ import annotations

import ctypes
import os
from typing import Any

import torch

from engine.forward_context import get_forward_context
from engine.layers.quant.ggml_cpu import BLOCK_BYTES, GEMM_MAX_ROWS, row_bytes
from gantry_kernels.cpu_native import NativeLibrary

_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_DIR, "cpu_layer.c")
_DEPS = (os.path.join(_DIR, "cpu_attention.c"),
         os.path.join(os.path.dirname(_DIR), "engine", "layers", "quant", "ggml_cpu.c"))
_F32 = torch.float32
_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Weight(ctypes.Structure):
    _fields_ = [("blocks", _p), ("type", _i64), ("N", _i64), ("K", _i64)]


class _Args(ctypes.Structure):  # llama_layer_args in cpu_layer.c, field for field
    _fields_ = [("T", _i64), ("hidden", _i64), ("H", _i64), ("Hkv", _i64), ("D", _i64), ("inter", _i64),
                ("eps", _f32), ("scale", _f32),
                ("w_in_norm", _p), ("w_post_norm", _p), ("cos_sin", _p),
                ("qkv", _Weight), ("o", _Weight), ("gate_up", _Weight), ("down", _Weight),
                ("k_cache", _p), ("v_cache", _p), ("block_size", _i64), ("max_blocks", _i64), ("num_seqs", _i64),
                ("positions", _p), ("slot_mapping", _p),
                ("block_tables", _p), ("query_start_loc", _p), ("seq_lens", _p),
                ("x", _p), ("residual", _p), ("out", _p), ("res_out", _p)]


def _bind(lib: ctypes.CDLL) -> None:
    lib.llama_layer_f32.argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
    lib.llama_layer_f32.restype = ctypes.c_int


NATIVE = NativeLibrary(_SOURCE, _bind, _DEPS, switches=("GANTRY_CPU_NATIVE", "GANTRY_CPU_FUSED_LAYER"))
_native = NATIVE.get


def _weight(linear: Any, in_features: int) -> _Weight | None:
    """The ggml blocks of a linear layer, if the fused layer can multiply by them."""
    w = linear.weight
    if (getattr(linear, "tp_size", 1) != 1 or linear.bias is not None or getattr(linear, "lora", None) is not None
            or getattr(w, "ggml_type", None) not in BLOCK_BYTES or w.device.type != "cpu"
            or getattr(w, "num_cols", None) != in_features or w.data.dtype != torch.uint8
            or not w.data.is_contiguous() or w.data.shape[1] != row_bytes(w.ggml_type, in_features)):
        return None
    return _Weight(w.data.data_ptr(), w.ggml_type, w.data.shape[0], in_features)


def _plan(layer: Any) -> _Args | None:
    """The layer's constant arguments (weights, shapes), or None if it does not fit the fused kernel."""
    from engine.layers.activation import SiluAndMul  # engine.models imports this module
    from engine.layers.norm import RMSNorm
    from engine.layers.rotary import RotaryEmbedding
    from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

    attn, mlp = layer.self_attn, layer.mlp
    if (_native() is None or type(layer).forward is not LlamaDecoderLayer.forward
            or type(attn).forward is not LlamaAttention.forward or attn.use_qk_norm
            or type(mlp).forward is not LlamaMLP.forward or type(mlp.act_fn) is not SiluAndMul
            or type(attn.rotary_emb) is not RotaryEmbedding
            or type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm):
        return None
    if any(getattr(p, "weight", None) is None for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
        return None  # packed weights (GPTQ, AWQ, compressed-tensors) stand in for `weight`: op by op
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    hidden = layer.input_layernorm.weight.shape[0]
    inter = mlp.down_proj.weight.shape[1] if getattr(mlp.down_proj.weight, "num_cols", None) is None \
        else mlp.down_proj.weight.num_cols
    cos_sin = attn.rotary_emb.cos_sin_cache  # [max_position, D]
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    weights = (_weight(attn.qkv_proj, hidden), _weight(attn.o_proj, H * D), _weight(mlp.gate_up_proj, hidden),
               _weight(mlp.down_proj, inter))
    if (any(w is None for w in weights) or H % Hkv or D % 8 or hidden % 32 or inter % 32
            or weights[0].N != (H + 2 * Hkv) * D or weights[1].N != hidden or weights[2].N != 2 * inter
            or weights[3].N != hidden or cos_sin.dtype != _F32 or not cos_sin.is_contiguous()
            or cos_sin.shape[-1] != D or cos_sin.is_cuda
            or any(w.dtype != _F32 or not w.is_contiguous() or w.is_cuda for w in norms)
            or attn.attn.num_heads != H or attn.attn.num_kv_heads != Hkv):
        return None
    if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
        return None
    return _Args(hidden=hidden, H=H, Hkv=Hkv, D=D, inter=inter, eps=layer.input_layernorm.eps,
                 scale=attn.attn.scale, w_in_norm=norms[0].data_ptr(), w_post_norm=norms[1].data_ptr(),
                 cos_sin=cos_sin.data_ptr(), qkv=weights[0], o=weights[1], gate_up=weights[2], down=weights[3])


def _tensors(layer: Any) -> tuple[torch.Tensor, ...]:
    """The tensors the plan points into (kept referenced, so their memory outlives the plan)."""
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.qkv_proj.weight, attn.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight,
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight, attn.rotary_emb.cos_sin_cache)


def _step_meta(ctx: Any) -> tuple[torch.Tensor, ...]:
    """The step's metadata in the dtypes the kernel reads, converted once per forward (not per layer)."""
    meta = ctx.__dict__.get("_cpu_layer_meta")
    if meta is None:
        meta = (ctx.slot_mapping.to(torch.int64).contiguous(), ctx.block_tables.to(torch.int32).contiguous(),
                ctx.query_start_loc.to(torch.int32).contiguous(), ctx.seq_lens.to(torch.int32).contiguous())
        ctx._cpu_layer_meta = meta
    return meta


def decoder_layer(layer: Any, positions: torch.Tensor, x: torch.Tensor,
                  residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LlamaDecoderLayer.forward(positions, x, residual) in one C call: (hidden_states, residual), both
    [num_tokens, hidden] float32; None where the fused kernel does not apply."""
    args = layer.__dict__.get("_cpu_layer_args", False)
    if args and tuple(t.data_ptr() for t in layer._cpu_layer_tensors) != layer._cpu_layer_ptrs:
        args = False  # a weight's storage was replaced (a reload): plan again
    if args is False:  # decided once per layer (weights and shapes do not change after loading)
        args = layer._cpu_layer_args = _plan(layer)
        layer._cpu_layer_tensors = () if args is None else _tensors(layer)
        layer._cpu_layer_ptrs = tuple(t.data_ptr() for t in layer._cpu_layer_tensors)
    if (args is None or x.dtype != _F32 or x.dim() != 2 or x.shape[1] != args.hidden or not x.is_contiguous()
            or x.shape[0] > GEMM_MAX_ROWS):
        return None
    attn = layer.self_attn.attn
    k_cache, v_cache = attn.k_cache, attn.v_cache  # [num_blocks, block_size, num_kv_heads, head_dim]
    if (k_cache.numel() == 0 or k_cache.dtype != _F32 or v_cache.dtype != _F32 or not k_cache.is_contiguous()
            or not v_cache.is_contiguous() or attn.k_scale != 1.0 or attn.v_scale != 1.0
            or (residual is not None and (residual.dtype != _F32 or residual.shape != x.shape
                                          or not residual.is_contiguous()))):
        return None
    slots, tables, starts, lens = _step_meta(get_forward_context())
    pos = positions if positions.dtype == torch.int64 and positions.is_contiguous() else positions.to(torch.int64)
    out, res_out = torch.empty_like(x), torch.empty_like(x)  # [num_tokens, hidden]
    args.T = x.shape[0]
    args.k_cache, args.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
    args.block_size, args.max_blocks, args.num_seqs = k_cache.shape[1], tables.shape[1], lens.shape[0]
    args.positions, args.slot_mapping = pos.data_ptr(), slots.data_ptr()
    args.block_tables, args.query_start_loc, args.seq_lens = tables.data_ptr(), starts.data_ptr(), lens.data_ptr()
    args.x, args.residual = x.data_ptr(), None if residual is None else residual.data_ptr()
    args.out, args.res_out = out.data_ptr(), res_out.data_ptr()
    if NATIVE.lib.llama_layer_f32(ctypes.byref(args), torch.get_num_threads()) != 0:
        raise MemoryError(f"cpu_layer: no memory for the scratch of {x.shape[0]} tokens")
    return out, res_out
