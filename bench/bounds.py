"""The byte bound of a step: bytes it must read from memory divided by the measured copy bandwidth.

A decode step reads every weight once (all but the embedding table, of which it reads B rows), the
K/V of every cached token of every sequence, and each distinct adapter in the batch once. No
implementation can beat that time on this device, so efficiency = bound / measured says how close
the engine comes. The bandwidth is measured at the start of the run with a device-to-device tensor
copy (memcpy on CPU); a copy of n bytes reads n and writes n, so it moves 2n bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from loraxpy.worker.adapters import module_shape
from loraxpy.worker.model_config import ModelConfig

ADAPTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, num_bytes: int = 0, repeats: int = 10) -> float:
    """Bytes per second moved (read + write) by `dst.copy_(src)` on `device`; the best of `repeats`."""
    num_bytes = num_bytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


@dataclass(frozen=True)
class ByteCosts:
    """What one step reads, per kind of data, for one loaded model."""

    weight_bytes: int  # every parameter a decode step reads (the embedding table excluded)
    kv_bytes_per_token: int  # K and V of one cached token over all layers
    adapter_bytes_per_rank: int  # one rank of one adapter on its projections (`targets`), all layers

    @classmethod
    def of(
        cls,
        model: nn.Module,
        config: ModelConfig,
        kv_bytes_per_token: int,
        targets: Iterable[str] = ADAPTED_TARGETS,
    ) -> ByteCosts:
        element = next(model.parameters()).element_size()
        weights = sum(
            p.numel() * p.element_size()
            for name, p in model.named_parameters()
            # a step reads B rows of the embedding, not the table (unless it is also the LM head)
            if config.tie_word_embeddings or not name.startswith("embed_tokens.")
        )
        per_rank = sum(sum(module_shape(config, t)) for t in targets) * config.num_layers
        return cls(weights, kv_bytes_per_token, per_rank * element)

    def step_bytes(self, kv_tokens: float, adapter_ranks: Iterable[int]) -> float:
        """Bytes one step reads: weights + K/V of `kv_tokens` cached tokens + each distinct adapter once."""
        adapters = sum(adapter_ranks) * self.adapter_bytes_per_rank
        return self.weight_bytes + kv_tokens * self.kv_bytes_per_token + adapters
