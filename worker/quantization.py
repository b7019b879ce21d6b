"""Quantized base linears (`--quantize`): what a parallel linear computes x W^T with instead of W.

Each linear loads its checkpoint slice in full precision as before; `quantize_model` then quantizes
that slice (so under tensor parallelism every shard quantizes only its own part, and per-channel
scales or blocks never reach across a rank boundary) and frees the full-precision weight. LoRA
deltas stay in full precision beside it (worker/lora.py). The LM head and embeddings stay as loaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loraxpy.proto.quantization import PREQUANTIZED, check_checkpoint, check_scheme_name
from loraxpy.worker.gptq import PackedCheckpoint, QuantConfig
from loraxpy.worker.layers import ColumnParallelLinear, RowParallelLinear
from loraxpy.worker.model_source import GGUF_POINTER
from loraxpy.worker.moe import Experts

logger = logging.getLogger(__name__)

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# LLM.int8(): activation columns holding a value past this run in 16 bits (LoRAX's and transformers' 6.0).
INT8_OUTLIER_THRESHOLD = 6.0


def check_quantization(model_path: Path, scheme: str | None, device: torch.device) -> None:
    """Refuses at startup a scheme this server does not run, or cannot run on `device`, and a
    checkpoint whose own quantization_config disagrees with `--quantize`."""
    check_scheme_name(scheme)
    if scheme and (model_path / GGUF_POINTER).exists():
        raise ValueError(
            f"--quantize {scheme}: a GGUF file is served in its own blocks; leave --quantize unset"
        )
    config = json.loads((model_path / "config.json").read_text())
    check_checkpoint(config, scheme)
    if scheme in PREQUANTIZED:  # its quantization_config is read (and refused) before any weight is
        QuantConfig.from_checkpoint(config["quantization_config"])
    if not scheme or scheme == "fp8" or scheme in PREQUANTIZED:  # dequantized before the matmul: any device
        return
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--quantize {scheme} runs on CPU and CUDA, not {device.type}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"--quantize {scheme} needs the bitsandbytes package: pip install 'loraxpy[quantize]'"
        )


class Fp8Linear(nn.Module):
    """x W^T (+ b) with W = q * scale: q e4m3 [out, in], scale fp32 [out, 1], dequantized at each call.

    scale = max|W_row| / 448, so each output channel uses e4m3's whole range; all-zero rows get scale 1.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """`scale` given ([out, 1]): `weight` holds a checkpoint's e4m3 values already (read as stored)."""
        super().__init__()
        w = weight.float()
        if scale is None:
            scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        else:
            q = w.to(torch.float8_e4m3fn)
            if not torch.equal(q.float(), w):
                raise ValueError("a linear with a weight_scale holds weights that are not e4m3 values")
            scale = scale.float()
        self.qweight: torch.Tensor
        self.scale: torch.Tensor
        self.values: torch.Tensor
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        codes = torch.arange(256, dtype=torch.uint8, device=weight.device)
        self.register_buffer("values", codes.view(torch.float8_e4m3fn).float())
        self.dtype = weight.dtype

    def dequantize(self) -> torch.Tensor:
        # A table of e4m3's 256 values, indexed by the bytes: the same fp32 values as
        # `qweight.float()`, which on CPU converts element by element (5x slower on this project's Xeon).
        codes = self.qweight.view(torch.uint8).view(-1).int()
        return self.values.index_select(0, codes).view(self.qweight.shape).mul_(self.scale).to(self.dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        return F.linear(x, self.dequantize(), bias)


class BitsAndBytesLinear(nn.Module):
    """x W^T (+ b) through bitsandbytes' own layers: int8 per output channel (LLM.int8()), or NF4 / FP4 in blocks
    of 64 consecutive weights whose scales are quantized again (double quantization), as LoRAX keeps them."""

    def __init__(self, weight: torch.Tensor, scheme: str) -> None:
        super().__init__()
        import bitsandbytes as bnb

        out_features, in_features = weight.shape
        module: nn.Module
        if scheme == "bitsandbytes":
            module = bnb.nn.Linear8bitLt(
                in_features,
                out_features,
                bias=False,
                has_fp16_weights=False,
                threshold=INT8_OUTLIER_THRESHOLD,
            )
            module.weight = bnb.nn.Int8Params(
                weight.detach().clone(), requires_grad=False, has_fp16_weights=False
            )
        else:
            quant_type = scheme.removeprefix("bitsandbytes-")
            module = bnb.nn.Linear4bit(
                in_features, out_features, bias=False, compute_dtype=weight.dtype, quant_type=quant_type
            )
            module.weight = bnb.nn.Params4bit(
                weight.detach().clone(), requires_grad=False, quant_type=quant_type
            )
        # bitsandbytes quantizes as the weight moves to its device; eval: its inference path (on CPU
        # the 4-bit weight is repacked for its CPU kernel at the first call), as transformers runs it.
        self.bnb = module.to(weight.device).eval()

    def state_bytes(self) -> int:
        """Bytes bitsandbytes keeps beside the weight's parameter: 4-bit block scales, int8 row scales."""
        weight = self.bnb.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            return sum(t.nbytes for t in vars(quant_state).values() if isinstance(t, torch.Tensor))
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(self.bnb, "state", None), "SCB", None)
        return scb.nbytes if isinstance(scb, torch.Tensor) else 0

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.bnb(x)
        return y if bias is None else y + bias


