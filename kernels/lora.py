"""Multi-LoRA shrink and expand over a batch whose rows use different adapters (SGMV semantics).

Adapters live in stacked, rank-padded slot tensors: `a` [num_slots, max_rank, in_features] and
`b` [num_slots, out_features, max_rank], with lora_alpha / r already folded into `b` and slot 0
(the base model) all zeros. Ranks below max_rank are zero-padded, which leaves the result exact.

The torch path the worker serves with (CPU, and CUDA without Triton): a `LoraPlan` built once per
step groups the rows by adapter, and each group of adapters whose slots are consecutive runs as
batched matmuls over *views* of the slot tensors, cut to the group's own largest rank. No adapter
weight is copied, base rows cost nothing, and an adapter's bytes are read once per layer whatever
its number of rows. `lora_add_fused` is the serving form: A of every slice of a fused layer sits
transposed and rank-interleaved in one stack (`a_t` [num_slots, in, max_rank * num_slices], column
k * num_slices + i holding rank k of slice i; B likewise transposed, [num_slots, max_rank, out]),
so one matmul shrinks all slices at once and the columns of ranks below a group's own rank are a
contiguous prefix: at decode sizes each torch op costs more in dispatch than in arithmetic, and
this halves their number (lorax-bench, one adapter on the default model). On CPU, decode-sized
steps skip these matmuls for the fused `lora_rows` (kernels/cpu_fused.cpp), checked against
`lora_add_fused`. `lora_add` does the same per slice on the plain layout: the twin the Triton
kernels are compared with. `lora_shrink` / `lora_expand` gather each row's weights (simple, slow):
the per-row twins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Rows per chunk: bounds the per-row gathered weights at about this many elements.
_GATHER_BUDGET = 1 << 24
# A group pads its adapters' rows up to the longest one's, by at most this many rows per adapter:
# decode rows and equal prefill chunks batch together, and a long prefill never pads the others.
_PAD_SLACK_ROWS = 8


@dataclass(frozen=True)
class LoraGroup:
    """Adapters in consecutive slots, each with up to `num_rows` rows, computed as one batched matmul.

    Their rows are x[rows] ([num_slots, num_rows]; short adapters repeat a row of their own), or,
    when `rows` is None, the contiguous x[start : start + num_slots * num_rows]. `keep` picks the
    real rows out of the flattened [num_slots * num_rows] result (None: no padding) and `dest` says
    where each lands in y (None: contiguous from `start`).
    """

    first_slot: int
    num_slots: int
    num_rows: int
    rank: int  # the largest rank among these slots; the others are zero-padded to it
    start: int
    rows: torch.Tensor | None
    keep: torch.Tensor | None
    dest: torch.Tensor | None


@dataclass(frozen=True)
class LoraPlan:
    """How one step's rows map onto adapter groups; shared by every adapted layer of the step."""

    groups: tuple[LoraGroup, ...]

    @classmethod
    def build(
        cls, slots: Sequence[int], ranks: Mapping[int, int], max_rank: int, device: torch.device
    ) -> LoraPlan | None:
        """The plan for rows using `slots` (0: no adapter); None when no row uses an adapter."""
        rows_of: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot:
                rows_of.setdefault(slot, []).append(row)
        if not rows_of:
            return None
        runs: list[list[int]] = []
        for slot in sorted(rows_of):
            run = runs[-1] if runs else None
            if run is not None and slot == run[-1] + 1 and _pads_little([*run, slot], rows_of):
                run.append(slot)
            else:
                runs.append([slot])
        groups = (_group(run, rows_of, ranks, max_rank, device) for run in runs)
        return cls(tuple(groups))


def _pads_little(run: list[int], rows_of: dict[int, list[int]]) -> bool:
    lens = [len(rows_of[s]) for s in run]
    return max(lens) * len(run) - sum(lens) <= _PAD_SLACK_ROWS * len(run)


def _group(
    run: list[int],
    rows_of: dict[int, list[int]],
    ranks: Mapping[int, int],
    max_rank: int,
    device: torch.device,
) -> LoraGroup:
    num_rows = max(len(rows_of[s]) for s in run)
    padded = [rows_of[s] + rows_of[s][-1:] * (num_rows - len(rows_of[s])) for s in run]
    flat = [row for rows in padded for row in rows]
    is_padded = any(len(rows_of[s]) < num_rows for s in run)
    start = flat[0]
    rank = max(ranks.get(s, max_rank) for s in run)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    if not is_padded and flat == list(range(start, start + len(flat))):
        return LoraGroup(run[0], len(run), num_rows, rank, start, None, None, None)
    keep = [u * num_rows + i for u, s in enumerate(run) for i in range(len(rows_of[s]))]
    real = [row for s in run for row in rows_of[s]]
    return LoraGroup(
        run[0], len(run), num_rows, rank, start, tensor(flat).view(len(run), num_rows),
        tensor(keep) if is_padded else None, tensor(real),
    )  # fmt: skip


