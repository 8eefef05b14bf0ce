"""FP8 (e4m3) W8A8 linear layers: weights in float8_e4m3fn with one float32 scale per output row,
activations quantized per token at run time (or with the checkpoint's static input_scale), GEMMs
through torch._scaled_mm (cuBLASLt, row-wise scales, the bias in its epilogue), or gantry_kernels/fp8_gemm.py where
its table says it is faster (decode batches of up to 256 rows at W1's and W3's shapes); decode steps of
<= FP8_GEMV_MAX_M rows on a GPU take gantry_kernels/weight_gemv.py instead (weight-only: the activations stay in the
model's dtype). Weights
come from a float checkpoint (`quantization=fp8`, quantized at load), compressed-tensors
`float-quantized` (per tensor, per channel, block) or HF's `fp8` format (per tensor, or DeepSeek's
128x128 blocks, `weight_scale_inv`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from engine.config import ConfigError
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import materialize
from engine.layers.quant import QuantizationConfig, check_mapping, check_names
from engine.layers.quant.fp8_support import FP8_DTYPE, FP8_MAX

MIN_SCALE = 1e-12  # an all-zero row or token quantizes to zeros, not NaN
# decode steps of up to this many rows skip activation quantization and cuBLASLt: gantry_kernels/weight_gemv.py streams
# the FP8 weights against the activations as they are (W8A16, more precise than W8A8). H200, W1's four
# projections summed: 95 us against cuBLASLt + quantization's 145 at one row, 137 against 148 at two, 211
# against 147 at four (benchmarks/fp8_bench.py --parts matmul)
FP8_GEMV_MAX_M = 2
# the RMSNorm and SiLU-and-mul kernels before a dynamic-FP8 GEMM quantize their output per token in the same
# pass (Fp8Activation), where a separate kernel would read it again; False runs them apart (benchmark A/B)
FUSE_INPUT_QUANT = True
# FP8 tensor-core products summed in the MMA's own accumulator (~14 bits on Hopper) across the whole K loop, with
# no float32 promotion per K tile: torch._scaled_mm's use_fast_accum, and gantry_kernels/fp8_gemm.py's fast_accum. vLLM's
# CUTLASS FP8 kernels on sm_90 use the same schedules (KernelTmaWarpSpecialized*FP8FastAccum). H200, W1 (256 x
# 512 / 512): 1.297x bf16 without, 1.374x with (benchmarks/fp8_bench.py, configs fp8_precise and fp8). Block-wise
# checkpoints (DeepSeek's) are dequantized at load and requantized per row, so they take this path too.
FAST_ACCUM = True


class Fp8Activation(NamedTuple):
    """A linear layer's input already quantized per token, by the kernel that produced it."""

    q: torch.Tensor  # [M, K] float8_e4m3fn
    scale: torch.Tensor  # [M, 1] float32
    dtype: torch.dtype  # the model's: what the producer would have written, and the GEMM's output


