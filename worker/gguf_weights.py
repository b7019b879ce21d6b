"""GGUF checkpoints served as they are: block-quantized linears stay in their blocks and are
dequantized at each matmul; norms and the embedding are read in full precision.

`--model-id` a `.gguf` file: `model_source.gguf_model_folder` writes its config and tokenizer once
into an HF folder (what the router reads) that points back at the file, and `load_gguf` reads the
tensors into the model, each linear taking this rank's rows or block columns of the file's blocks.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loraxpy.worker.layers import ColumnParallelLinear, RowParallelLinear
from loraxpy.worker.model_config import ModelConfig
from loraxpy.worker.model_source import GGUF_POINTER

logger = logging.getLogger(__name__)

# llama.cpp's tensor names → ours (layer tensors under model.layers.N.)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def gguf_file_of(folder: Path) -> Path | None:
    """The GGUF file an HF folder written by `model_source.gguf_model_folder` stands for, or None."""
    pointer = folder / GGUF_POINTER
    return Path(json.loads(pointer.read_text())["gguf_file"]) if pointer.exists() else None


class GgufLinear(nn.Module):
    """x W^T (+ b) with W kept in GGUF blocks, dequantized (to fp32, then the activations' dtype) at
    each call. `parts` are stacked by rows, each [rows, blocks * block bytes] uint8 of one type."""

    def __init__(self, parts: list[tuple[int, torch.Tensor]], in_features: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(GgufBlocks(qtype, raw, in_features) for qtype, raw in parts)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([part() for part in self.parts])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        return F.linear(x, self.dequantize().to(x.dtype), bias)


class GgufBlocks(nn.Module):
    """One tensor's blocks. Q8_0, Q4_0 and Q4_1 are split once into their scales (fp16 → fp32, +4 bytes
    a block) and packed values, and dequantized in torch as the gguf package computes them (separate
    multiply and add, no fused rounding); every other type goes through the gguf package itself."""

    d: torch.Tensor  # fp32 [rows, blocks, 1]: each block's scale
    m: torch.Tensor  # fp32 [rows, blocks, 1]: Q4_1's minimum
    qs: torch.Tensor  # uint8 [rows, blocks, 16]: two 4-bit values a byte
    q: torch.Tensor  # int8 [rows, blocks, 32]
    raw: torch.Tensor  # uint8 [rows, bytes]: any other type, as stored

    def __init__(self, qtype: int, raw: torch.Tensor, in_features: int) -> None:
        super().__init__()
        from gguf import GGMLQuantizationType as T

        self.qtype, self.shape = qtype, (raw.shape[0], in_features)
        self.fields: tuple[str, ...] = ("raw",)
        layouts = {
            T.Q8_0: (("d", 2), ("q", 32)),
            T.Q4_0: (("d", 2), ("qs", 16)),
            T.Q4_1: (("d", 2), ("m", 2), ("qs", 16)),
        }
        if qtype not in layouts:
            self.register_buffer("raw", raw.contiguous())
            return
        block_bytes = sum(size for _, size in layouts[T(qtype)])
        blocks = raw.view(raw.shape[0], -1, block_bytes)
        start = 0
        self.fields = tuple(name for name, _ in layouts[T(qtype)])
        for name, size in layouts[T(qtype)]:
            field = blocks[..., start : start + size].contiguous()
            start += size
            if name in ("d", "m"):
                field = field.view(torch.float16).float()
            self.register_buffer(name, field.view(torch.int8) if name == "q" else field)

    def forward(self) -> torch.Tensor:
        # -> fp32 [rows, in_features]
        from gguf import GGMLQuantizationType as T

        if self.fields == ("raw",):
            from gguf import quants

            flat = quants.dequantize(self.raw.cpu().numpy(), T(self.qtype)).astype(np.float32)
            return torch.from_numpy(flat).to(self.raw.device).view(self.shape)
        if self.qtype == T.Q8_0:
            w = self.q.float().mul_(self.d)
        else:
            q = torch.cat([self.qs & 0x0F, self.qs >> 4], dim=-1).float()
            w = q.sub_(8).mul_(self.d) if self.qtype == T.Q4_0 else q.mul_(self.d).add_(self.m)
        return w.view(self.shape)


def dequantize(qtype: int, raw: torch.Tensor, in_features: int) -> torch.Tensor:
    """GGUF blocks [rows, bytes] → fp32 [rows, in_features], as a served linear computes them."""
    return GgufBlocks(qtype, raw, in_features)()


def _qk_rows(num_heads: int, rows: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's interleaving of q/k rotary halves (as transformers undoes it)."""
    return torch.arange(rows).reshape(num_heads, rows // num_heads // 2, 2).transpose(1, 2).reshape(-1)


def _our_name(name: str) -> tuple[str, str]:
    """`blk.3.attn_q.weight` → (`layers.3.self_attn.q_proj`, `weight`)."""
    base, _, param = name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}", param
    if base in TOP_NAMES:
        return TOP_NAMES[base], param
    raise ValueError(f"GGUF tensor {name!r} has no place in the model")