def quantize_linear(layer: ColumnParallelLinear | RowParallelLinear, scheme: str | nn.Module) -> None:
    """Replaces the layer's loaded weight slice with its quantized form (`scheme`'s, or the module
    given); the weight that stays is an expanded zero (no memory) keeping the shape, dtype and device
    that adapter slots are sized from."""
    weight = layer.weight.data
    if isinstance(scheme, nn.Module):
        layer.quant = scheme
    else:
        layer.quant = Fp8Linear(weight) if scheme == "fp8" else BitsAndBytesLinear(weight, scheme)
    placeholder = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
    layer.weight = nn.Parameter(placeholder, requires_grad=False)


class Fp8Checkpoint:
    """A compressed-tensors FP8 checkpoint, read as stored: each quantized linear's e4m3 weight loads
    into its (full-precision) weight as the exact values, its `weight_scale` comes here (per output
    channel [out, 1] or per tensor), and `install` puts an Fp8Linear of this shard's rows or columns in
    its place. Activation scales (W8A8 checkpoints) are not applied: activations stay in full precision
    (a weight-only FP8 matmul, as on GPUs without FP8 units)."""

    params = ("weight_scale", "input_scale")

    def __init__(self) -> None:
        self.scales: dict[str, dict[str, torch.Tensor]] = {}
        self.input_scales = 0

    def add(
        self, module_name: str, module: nn.Module, slice_name: str, param: str, tensor: torch.Tensor
    ) -> None:
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            raise ValueError(
                f"{module_name}: FP8 weights of a layer this server keeps in full precision "
                "(only the decoder's attention and MLP linears are read quantized)"
            )
        if param == "input_scale":
            self.input_scales += 1
            return
        self.scales.setdefault(module_name, {})[slice_name] = tensor.float()

    def describe(self) -> str:
        activations = (
            ", activation scales not applied (activations in full precision)" if self.input_scales else ""
        )
        return f"read as stored (e4m3, compressed-tensors){activations}"

    def install(self, model: nn.Module) -> int:
        modules = dict(model.named_modules())
        for module_name, by_slice in self.scales.items():
            module = modules[module_name]
            rows = module.weight.shape[0]
            if isinstance(module, ColumnParallelLinear):
                if set(by_slice) != set(module.local_sizes):
                    raise ValueError(
                        f"{module_name}: weight scales for {sorted(by_slice)} but not all of "
                        f"{sorted(module.local_sizes)}; one fused layer must be quantized whole"
                    )
                shard = module.shard
                parts = []
                for name, size in module.local_sizes.items():
                    scale = by_slice[name].reshape(-1, 1)
                    if scale.shape[0] == 1:  # per tensor
                        parts.append(scale.expand(size, 1))
                    elif scale.shape[0] == size * shard.world_size:
                        parts.append(scale[shard.rank * size : (shard.rank + 1) * size])
                    else:
                        raise ValueError(f"{module_name}.{name}: weight_scale {tuple(by_slice[name].shape)}")
                scale = torch.cat(parts)
            else:
                (scale,) = by_slice.values()
                scale = scale.reshape(-1, 1)
                if scale.shape[0] not in (1, rows):
                    raise ValueError(f"{module_name}: weight_scale {tuple(scale.shape)} for {rows} rows")
                scale = scale.expand(rows, 1)
            try:
                quantize_linear(
                    module, Fp8Linear(module.weight.data, scale.to(module.weight.device).contiguous())
                )
            except ValueError as e:
                raise ValueError(f"{module_name}: {e}") from e
        return len(self.scales)