def lora_add(
    x: torch.Tensor,
    y: torch.Tensor,
    weights: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
    plan: LoraPlan,
) -> torch.Tensor:
    """y[t, o_i : o_i + out_i] += (x[t] A_i[s_t]^T) B_i[s_t]^T for each slice (A_i, B_i, o_i) and row t.

    x: [rows, in], y: [rows, out_total]; A_i: [num_slots, max_rank, in], B_i: [num_slots, out_i,
    max_rank]; s_t is row t's slot in `plan` (rows of slot 0 are not in the plan and add nothing).
    """
    for g in plan.groups:
        xs = _group_rows(x, g)
        slots = slice(g.first_slot, g.first_slot + g.num_slots)
        # Slots may be wider than the model (fp32 adapters beside a bf16 model on CPU): compute in
        # the slots' dtype and round the delta once, where it is added to y.
        xs = xs.to(weights[0][0].dtype)
        for a, b, offset in weights:
            v = torch.bmm(xs, a[slots, : g.rank].transpose(1, 2))  # [num_slots, num_rows, rank]
            bt = b[slots, :, : g.rank].transpose(1, 2)  # [num_slots, rank, out_i]
            if g.rows is None and g.num_slots == 1 and y.dtype == v.dtype:  # one adapter's rows: in place
                y[g.start : g.start + g.num_rows, offset : offset + bt.shape[2]].addmm_(v[0], bt[0])
                continue
            _add_rows(y, torch.bmm(v, bt), g, offset)
    return y


def interleave_a(a_slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """`a_t` [num_slots, in, max_rank * n] from n plain stacks A_i [num_slots, max_rank, in]."""
    return torch.stack([a.transpose(1, 2) for a in a_slices], dim=-1).flatten(2)


def lora_add_fused(
    x: torch.Tensor,
    y: torch.Tensor,
    a_t: torch.Tensor,
    b_slices: Sequence[tuple[torch.Tensor, int]],
    plan: LoraPlan,
) -> torch.Tensor:
    """`lora_add` with A in the interleaved, transposed stack `a_t` (see the module's docstring).

    x: [rows, in], y: [rows, out_total]; a_t: [num_slots, in, max_rank * n]; b_slices: (B_i^T
    [num_slots, max_rank, out_i], o_i) per slice, in a_t's slice order (B transposed, as A is).
    """
    n = len(b_slices)
    for g in plan.groups:
        xs = _group_rows(x, g)
        slots = slice(g.first_slot, g.first_slot + g.num_slots)
        xs = xs.to(a_t.dtype)  # fp32 slots beside a bf16 model on CPU: the delta is rounded once, into y
        a = a_t[slots, :, : g.rank * n]
        # [num_slots, num_rows, rank * n]; one adapter: a plain matmul, cheaper to dispatch than bmm
        v = (xs[0] @ a[0]).unsqueeze(0) if g.num_slots == 1 else torch.bmm(xs, a)
        if n > 1:  # [.., rank, n] -> [.., n, rank]: each slice's ranks contiguous for its expand
            v = v.view(g.num_slots, g.num_rows, g.rank, n).transpose(2, 3).contiguous()
        v = v.view(g.num_slots, g.num_rows, n, g.rank)
        # contiguous rows, unpadded (a prefill of several adapters, or one adapter's rows): each
        # slice's delta goes straight into y's rows, viewed [num_slots, num_rows, out_total]; else
        # (padded or scattered rows) it is computed apart and added row by row
        in_place = g.rows is None and y.dtype == v.dtype
        if in_place:
            rows_of_y = y[g.start : g.start + g.num_slots * g.num_rows].view(g.num_slots, g.num_rows, -1)
        for i, (b_t, offset) in enumerate(b_slices):
            bt = b_t[slots, : g.rank]  # [num_slots, rank, out_i]
            if in_place and g.num_slots == 1:
                rows_of_y[0, :, offset : offset + bt.shape[2]].addmm_(v[0, :, i], bt[0])
            elif in_place:
                rows_of_y[:, :, offset : offset + bt.shape[2]].baddbmm_(v[:, :, i], bt)
            else:
                _add_rows(y, torch.bmm(v[:, :, i], bt), g, offset)
    return y


def _group_rows(x: torch.Tensor, g: LoraGroup) -> torch.Tensor:
    """The group's rows of x as [num_slots, num_rows, in]: a view, or a gather of activations."""
    if g.rows is None:
        return x[g.start : g.start + g.num_slots * g.num_rows].view(g.num_slots, g.num_rows, -1)
    return x[g.rows]  # activations, not weights, are gathered


def _add_rows(y: torch.Tensor, delta: torch.Tensor, g: LoraGroup, offset: int) -> None:
    """y[row, offset:] += the group's delta [num_slots, num_rows, out_i], padding rows dropped."""
    flat = delta.flatten(0, 1).to(y.dtype)
    if g.keep is not None:
        flat = flat[g.keep]
    out = y[:, offset : offset + flat.shape[1]]
    if g.dest is None:
        out[g.start : g.start + flat.shape[0]] += flat
    else:
        out.index_add_(0, g.dest, flat)


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
