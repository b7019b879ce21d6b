"""Per-request merged adapters: a weighted merge of LoRA adapters, as PEFT's `add_weighted_adapter`.

The merge works on A and B separately, like PEFT's non-SVD strategies: each adapter's weight times
its scale is split as sqrt(|w·s|) onto both factors, with the sign on A, and then

- linear:      Σ wᵢ·Tᵢ
- ties:        prune each Tᵢ to its `density` largest magnitudes, elect a sign per value ("total":
               sign of Σ Tᵢ; "frequency": sign of Σ sign(Tᵢ)), and average the weighted values that
               agree with it
- dare_linear: drop values at random with probability 1 - density, rescale by 1 / density, Σ wᵢ·Tᵢ
- dare_ties:   the same random pruning, then ties' election and disjoint mean

over each module's task tensors Tᵢ. All adapters must share one rank (PEFT's rule); a module that
only some adapters adapt merges just those. The result has scale 1. Random pruning draws from a
generator seeded by the caller, so every shard and every reload of the same merge agree.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraxpy.worker.adapters import TARGETS, AdapterError, LoraAdapter

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergeOptions:
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise AdapterError(f"merge strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise AdapterError(
                f"majority sign method {self.majority_sign_method!r} is not one of {', '.join(SIGN_METHODS)}"
            )
        if not 0.0 <= self.density <= 1.0:
            raise AdapterError(f"merge density must be in [0, 1], got {self.density}")


@dataclass(frozen=True)
class MergeRequest:
    """Which adapters to merge, how; hashable, so the host cache can key merged results by it."""

    adapter_ids: tuple[str, ...]
    weights: tuple[float, ...]
    options: MergeOptions = MergeOptions()

    @property
    def seed(self) -> int:
        """A seed for random pruning that every shard and every reload derive alike."""
        return int.from_bytes(hashlib.sha256(repr(self).encode()).digest()[:8], "little") >> 1


def merge_adapters(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], options: MergeOptions, seed: int = 0
) -> LoraAdapter:
    if not adapters or len(adapters) != len(weights):
        raise AdapterError("a merge needs one weight per adapter, and at least one adapter")
    if not all(math.isfinite(w) for w in weights):
        raise AdapterError("merge weights must be finite numbers")
    ranks = sorted({a.rank for a in adapters})
    if len(ranks) > 1:
        raise AdapterError(f"merged adapters must all have the same rank; these have ranks {ranks}")
    strategy = "linear" if len(adapters) == 1 else options.strategy
    generator = torch.Generator().manual_seed(seed)
    keys = sorted({k for a in adapters for k in a.weights}, key=lambda k: (k[0], TARGETS.index(k[1])))
    merged: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for key in keys:
        a_list, b_list, a_weights, b_weights = [], [], [], []
        for adapter, weight in zip(adapters, weights, strict=True):
            if key not in adapter.weights:
                continue
            a, b = adapter.weights[key]
            scaled = weight * adapter.scales[key]
            root = math.sqrt(abs(scaled))
            a_list.append(a)
            b_list.append(b)
            a_weights.append(root if scaled >= 0 else -root)
            b_weights.append(root)
        merged[key] = (
            combine(a_list, a_weights, strategy, options, generator),
            combine(b_list, b_weights, strategy, options, generator),
        )
    return LoraAdapter(rank=ranks[0], weights=merged, scales=dict.fromkeys(merged, 1.0))


def combine(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    strategy: str,
    options: MergeOptions,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merges one module's task tensors (all the same shape) with `strategy`."""
    density = options.density
    if strategy == "ties":
        tensors = [_keep_largest(t, density) for t in tensors]
    elif strategy in ("dare_linear", "dare_ties"):
        tensors = [_drop_at_random(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if strategy in ("linear", "dare_linear"):
        return (stacked * w).sum(dim=0)
    agrees = _majority_sign_mask(stacked, options.majority_sign_method).to(stacked.dtype)
    total = (stacked * w * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1.0)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1.0:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().flatten(), k=int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def _drop_at_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1.0:
        return t
    if density <= 0.0:
        return torch.zeros_like(t)  # PEFT divides by zero here; nothing kept means nothing added
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected
