"""Adapter slots on the device and the LoRA delta of every adapted layer, for a mixed batch.

Each adapted linear holds, per checkpoint slice (q/k/v, o, gate/up, down), stacked slot tensors
a [num_slots, max_rank, in] and b [num_slots, out, max_rank]; slot 0 is the base model (zeros).
A fused layer's slices are views into one allocation (A stacked along the rank, B along the
output), so the Triton path covers all slices in one shrink and one expand launch. The torch path
keeps A transposed and rank-interleaved instead (kernels/lora.py's `a_t`), so it shrinks all slices
in one matmul, and B transposed ([num_slots, max_rank, out]); each slice's A is then a strided view
[num_slots, in, max_rank] of that stack. On CPU, steps of up to FUSED_MAX_ROWS rows (decode) run
both stages in one fused call per layer on that same layout (kernels/cpu_fused.cpp's lora_rows).
Per step the runner sets one slot index per token row; every adapted layer then adds
expand(shrink(x, a), b) for all rows at once, whatever the mix of adapters and ranks.
Tensor parallel: a column-parallel layer keeps A whole (the shrink output is complete) and its
slice of B's rows; a row-parallel layer keeps its slice of A's columns and B whole, so its partial
delta joins the layer's partial sum before the one all-reduce. The LM head is vocab-parallel,
i.e. column-parallel over vocabulary rows; its slots (B is vocab × rank per slot) are allocated
when the first adapter that adapts it arrives, and its delta uses the slots of the logit rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from loraxpy.kernels import lora_triton
from loraxpy.kernels.cpu_fused import FusedOps
from loraxpy.kernels.lora import LoraPlan, lora_add, lora_add_fused
from loraxpy.kernels.lora_triton import Segments, SliceLayout, StaticSegments, sgmv_expand_add, sgmv_shrink
from loraxpy.worker.adapters import LoraAdapter, head_key, module_shape
from loraxpy.worker.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, Shard
from loraxpy.worker.medusa import MedusaHeads
from loraxpy.worker.model_config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedAdapter:
    """An adapter's A and scaled B per (layer, target), ready to copy into a slot on its device."""

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    rank: int
    nbytes: int
    ready: torch.cuda.Event | None  # CUDA: recorded on the upload stream after the copies
    medusa: MedusaHeads | None = None  # the adapter's Medusa heads, on the device (worker/medusa.py)


class SlotsFullError(RuntimeError):
    """Every adapter slot is taken; the router must offload one first."""


@dataclass
class LoraBatch:
    """Per-step state shared by every adapted layer."""

    max_rank: int
    slot_ranks: dict[int, int] = field(default_factory=dict)  # slot → rank of the adapter it holds
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    slots: list[int] | None = None  # each token row's slot, or None when no row uses an adapter
    plan: LoraPlan | None = None  # the rows grouped by adapter, on the torch path
    segments: Segments | None = None  # the same rows as SGMV segments, on the Triton path
    # CPU: the fused ops' `lora_rows` serves steps of up to FUSED_MAX_ROWS rows (kernels/cpu_fused.py)
    fused: FusedOps | None = None
    num_slots: int = 0
    row_slots: torch.Tensor | None = None  # [rows] int64, for lora_rows
    rank_table: torch.Tensor | None = None  # [num_slots] int64, for lora_rows

    def use(self, slots: list[int] | None, *, with_plan: bool = True) -> None:
        """Sets this step's per-row slots (and, for the torch path, the plan every layer reads)."""
        self.slots = slots if slots and any(slots) else None
        self.row_slots = self.rank_table = None
        if self.fused is not None and self.slots is not None and len(self.slots) <= FUSED_MAX_ROWS:
            self.plan = None  # every layer's torch LoRA goes through lora_rows this step
            self.row_slots = torch.tensor(self.slots, dtype=torch.int64)
            ranks = [self.slot_ranks.get(s, self.max_rank) for s in range(self.num_slots)]
            self.rank_table = torch.tensor(ranks, dtype=torch.int64)
            return
        self.plan = self.plan_for(range(len(self.slots))) if with_plan and self.slots else None

    def plan_for(self, rows: Iterable[int]) -> LoraPlan | None:
        """The torch path's plan for some rows of the step (the LM head's logit rows)."""
        if self.slots is None:
            return None
        slots = [self.slots[r] for r in rows]
        return LoraPlan.build(slots, self.slot_ranks, self.max_rank, self.device)