def wants_fp8_input(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` would quantize x [..., K] per token before its GEMM, so the kernel producing x may hand it
    over as an Fp8Activation: dynamic FP8 on a GPU, more rows than the weight-only GEMV takes, no LoRA."""
    method = getattr(layer, "quant_method", None)
    return (FUSE_INPUT_QUANT and isinstance(method, Fp8LinearMethod) and method.config.activation_scheme == "dynamic"
            and x.is_cuda and x.numel() > FP8_GEMV_MAX_M * x.shape[-1] and getattr(layer, "lora", None) is None)


class Fp8Config(QuantizationConfig):
    """How one model's FP8 weights arrive and how its activations are scaled."""

    name = "fp8"

    def __init__(self, serialized: bool, weight_strategy: str = "channel", activation_scheme: str = "dynamic",
                 block_size: tuple[int, int] | None = None, block_scale_name: str = "weight_scale_inv"):
        self.serialized = serialized  # False: a float checkpoint, quantized per row at load
        self.weight_strategy = weight_strategy  # channel | tensor | block (the checkpoint's scales)
        self.activation_scheme = activation_scheme  # dynamic (per token) | static (per-tensor input_scale)
        self.block_size = block_size  # (rows, cols) of one weight scale when weight_strategy == "block"
        self.block_scale_name = block_scale_name  # DeepSeek: weight_scale_inv; compressed-tensors: weight_scale

    @classmethod
    def dynamic(cls) -> Fp8Config:
        return cls(serialized=False)

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> Fp8Config:
        """From a quantization_config: HF's `fp8` or compressed-tensors `float-quantized`."""
        if qc.get("quant_method") == "fp8":
            return cls.from_hf(qc)
        groups = check_mapping(qc.get("config_groups") or {}, "quantization_config.config_groups")
        if len(groups) != 1:
            raise ConfigError("quantization_config.config_groups", f"one group is supported, got {len(groups)}")
        (group_name, group), = groups.items()
        check_mapping(group, f"quantization_config.config_groups.{group_name}")
        if not set(group.get("targets") or []) <= {"Linear"}:
            raise ConfigError(f"quantization_config.config_groups.{group_name}.targets",
                              f"{group.get('targets')} (supported: ['Linear'])")
        return cls.from_compressed_tensors(qc, group_name, group)

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> Fp8Config:
        """HF's `fp8` quantization_config: activation_scheme, optional weight_block_size [128, 128]."""
        if qc.get("gantry_dynamic"):
            return cls.dynamic()
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ConfigError("quantization_config.activation_scheme", f"{scheme!r} (supported: dynamic, static)")
        key = "ignored_layers" if qc.get("ignored_layers") else "modules_to_not_convert"
        ignored = [n for n in check_names(qc.get(key) or [], f"quantization_config.{key}") if n != "lm_head"]
        if ignored:
            raise ConfigError("quantization_config.ignored_layers", f"unquantized layers {ignored[:3]} are not supported")
        block = qc.get("weight_block_size")
        if block is None:
            return cls(True, "tensor", scheme)
        if (not isinstance(block, list | tuple) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError("quantization_config.weight_block_size", f"must be two positive integers, got {block!r}")
        return cls(True, "block", scheme, (block[0], block[1]), "weight_scale_inv")

    @classmethod
    def from_compressed_tensors(cls, qc: dict[str, Any], group_name: str, group: dict[str, Any]) -> Fp8Config:
        """compressed-tensors `float-quantized`: 8-bit float weights per tensor, channel or block."""
        where = f"quantization_config.config_groups.{group_name}."
        weights = check_mapping(group.get("weights") or {}, f"{where}weights")
        for key, allowed in (("num_bits", (8,)), ("type", ("float",)), ("symmetric", (True,)),
                             ("strategy", ("tensor", "channel", "block"))):
            if weights.get(key) not in allowed:
                raise ConfigError(f"{where}weights.{key}", f"{weights.get(key)!r} is not supported (supported: {allowed})")
        acts = check_mapping(group.get("input_activations") or {"dynamic": True},  # weight-only FP8: W8A8 per token
                             f"{where}input_activations")
        scheme = "dynamic" if acts.get("dynamic") else "static"
        if scheme == "static" and acts.get("strategy") != "tensor":
            raise ConfigError(f"{where}input_activations.strategy", f"static {acts.get('strategy')!r} (supported: tensor)")
        if acts.get("type", "float") != "float" or acts.get("num_bits", 8) != 8:
            raise ConfigError(f"{where}input_activations", "only 8-bit float activations run with FP8 weights")
        ignore = [n for n in check_names(qc.get("ignore") or [], "quantization_config.ignore") if n != "lm_head"]
        if ignore:
            raise ConfigError("quantization_config.ignore", f"unquantized layers {ignore[:3]} are not supported")
        if weights["strategy"] != "block":
            return cls(True, weights["strategy"], scheme)
        block = weights.get("block_structure")
        if not isinstance(block, list | tuple) or len(block) != 2:
            raise ConfigError(f"{where}weights.block_structure", f"must be [rows, cols], got {block!r}")
        return cls(True, "block", scheme, (int(block[0]), int(block[1])), "weight_scale")

    def get_linear_method(self) -> Fp8LinearMethod:
        return Fp8LinearMethod(self)

    def embedding_classes(self) -> tuple[type, type]:
        return VocabParallelEmbedding, ParallelLMHead  # the LM head stays in the model dtype


def uses_fp8(hf_config: Any) -> bool:
    """True when the model's linear layers run in FP8 (requested, or the checkpoint's format)."""
    from engine.layers.quant import get_quant_config

    return isinstance(get_quant_config(hf_config), Fp8Config)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [rows, cols] -> (float8_e4m3fn [rows, cols], float32 [rows]) with w ~= q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(MIN_SCALE)  # [rows]
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def per_token_quant_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (float8_e4m3fn [M, K], float32 [M, 1]): one scale per token (gantry_kernels.fp8_quant's twin)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)  # [M, 1]
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def static_quant(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] with a per-tensor float32 scale -> (float8 [M, K], float32 [M, 1])."""
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()


def whole(loaded: Any) -> torch.Tensor:
    """All of a checkpoint tensor; `[...]` also reads a 0-dim safetensors slice (scales often are)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[...]


def _loaded_dtype(loaded: Any) -> str:
    return str(loaded.dtype).replace("torch.", "") if isinstance(loaded, torch.Tensor) else loaded.get_dtype()


class Fp8LinearMethod:
    """After loading, every layer holds weight float8_e4m3fn [out, in] and weight_scale float32 [out]."""

    def __init__(self, config: Fp8Config):
        self.config = config

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        c = self.config
        dtype = FP8_DTYPE if c.serialized else torch.get_default_dtype()
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader
        if not c.serialized:
            return
        if c.weight_strategy == "block":
            rows, cols = c.block_size
            # the checkpoint's [ceil(out / rows), ceil(in / cols)] scales, repeated to one row of them per
            # output row: any shard of rows (q/k/v, gate/up, TP) then takes its rows like the weight does
            scale = torch.empty(output_size, -(-input_size // cols), dtype=torch.float32)
            layer.register_parameter(c.block_scale_name, nn.Parameter(scale, requires_grad=False))
            getattr(layer, c.block_scale_name).weight_loader = self._block_scale_loader(layer, rows, cols, input_size)
        else:
            layer.weight_scale = nn.Parameter(torch.empty(output_size, dtype=torch.float32), requires_grad=False)
            layer.weight_scale.weight_loader = self._row_scale_loader(layer)
        if c.activation_scheme == "static":
            layer.input_scale = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
            layer.input_scale.weight_loader = self._input_scale_loader

    @staticmethod
    def _row_scale_loader(layer: nn.Module) -> Any:
        def load(param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
            t = whole(loaded).float().reshape(-1)  # per tensor: [] or [1]; per channel: [rows] or [rows, 1]
            if t.numel() == 1:  # the same scale for every row this shard covers, on any rank
                t = t.expand(param.shape[0] * (layer.tp_size if layer.tp_dim == 0 else 1))
            layer.weight_loader(param, t, *shard_id)

        return load

    @staticmethod
    def _block_scale_loader(layer: nn.Module, rows: int, cols: int, input_size: int) -> Any:
        def load(param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
            if layer.tp_dim == 1 and input_size % cols:
                raise RuntimeError(f"this rank's {input_size} input columns cut a {rows}x{cols} scale block; "
                                   "use a smaller tensor_parallel_size")
            t = whole(loaded).float().repeat_interleave(rows, dim=0)  # [>= out rows, ceil(in / cols)]
            if layer.tp_dim != 0:  # rows not split: exactly this layer's
                t = t[: param.shape[0]]
            layer.weight_loader(param, t, *shard_id)

        return load

    @staticmethod
    def _input_scale_loader(param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
        # q/k/v (gate/up) each bring one; the merged matmul takes the largest, which clips none of them
        param.data = torch.maximum(param.data, whole(loaded).float().reshape(()).to(param.device))

    def load_shard(self, layer: nn.Module, loaded: Any, offset: int) -> None:
        kind = _loaded_dtype(loaded)
        if self.config.serialized and kind not in ("float8_e4m3fn", "F8_E4M3"):
            raise RuntimeError(f"expected float8_e4m3fn weights (the checkpoint's FP8 config), found {kind}")
        src = materialize(loaded)
        layer.weight.data.narrow(0, offset, src.shape[0]).copy_(src)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        c = self.config
        if not c.serialized:
            q, scale = quantize_rows(layer.weight.data)
        elif c.weight_strategy == "block":
            block_scale = getattr(layer, c.block_scale_name)
            delattr(layer, c.block_scale_name)
            cols = c.block_size[1]
            in_size = layer.weight.shape[1]
            # dequantized once here, then requantized per row: one GEMM path (row-wise _scaled_mm) for all
            w = layer.weight.float() * block_scale.data.repeat_interleave(cols, dim=1)[:, :in_size]
            q, scale = quantize_rows(w)
        else:
            return
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def quantize_input(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, K] -> (float8 [M, K], float32 [M, 1])."""
        if self.config.activation_scheme == "static":
            return static_quant(x, layer.input_scale)
        if x.is_cuda:
            from gantry_kernels.fp8_quant import per_token_quant

            return per_token_quant(x)
        return per_token_quant_torch(x)

    def apply(self, layer: nn.Module, x: torch.Tensor | Fp8Activation, bias: torch.Tensor | None = None) -> torch.Tensor:
        out_features, in_features = layer.weight.shape
        if isinstance(x, Fp8Activation):  # quantized by the kernel before (wants_fp8_input said so)
            return self._fp8_gemm(layer, x.q, x.scale, x.q, bias, x.dtype)
        x2 = x.reshape(-1, in_features)  # [M, K]
        if x2.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], out_features)
        if x.is_cuda and x2.shape[0] <= FP8_GEMV_MAX_M:
            from gantry_kernels.weight_gemv import weight_gemv

            y = weight_gemv(x2 if x2.stride(1) == 1 else x2.contiguous(), layer.weight, layer.weight_scale, bias)
            return y.reshape(*x.shape[:-1], out_features)
        xq, x_scale = self.quantize_input(layer, x2)
        return self._fp8_gemm(layer, xq, x_scale, x, bias, x.dtype)

    def _fp8_gemm(self, layer: nn.Module, xq: torch.Tensor, x_scale: torch.Tensor, x: torch.Tensor,
                  bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """xq [M, K] FP8 with x_scale [M, 1] -> [*x.shape[:-1], N] in dtype."""
        out_features, in_features = layer.weight.shape
        if x.is_cuda:
            from gantry_kernels.fp8_gemm import config_for, fp8_gemm

            config = config_for(xq.shape[0], out_features, in_features)
            if config is not None:
                y = fp8_gemm(xq, x_scale, layer.weight, layer.weight_scale, config, bias, out_dtype=dtype,
                             fast_accum=FAST_ACCUM)
                return y.reshape(*x.shape[:-1], out_features)
        if x.is_cuda and in_features % 16 == 0 and out_features % 16 == 0:  # cuBLASLt's FP8 shape rule
            # row-wise scales: scale_a [M, 1], scale_b [1, N], float32; mat2 column-major (the weight's .t());
            # row-wise scaling writes bf16 only, and takes a bias of that dtype
            fused = bias is not None and bias.dtype == torch.bfloat16
            y = torch._scaled_mm(xq, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale.view(1, -1),
                                 bias=bias if fused else None, out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)
            if fused:
                bias = None
        else:
            # emulated (CPU tests, odd shapes): the same FP8 values and scales, float32 accumulation
            y = (xq.float() @ layer.weight.float().t()) * x_scale * layer.weight_scale.view(1, -1)
        y = y.to(dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], out_features)
