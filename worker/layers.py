"""Tensor-parallel building blocks: linears and embeddings that load their own slice of a checkpoint.

Each parallel layer owns a `load(name, tensor)` that takes the full checkpoint tensor and copies in
only this rank's slice, so the loader needs no knowledge of the sharding scheme (nano-vllm's idea).
With world_size 1 every slice is the whole tensor and no collective runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shard:
    """Which slice of every parallel layer this process holds."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

    def split(self, size: int, what: str) -> int:
        """Size of this rank's part when `size` units are split evenly; refuses an uneven split."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) does not divide evenly over {self.world_size} shards")
        return size // self.world_size


def all_reduce(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    if shard.world_size > 1:
        dist.all_reduce(x)
    return x


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over ranks; several checkpoint tensors may be fused.

    `slices` names the fused checkpoint tensors and their full output sizes, e.g. q/k/v or gate/up;
    each is split evenly over ranks and this rank's parts are stacked in `slices` order.
    """

    def __init__(
        self,
        in_features: int,
        slices: dict[str, int],
        *,
        bias: bool,
        shard: Shard,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.shard = shard
        self.local_sizes = {name: shard.split(size, f"output of {name}") for name, size in slices.items()}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, size in self.local_sizes.items():
            self.offsets[name] = offset
            offset += size
        self.out_features = offset
        self.lora: Any = None  # LoraSlots, attached when the worker serves adapters
        self.quant: Any = None  # --quantize: computes x W^T (+ b) in weight's place (worker/quantization.py)
        self.weight = nn.Parameter(
            torch.empty(offset, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(offset, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def load(self, slice_name: str, param: str, tensor: torch.Tensor) -> None:
        """Copies this rank's rows of checkpoint tensor `slice_name`.`param` (weight or bias).

        A checkpoint that stores the fused tensor itself (Phi-3's qkv_proj, gate_up_proj) is split
        into the slices first, in their order, so each rank still takes its part of every slice.
        """
        if slice_name not in self.local_sizes:
            full = [size * self.shard.world_size for size in self.local_sizes.values()]
            if tensor.shape[0] != sum(full):
                raise ValueError(f"fused {slice_name}.{param} has {tensor.shape[0]} rows, not {sum(full)}")
            for name, part in zip(self.local_sizes, tensor.split(full), strict=True):
                self.load(name, param, part)
            return
        size = self.local_sizes[slice_name]
        rows = tensor.narrow(0, self.shard.rank * size, size)
        target = self.weight if param == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a bias for {slice_name} but the config says no bias")
        dst = target.data.narrow(0, self.offsets[slice_name], size)
        if dst.shape != rows.shape:
            raise ValueError(
                f"{slice_name}.{param}: checkpoint shape {tuple(rows.shape)} != {tuple(dst.shape)}"
            )
        dst.copy_(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, local out_features]
        y = F.linear(x, self.weight, self.bias) if self.quant is None else self.quant(x, self.bias)
        return y if self.lora is None else self.lora.add_delta(x, y)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T (+ b once): W's input columns split, one all-reduce."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        shard: Shard,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.shard = shard
        self.in_local = shard.split(in_features, "input features of a row-parallel layer")
        self.lora: Any = None  # LoraSlots, attached when the worker serves adapters
        self.quant: Any = None  # --quantize: computes x W^T (+ b) in weight's place (worker/quantization.py)
        self.weight = nn.Parameter(
            torch.empty(out_features, self.in_local, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def load(self, slice_name: str, param: str, tensor: torch.Tensor) -> None:
        if param == "bias":
            if self.bias is None:
                raise ValueError(f"checkpoint has a bias for {slice_name} but the config says no bias")
            self.bias.data.copy_(tensor)
            return
        cols = tensor.narrow(1, self.shard.rank * self.in_local, self.in_local)
        if cols.shape != self.weight.shape:
            raise ValueError(
                f"{slice_name}.weight: checkpoint shape {tuple(cols.shape)} != {tuple(self.weight.shape)}"
            )
        self.weight.data.copy_(cols)

    def forward_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum, before the all-reduce (LoRA adds its own partial delta here)."""
        y = F.linear(x, self.weight) if self.quant is None else self.quant(x, None)
        return y if self.lora is None else self.lora.add_delta(x, y)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        out = all_reduce(partial, self.shard)
        return out if self.bias is None else out + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, local in_features] -> [num_tokens, out_features]
        return self.reduce(self.forward_partial(x))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks; ids outside this rank's range contribute zeros."""

    def __init__(
        self, vocab_size: int, hidden_size: int, *, shard: Shard, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.shard = shard
        self.vocab_local = -(-vocab_size // shard.world_size)  # ceil: the last rank's part is padded
        self.vocab_start = shard.rank * self.vocab_local
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(
            torch.zeros(self.vocab_local, hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def load(self, slice_name: str, param: str, tensor: torch.Tensor) -> None:
        end = min(self.vocab_start + self.vocab_local, tensor.shape[0])
        self.weight.data[: end - self.vocab_start].copy_(tensor[self.vocab_start : end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [num_tokens] -> [num_tokens, hidden]
        if self.shard.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.vocab_local)
        out = F.embedding(local.clamp(0, self.vocab_local - 1), self.weight) * inside.unsqueeze(-1)
        return all_reduce(out, self.shard)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h E^T over this rank's vocab rows, gathered to the full vocab on every rank."""

    lora: Any = None  # LoraSlots once an adapter adapts the LM head

    def __init__(
        self, vocab_size: int, hidden_size: int, *, shard: Shard, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__(vocab_size, hidden_size, shard=shard, dtype=dtype, device=device)
        self.quant: Any = None  # computes h E^T in the weight's place: a packed copy (worker/prepacked.py)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        # hidden: [n, hidden] -> logits [n, vocab_size] (fp32); rows: their indices in the batch
        local = F.linear(hidden, self.weight) if self.quant is None else self.quant(hidden, None)
        if self.lora is not None and rows is not None and self.lora.batch.slots is not None:
            local = self.lora.add_delta(hidden, local, rows.tolist())
        local = local.float()
        if self.shard.world_size > 1:
            parts = [torch.empty_like(local) for _ in range(self.shard.world_size)]
            dist.all_gather(parts, local)
            local = torch.cat(parts, dim=-1)
        return local[:, : self.vocab_size]


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 as HF Llama does; Gemma's (1 + w) with offset 1."""

    def __init__(
        self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device, offset: float = 0.0
    ) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def load(self, slice_name: str, param: str, tensor: torch.Tensor) -> None:
        self.weight.data.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, in fp32; weight broadcasts.

    Llama rounds the normalised x to its dtype before the weight; Gemma (offset 1: (1 + w)) multiplies
    in fp32 and rounds after, as HF transformers does for each.
    """
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (offset + weight.float())).to(dtype)
    return weight * h.to(dtype)
