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

from loraxpy.kernels.cpu_fused import FusedOps
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
    """x W^T (+ b) with W kept in GGUF blocks. `parts` are stacked by rows, each [rows, blocks * block
    bytes] uint8 of one type. The twin dequantizes every part (to fp32, then the activations' dtype)
    at each call; on CPU with the fused ops, `int4_linear` (kernels/cpu_int4.cpp) multiplies the
    Q4_0 / Q4_1 parts from their 4-bit values into their columns of y, and the others as the twin."""

    def __init__(self, parts: list[tuple[int, torch.Tensor]], in_features: int) -> None:
        super().__init__()
        self.blocks = [GgufBlocks(qtype, raw, in_features) for qtype, raw in parts]
        self.parts = nn.ModuleList(self.blocks)  # registered (moved with .to); `blocks`: the same, typed
        self.cpu_kernel: FusedOps | None = None  # CPU: the fused ops, set by CausalLM.use_fused_ops

    @property
    def can_use_cpu_kernel(self) -> bool:
        return any(part.is_4bit for part in self.blocks)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([part() for part in self.parts])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        if self.cpu_kernel is None or x.is_cuda:
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        x = x if x.stride(1) == 1 else x.contiguous()
        y = torch.empty(x.shape[0], sum(part.shape[0] for part in self.blocks), dtype=x.dtype)
        start = 0
        for part in self.blocks:
            columns = y[:, start : start + part.shape[0]]
            start += part.shape[0]
            if part.is_4bit:
                self.cpu_kernel.int4_linear(
                    x, part.values, part.a, part.b, BLOCK_ELEMS, part.qtype == Q4_0, columns
                )
            else:
                columns.copy_(F.linear(x, part().to(x.dtype)))
        return y if bias is None else y + bias


BLOCK_ELEMS = 32  # weights per block of Q8_0, Q4_0 and Q4_1
Q8_0, Q4_0, Q4_1 = 8, 2, 3  # GGMLQuantizationType's values


class GgufBlocks(nn.Module):
    """One tensor's blocks. Q8_0 is split once into its scales (fp16 → fp32, +4 bytes a block) and
    values; Q4_0 and Q4_1 into their 4-bit values laid out for int4_linear (W^T: byte [r, o] holds
    input columns 2r and 2r + 1 of row o, two a byte) and a pair per block (fp32; +8 bytes a block):
    W = (q - a) * b with a = 8 and b the scale (Q4_0), W = q * a + b with the scale and minimum
    (Q4_1). Dequantized in torch as the gguf package computes them (separate multiply and add, no
    fused rounding); every other type goes through the gguf package itself."""

    d: torch.Tensor  # Q8_0: fp32 [rows, blocks, 1], each block's scale
    q: torch.Tensor  # Q8_0: int8 [rows, blocks, 32]
    values: torch.Tensor  # Q4_0 / Q4_1: uint8 [in / 2, rows]
    a: torch.Tensor  # Q4_0 / Q4_1: fp32 [blocks, rows]
    b: torch.Tensor  # Q4_0 / Q4_1: fp32 [blocks, rows]
    raw: torch.Tensor  # uint8 [rows, bytes]: any other type, as stored

    def __init__(self, qtype: int, raw: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.qtype, self.shape = qtype, (raw.shape[0], in_features)
        self.is_4bit = qtype in (Q4_0, Q4_1)
        block_bytes = {Q8_0: 34, Q4_0: 18, Q4_1: 20}.get(qtype)
        if block_bytes is None:
            self.register_buffer("raw", raw.contiguous())
            return
        blocks = raw.view(raw.shape[0], -1, block_bytes)
        d = blocks[..., :2].contiguous().view(torch.float16).float()  # [rows, blocks, 1]
        if qtype == Q8_0:
            self.register_buffer("d", d)
            self.register_buffer("q", blocks[..., 2:].contiguous().view(torch.int8))
            return
        # value j of a block in byte j's low half, value j + 16 in its high half
        qs = blocks[..., block_bytes - 16 :]
        ints = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(raw.shape[0], in_features).t()  # [in, rows]
        self.register_buffer("values", (ints[0::2] | (ints[1::2] << 4)).contiguous())
        scale = d.squeeze(-1).t().contiguous()  # [blocks, rows]
        if qtype == Q4_0:
            self.register_buffer("a", torch.full_like(scale, 8.0))
            self.register_buffer("b", scale)
        else:
            self.register_buffer("a", scale)
            minimum = blocks[..., 2:4].contiguous().view(torch.float16).float()
            self.register_buffer("b", minimum.squeeze(-1).t().contiguous())

    def forward(self) -> torch.Tensor:
        # -> fp32 [rows, in_features]
        if self.qtype == Q8_0:
            return self.q.float().mul_(self.d).view(self.shape)
        if not self.is_4bit:
            from gguf import GGMLQuantizationType as T
            from gguf import quants

            flat = quants.dequantize(self.raw.cpu().numpy(), T(self.qtype)).astype(np.float32)
            return torch.from_numpy(flat).to(self.raw.device).view(self.shape)
        rows, in_features = self.shape
        q = torch.stack((self.values & 0x0F, self.values >> 4), dim=1).view(-1, BLOCK_ELEMS, rows).float()
        a, b = self.a.unsqueeze(1), self.b.unsqueeze(1)
        w_t = q.sub_(a).mul_(b) if self.qtype == Q4_0 else q.mul_(a).add_(b)
        return w_t.view(in_features, rows).t()


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