@dataclass
class _Slice:
    # A view into LoraSlots.a: [num_slots, max_rank, in_local], or on the torch path its transpose
    # [num_slots, in_local, max_rank] (`a_t` holds the slices' columns interleaved)
    a: torch.Tensor
    b: torch.Tensor  # a view into LoraSlots.b: [num_slots, out_local, max_rank]; torch path: transposed
    out_offset: int


def _local_shape(
    layer: ColumnParallelLinear | RowParallelLinear | ParallelLMHead,
    shard: Shard,
    in_full: int,
    out_full: int,
) -> tuple[int, int]:
    """This rank's (in, out) of one slice: a column-parallel layer splits out, a row-parallel one in."""
    if isinstance(layer, RowParallelLinear):
        return in_full // shard.world_size, out_full
    if isinstance(layer, ParallelLMHead):
        return in_full, layer.vocab_local  # the last rank's part is padded
    return in_full, out_full // shard.world_size


class LoraSlots:
    """The adapter slots of one parallel linear layer."""

    def __init__(
        self,
        layer: ColumnParallelLinear | RowParallelLinear | ParallelLMHead,
        full_shapes: dict[str, tuple[int, int]],
        batch: LoraBatch,
        num_slots: int,
        max_rank: int,
        shard: Shard,
        *,
        transposed: bool = False,
    ) -> None:
        self.batch = batch
        self.shard = shard
        self.transposed = transposed  # the torch path's layout of A (lora_add_fused)
        self.is_column = not isinstance(layer, RowParallelLinear)
        local = {name: _local_shape(layer, shard, *shape) for name, shape in full_shapes.items()}
        in_sizes = {in_local for in_local, _ in local.values()}
        if len(in_sizes) != 1:
            raise ValueError(f"fused slices must share their input size, got {sorted(in_sizes)}")
        out_sizes = [out_local for _, out_local in local.values()]
        dtype, device = slot_dtype(layer.weight.dtype, layer.weight.device), layer.weight.device
        # One allocation per layer; the slices are views, so writes keep the stacks the kernels read current.
        n, in_local = len(local), in_sizes.pop()
        a_shape = (num_slots, in_local, max_rank * n) if transposed else (num_slots, n * max_rank, in_local)
        self.a = torch.zeros(a_shape, dtype=dtype, device=device)
        # The torch path keeps B transposed too ([num_slots, max_rank, out]): rank k's row of every
        # slice is contiguous, so an expand streams rows of B (Triton's: [num_slots, out, max_rank]).
        b_shape = (
            (num_slots, max_rank, sum(out_sizes)) if transposed else (num_slots, sum(out_sizes), max_rank)
        )
        self.b = torch.zeros(b_shape, dtype=dtype, device=device)
        self.slices: dict[str, _Slice] = {}
        b_start = 0
        for i, (name, (_, out_local)) in enumerate(local.items()):
            offset = layer.offsets[name] if isinstance(layer, ColumnParallelLinear) else 0
            self.slices[name] = _Slice(
                a=self.a.view(num_slots, in_local, max_rank, n)[..., i]
                if transposed
                else self.a[:, i * max_rank : (i + 1) * max_rank],
                b=self.b[:, :, b_start : b_start + out_local]
                if transposed
                else self.b[:, b_start : b_start + out_local],
                out_offset=offset,
            )
            b_start += out_local
        offsets = [s.out_offset for s in self.slices.values()]
        self.layout = SliceLayout.build(out_sizes, offsets, device)  # for the Triton expand
        self.b_slices = [(s.b, s.out_offset) for s in self.slices.values()]  # for the torch path
        self.outs, self.offsets = out_sizes, offsets  # for the fused CPU ops' lora_rows

    def write(self, slot: int, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copies this rank's part of (A [r, in], B [out, r]) into `slot`, zero-padding the rank."""
        s, r = self.slices[name], a.shape[0]
        rank = self.shard.rank
        if self.is_column:
            rows = s.b.shape[2 if self.transposed else 1]
            b = b[rank * rows : (rank + 1) * rows]  # shorter on a padded last rank
        else:
            cols = s.a.shape[1 if self.transposed else 2]
            a = a.narrow(1, rank * cols, cols)
        s.a[slot].zero_()
        s.b[slot].zero_()
        if self.transposed:
            s.a[slot, :, :r].copy_(a.T)
            s.b[slot, :r, : b.shape[0]].copy_(b.T)
        else:
            s.a[slot, :r].copy_(a)
            s.b[slot, : b.shape[0], :r].copy_(b)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()  # every slice's part: they are views into these two tensors
        self.b[slot].zero_()

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """y + LoRA delta for every row (x: [rows, in_local], y: [rows, out_local]).

        x holds every token row of the step, or, with `rows`, only those rows (the LM head's).
        """
        if rows is None and self.batch.segments is not None:  # Triton SGMV (CUDA): all slices at once
            v = sgmv_shrink(x, self.a, self.batch.segments, len(self.slices))  # [rows, slices * max_rank]
            return sgmv_expand_add(v, self.b, self.batch.segments, y, self.layout)
        batch = self.batch
        if self.transposed and batch.row_slots is not None and batch.fused is not None:
            row_slots = batch.row_slots if rows is None else batch.row_slots[rows]
            batch.fused.lora_rows(x, y, self.a, self.b, row_slots, batch.rank_table, self.outs, self.offsets)
            return y
        plan = batch.plan if rows is None else batch.plan_for(rows)
        if plan is None:
            return y
        if self.transposed:
            return lora_add_fused(x, y, self.a, self.b_slices, plan)
        # Triton's layout, whose LM head computes its logit rows here
        weights = [(s.a, s.b, s.out_offset) for s in self.slices.values()]
        return lora_add(x, y, weights, plan)


def slot_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype adapter slots are stored and computed in: the model's, except half precision on CPU.

    On CPU a bf16 model keeps its adapters in fp32: torch's bf16 bmm copies its strided operands
    (the slot views) on every call and ran the 16-adapter decode step about 1.5x slower than fp32
    slots on this project's AVX512-BF16 machine; the LoRA delta is rounded once, when added to y.
    """
    return torch.float32 if device.type == "cpu" else model_dtype


def slot_bytes(config: ModelConfig, shard: Shard, max_rank: int, dtype: torch.dtype) -> int:
    """Device bytes one adapter slot takes on this shard (A and B of every layer slice; no LM head)."""
    per_layer = 0
    for targets in ADAPTED_TARGETS:
        for t in targets:
            in_full, out_full = module_shape(config, t)
            column = t not in ("o_proj", "down_proj")
            in_local = in_full if column else in_full // shard.world_size
            out_local = out_full // shard.world_size if column else out_full
            per_layer += max_rank * (in_local + out_local)
    return per_layer * config.num_layers * torch.tensor([], dtype=dtype).element_size()


def fit_slots(requested: int, budget_bytes: int, per_slot: int) -> int:
    """How many of `requested` slots fit the budget; at least one when any were asked for."""
    if requested <= 0:
        return 0
    return max(1, min(requested, budget_bytes // max(1, per_slot)))


# Steps of up to this many rows run LoRA through the fused CPU ops' lora_rows (one call per layer,
# each row's adapter read in place); larger ones (prefill) batch rows per adapter in torch matmuls.
FUSED_MAX_ROWS = 32
CPU_MAX_ADAPTER_SLOTS = 16  # slots are rank-padded copies of every layer slice: bounded on CPU


def num_adapter_slots(
    config: ModelConfig,
    shard: Shard,
    max_loras: int,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_fraction: float,
) -> int:
    """--max-loras, capped on CPU; on CUDA lowered to what `memory_fraction` of the device holds."""
    if max_loras <= 0:
        return 0
    if device.type != "cuda":
        if max_loras > CPU_MAX_ADAPTER_SLOTS:
            logger.info("adapter slots: %d (the CPU cap) of %d requested", CPU_MAX_ADAPTER_SLOTS, max_loras)
        return min(max_loras, CPU_MAX_ADAPTER_SLOTS)
    per_slot = slot_bytes(config, shard, max_rank, slot_dtype(dtype, device))
    total = torch.cuda.get_device_properties(device).total_memory
    slots = fit_slots(max_loras, int(memory_fraction * total), per_slot)
    logger.info(
        "adapter slots: %d of %d requested (%.1f MiB each, rank %d, budget %.0f%% of %.1f GiB)",
        slots, max_loras, per_slot / 2**20, max_rank, 100 * memory_fraction, total / 2**30,
    )  # fmt: skip
    return slots


def choose_backend(device: torch.device) -> str:
    """Triton SGMV on CUDA where Triton is installed, else the torch path; the slots' layout follows
    (the torch path's A is transposed), so it is chosen once, before any slot is allocated. A Triton
    path that fails the warmup self-check falls back to the torch path on the same slots (`lora_add`
    reads Triton's layout)."""
    return "triton" if device.type == "cuda" and lora_triton.available() else "torch"


# model attribute path → the target modules it fuses
ADAPTED = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}
ADAPTED_TARGETS = tuple(ADAPTED.values())


@dataclass
class LoraManager:
    """Maps the router's adapter indices to device slots and writes adapters into every layer."""

    slots: dict[tuple[int, str], LoraSlots]  # (layer index, target) → the slots holding it
    batch: LoraBatch
    num_slots: int
    max_rank: int
    index_to_slot: dict[int, int] = field(default_factory=dict)
    medusa: dict[int, MedusaHeads] = field(default_factory=dict)  # adapter index → its Medusa heads
    head: ParallelLMHead | None = None
    config: ModelConfig | None = None
    shard: Shard = field(default_factory=Shard)
    backend: str = "torch"  # "triton" on CUDA when Triton is installed; chosen once, at attach
    # Fixed buffers for captured decode graphs (`allocate_static_batch`); None until then.
    static_segments: StaticSegments | None = None
    batch_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    upload_stream: torch.cuda.Stream | None = None  # CUDA: adapter uploads beside the steps

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        config: ModelConfig,
        shard: Shard,
        num_slots: int,
        max_rank: int,
        backend: str | None = None,
        adapted: dict[str, tuple[str, ...]] = ADAPTED,
    ) -> LoraManager:
        """Slots on every adapted layer (`adapted`: module path → the targets it fuses; an encoder's
        differ), laid out for `backend` (default: `choose_backend`'s)."""
        batch = LoraBatch(max_rank, device=next(model.parameters()).device)
        device = next(model.parameters()).device
        backend = backend or choose_backend(device)
        slots: dict[tuple[int, str], LoraSlots] = {}
        for i, layer in enumerate(model.layers):  # type: ignore[union-attr, arg-type]
            for path, targets in adapted.items():
                if targets[0] in ("gate_proj", "down_proj") and config.is_sparse(i):
                    continue  # experts take no LoRA: adapters that target them are refused when read
                linear = layer.get_submodule(path)
                shapes = {t: module_shape(config, t) for t in targets}
                lora = LoraSlots(
                    linear, shapes, batch, num_slots + 1, max_rank, shard, transposed=backend == "torch"
                )
                linear.lora = lora
                for t in targets:
                    slots[(i, t)] = lora
        head = getattr(model, "lm_head", None)
        head = head if isinstance(head, ParallelLMHead) else None
        dtype = slot_dtype(next(model.parameters()).dtype, device)
        return cls(
            slots, batch, num_slots, max_rank, head=head, config=config, shard=shard, backend=backend,
            batch_device=device, dtype=dtype,
        )  # fmt: skip

    def use_fused_ops(self, ops: FusedOps) -> bool:
        """CPU, torch layout: small steps' LoRA through the fused ops' lora_rows; whether it applies."""
        if self.backend != "torch" or self.batch_device.type != "cpu":
            return False
        self.batch.fused, self.batch.num_slots = ops, self.num_slots + 1
        return True

    @property
    def slot_ranks(self) -> dict[int, int]:
        """Slot → adapter rank: the batch owns it, since every layer's plan reads it."""
        return self.batch.slot_ranks

    def _head_slots(self) -> LoraSlots:
        """The LM head's slots, allocated on first use (B is vocab × rank per slot)."""
        assert self.head is not None and self.config is not None
        key = head_key(self.config)
        if key not in self.slots:
            shapes = {"lm_head": module_shape(self.config, "lm_head")}
            lora = LoraSlots(
                self.head, shapes, self.batch, self.num_slots + 1, self.max_rank, self.shard,
                transposed=self.backend == "torch",
            )  # fmt: skip
            self.head.lora = lora
            self.slots[key] = lora
        return self.slots[key]

    def stage(self, adapter: LoraAdapter) -> StagedAdapter:
        """Uploads an adapter's A and scaled B to the device beside the running steps (CUDA: on a
        side stream from pinned memory); `load` then only copies device to device into a slot."""
        device, dtype = self.batch_device, self.dtype
        scaled = {key: (a, b * adapter.scales[key]) for key, (a, b) in adapter.weights.items()}
        heads = adapter.medusa.to(device, dtype) if adapter.medusa is not None else None
        if device.type != "cuda":
            return StagedAdapter(scaled, adapter.rank, adapter.nbytes, None, heads)
        if self.upload_stream is None:
            self.upload_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self.upload_stream):
            weights = {
                key: tuple(t.to(dtype).pin_memory().to(device, non_blocking=True) for t in pair)
                for key, pair in scaled.items()
            }
            ready = self.upload_stream.record_event()
        return StagedAdapter(weights, adapter.rank, adapter.nbytes, ready, heads)  # type: ignore[arg-type]

    def load(self, adapter_index: int, adapter: LoraAdapter | StagedAdapter) -> None:
        """Writes an adapter into a free slot under `adapter_index` (staging it first if needed)."""
        staged = adapter if isinstance(adapter, StagedAdapter) else self.stage(adapter)
        if staged.ready is not None:  # the slot copies wait for the upload, on the step's stream
            current = torch.cuda.current_stream(self.batch_device)
            current.wait_event(staged.ready)
            for pair in staged.weights.values():
                for t in pair:
                    t.record_stream(current)  # freed only once those copies have run
        if adapter_index in self.index_to_slot:
            self.offload(adapter_index)
        used = set(self.index_to_slot.values())
        free = [s for s in range(1, self.num_slots + 1) if s not in used]
        if not free:
            raise SlotsFullError(f"all {self.num_slots} adapter slots are in use; offload one first")
        slot = free[0]
        if self.config is not None and head_key(self.config) in staged.weights:
            self._head_slots()
        for lora in set(self.slots.values()):
            lora.clear(slot)  # modules this adapter leaves alone must add nothing
        for key, (a, b) in staged.weights.items():
            self.slots[key].write(slot, key[1], a, b)
        self.index_to_slot[adapter_index] = slot
        self.slot_ranks[slot] = staged.rank
        if staged.medusa is not None:
            self.medusa[adapter_index] = staged.medusa

    def offload(self, adapter_index: int) -> None:
        slot = self.index_to_slot.pop(adapter_index)
        self.slot_ranks.pop(slot, None)
        self.medusa.pop(adapter_index, None)
        for lora in set(self.slots.values()):
            lora.clear(slot)

    def set_batch(self, token_adapter_indices: list[int], device: torch.device) -> None:
        self.batch.segments = None
        if not any(token_adapter_indices):
            self.batch.use(None)
            return
        slots = self._slots_of(token_adapter_indices)
        self.batch.use(slots, with_plan=self.backend != "triton")
        if self.backend == "triton":
            self.batch.segments = Segments.build(slots, self.slot_ranks, device)

    def _slots_of(self, token_adapter_indices: list[int]) -> list[int]:
        """The device slot of each row's adapter index (0, the base model, keeps slot 0)."""
        slot_of = {0: 0, **self.index_to_slot}
        return [slot_of[i] for i in token_adapter_indices]

    def allocate_static_batch(self, capacity: int, device: torch.device) -> None:
        """Buffers `set_static_batch` fills in place, so a captured graph reads each step's rows.

        Only the Triton path reads its rows from device buffers; the torch path's plan is host-side
        (so it serves the graphs' eager twin on CPU, but could not be captured).
        """
        if device.type == "cuda" and self.backend != "triton":
            raise ValueError("decode CUDA graphs with adapters need the Triton LoRA backend")
        self.static_segments = StaticSegments.allocate(capacity, device) if self.backend == "triton" else None

    def set_static_batch(self, token_adapter_indices: list[int] | None, rows: int) -> None:
        """`set_batch` into the fixed buffers for a batch of `rows` rows; None: no row uses an adapter.

        With indices, every adapted layer runs its LoRA kernels (rows of the base model add
        nothing), so one captured graph serves any mix of adapters in this batch size.
        """
        if token_adapter_indices is None:
            self.batch.use(None)
            self.batch.segments = None
            return
        slots = self._slots_of(token_adapter_indices[:rows])
        self.batch.use(slots, with_plan=self.static_segments is None)
        if self.static_segments is not None:
            self.batch.segments = self.static_segments.fill(slots, self.slot_ranks)