def packed_checkpoint(model_path: Path, scheme: str | None) -> PackedCheckpoint | Fp8Checkpoint | None:
    """Where load_weights puts a checkpoint's quantized tensors (GPTQ / AWQ packed integers, FP8
    scales) when it is read as stored; None where weights are quantized at load, or not at all."""
    config = json.loads((model_path / "config.json").read_text())
    if scheme in PREQUANTIZED:
        return PackedCheckpoint(QuantConfig.from_checkpoint(config["quantization_config"]))
    if scheme == "fp8" and config.get("quantization_config"):
        return Fp8Checkpoint()
    return None


BNB_CPU_4BIT_BLOCK = 64


def _check_cpu_4bit_widths(model: nn.Module, scheme: str) -> None:
    """bitsandbytes' CPU 4-bit kernel repacks each weight in blocks of 64 input features and fails at the
    first matmul on any other width (a row-parallel shard's slice of a small model): refused at load."""
    for name, module in model.named_modules():
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            continue
        in_features = module.weight.shape[1]
        if module.weight.device.type == "cpu" and in_features % BNB_CPU_4BIT_BLOCK:
            raise ValueError(
                f"--quantize {scheme} on CPU: bitsandbytes' 4-bit CPU kernel takes input features in "
                f"multiples of {BNB_CPU_4BIT_BLOCK}, and {name} has {in_features} on this shard; "
                "use fewer shards, or another scheme"
            )


def quantize_model(
    model: nn.Module, scheme: str | None, packed: PackedCheckpoint | Fp8Checkpoint | None = None
) -> None:
    """Quantizes every base linear of the decoder layers (attention and MLP), after loading; a
    checkpoint read as stored (`packed`) puts its quantized linears in place instead."""
    if packed is not None:
        count = packed.install(model)
        logger.info("--quantize %s: %d linears %s", scheme, count, packed.describe())
        return
    if not scheme:
        return
    linears = [m for m in model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
    if scheme in ("bitsandbytes-nf4", "bitsandbytes-fp4"):
        _check_cpu_4bit_widths(model, scheme)
    for module in linears:
        quantize_linear(module, scheme)
    num_experts = sum(isinstance(m, Experts) for m in model.modules())
    logger.info(
        "--quantize %s: %d linears quantized%s",
        scheme,
        len(linears),
        f"; the experts of {num_experts} MoE layers stay in full precision (not yet)" if num_experts else "",
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights hold on this shard: parameters and buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if tensor.device.type != "meta" and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    for module in model.modules():
        if isinstance(module, BitsAndBytesLinear):
            total += module.state_bytes()
        elif isinstance(nbytes := getattr(module, "nbytes", None), int):  # worker/prepacked.py's copies
            total += nbytes
    return total
