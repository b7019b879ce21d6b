"""Multi-LoRA shrink and expand over a batch whose rows use different adapters (SGMV semantics).

Adapters live in stacked, rank-padded slot tensors: `a` [num_slots, max_rank, in_features] and
`b` [num_slots, out_features, max_rank], with lora_alpha / r already folded into `b` and slot 0
(the base model) all zeros. Ranks below max_rank are zero-padded, which leaves the result exact.
Row t uses slot `slots[t]`; the torch versions gather per row (no per-adapter Python loop) and
process rows in chunks to bound the gathered weights' memory.
"""

from __future__ import annotations

import torch

# Rows per chunk: bounds the per-row gathered weights at about this many elements.
_GATHER_BUDGET = 1 << 24


def _row_chunks(num_rows: int, per_row: int) -> list[slice]:
    step = max(1, _GATHER_BUDGET // max(1, per_row))
    return [slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """v[t] = a[slots[t]] @ x[t]: x [num_rows, in] → v [num_rows, max_rank]."""
    out = torch.empty(x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)
    for rows in _row_chunks(x.shape[0], a.shape[1] * a.shape[2]):
        out[rows] = torch.bmm(a[slots[rows]], x[rows, :, None]).squeeze(-1)  # a[...]: [n, rank, in]
    return out


def lora_expand(v: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """delta[t] = b[slots[t]] @ v[t]: v [num_rows, max_rank] → delta [num_rows, out]."""
    out = torch.empty(v.shape[0], b.shape[1], dtype=v.dtype, device=v.device)
    for rows in _row_chunks(v.shape[0], b.shape[1] * b.shape[2]):
        out[rows] = torch.bmm(b[slots[rows]], v[rows, :, None]).squeeze(-1)  # b[...]: [n, out, rank]
    return out


def lora_delta_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, segments: list[tuple[int, int, int]]
) -> torch.Tensor:
    """The slow twin: delta rows of each segment (start, end, slot) as two fp32 matmuls, one segment at a time."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32, device=x.device)
    for start, end, slot in segments:
        if slot == 0:
            continue
        out[start:end] = (x[start:end].float() @ a[slot].float().T) @ b[slot].float().T
    return out


def segments_from_slots(slots: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal slots as (start, end, slot)."""
    segments: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if segments and segments[-1][2] == slot and segments[-1][1] == i:
            segments[-1] = (segments[-1][0], i + 1, slot)
        else:
            segments.append((i, i + 1, slot))
    return segments
