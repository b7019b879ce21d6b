"""Which adapter each row of a benchmark batch uses: none, one for all, N distinct (uniform or Zipf), mixed ranks.

Adapter indices follow the worker's convention: 0 is the base model, adapters are 1..N. Adapter j
has rank `ranks[(j - 1) % len(ranks)]`, so a mixed-rank workload cycles through its ranks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("base", "single", "uniform", "zipf", "mixed")


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # one of KINDS
    num_adapters: int  # adapters loaded for this workload (0 for the base model)
    ranks: tuple[int, ...] = (16,)
    zipf_s: float = 1.0  # Zipf exponent: adapter k is drawn with weight 1 / k**s

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"workload kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if (self.kind == "base") != (self.num_adapters == 0):
            raise ValueError("only the base workload has no adapters")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError("adapter ranks must be positive")

    def rank_of(self, adapter_index: int) -> int:
        return self.ranks[(adapter_index - 1) % len(self.ranks)]

    @property
    def max_rank(self) -> int:
        return max(self.ranks) if self.num_adapters else 0

    def assign(self, batch_size: int, rng: random.Random) -> list[int]:
        """The adapter index of each of `batch_size` rows."""
        n = self.num_adapters
        if self.kind == "base":
            return [0] * batch_size
        if self.kind == "single":
            return [1] * batch_size
        if self.kind == "zipf":
            weights = [1.0 / k**self.zipf_s for k in range(1, n + 1)]
            return rng.choices(range(1, n + 1), weights=weights, k=batch_size)
        # uniform and mixed: round robin, so a batch of B rows holds min(N, B) distinct adapters
        return [i % n + 1 for i in range(batch_size)]


def default_workloads(
    adapter_counts: tuple[int, ...],
    *,
    kinds: tuple[str, ...] = KINDS,
    rank: int = 16,
    mixed_ranks: tuple[int, ...] = (8, 16, 32, 64),
    mixed_adapters: int = 32,
    zipf_s: float = 1.0,
) -> list[Workload]:
    workloads: list[Workload] = []
    if "base" in kinds:
        workloads.append(Workload("base", "base", 0))
    if "single" in kinds:
        workloads.append(Workload("single", "single", 1, (rank,)))
    for kind in ("uniform", "zipf"):
        if kind in kinds:
            workloads += [Workload(f"{kind}-{n}", kind, n, (rank,), zipf_s) for n in adapter_counts]
    if "mixed" in kinds:
        workloads.append(Workload(f"mixed-{mixed_adapters}", "mixed", mixed_adapters, mixed_ranks))
    return workloads