def load_gguf(model: nn.Module, gguf_path: Path, config: ModelConfig) -> None:
    """Reads every tensor of the GGUF file into the model: block-quantized linears as GgufLinear."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, quants

    modules = dict(model.named_modules())
    parts: dict[str, dict[str, tuple[int, torch.Tensor]]] = {}
    seen = set()
    for tensor in GGUFReader(str(gguf_path)).tensors:
        path, param = _our_name(tensor.name)
        parent, _, leaf = path.rpartition(".")
        module_name = f"{parent}.{FUSED[leaf]}" if leaf in FUSED else path
        module = modules[module_name]
        raw = torch.from_numpy(np.array(tensor.data))
        heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(leaf)
        seen.add(path)
        if isinstance(module, ColumnParallelLinear | RowParallelLinear) and tensor.tensor_type not in (
            T.F32,
            T.F16,
        ):
            raw = raw[_qk_rows(heads, raw.shape[0])] if heads else raw
            parts.setdefault(module_name, {})[leaf] = (
                int(tensor.tensor_type),
                _my_blocks(module, leaf, raw, tensor.tensor_type),
            )
            continue
        full = (
            quants.dequantize(tensor.data, tensor.tensor_type) if tensor.tensor_type != T.F32 else tensor.data
        )
        weight = torch.from_numpy(np.array(full, dtype=np.float32)).reshape(
            [int(n) for n in reversed(tensor.shape)]
        )
        module.load(leaf, param, weight[_qk_rows(heads, weight.shape[0])] if heads else weight)
    if "lm_head" not in seen and not config.tie_word_embeddings:
        raise ValueError(f"{gguf_path.name} has no output.weight but the config's head is not tied")
    for module_name, by_slice in parts.items():
        module = modules[module_name]
        order = list(getattr(module, "local_sizes", {module_name.rpartition(".")[2]: 0}))
        if set(order) != set(by_slice):
            raise ValueError(f"{module_name}: GGUF mixes block and float tensors in one fused layer")
        in_features = module.weight.shape[1]
        blocks = GgufLinear([by_slice[name] for name in order], in_features)
        module.quant = blocks.to(module.weight.device)
        placeholder = torch.zeros((), dtype=module.weight.dtype, device=module.weight.device).expand(
            module.weight.shape
        )
        module.weight = nn.Parameter(placeholder, requires_grad=False)
    kept = Counter(T(qtype).name for by_slice in parts.values() for qtype, _ in by_slice.values())
    logger.info("read %s: linear tensors kept in their GGUF blocks: %s", gguf_path.name, dict(kept))


def _my_blocks(
    module: ColumnParallelLinear | RowParallelLinear, leaf: str, raw: torch.Tensor, qtype: int
) -> torch.Tensor:
    """This rank's part of a linear's blocks: its rows (column-parallel) or its block columns (row-parallel)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    shard = module.shard
    if isinstance(module, ColumnParallelLinear):
        size = module.local_sizes[leaf]
        return raw.narrow(0, shard.rank * size, size)
    block_elems, block_bytes = GGML_QUANT_SIZES[T(qtype)]
    in_local = module.weight.shape[1]
    if in_local % block_elems:
        raise ValueError(
            f"{leaf}: {in_local} input columns per shard do not hold whole GGUF blocks of {block_elems}; "
            "use fewer shards"
        )
    width = in_local // block_elems * block_bytes
    return raw.narrow(1, shard.rank * width, width)
