"""Pre-quantized GPTQ and AWQ checkpoints (`--quantize gptq | awq`): each linear's packed integers,
scales and zero points are read as the checkpoint stores them and dequantized at each matmul.

The checkpoint's `quantization_config` says how (`QuantConfig.from_checkpoint`):

- GPTQ (AutoGPTQ / GPTQModel / optimum's layout): `qweight` int32 [in / (32 / bits), out], each int32
  holding 32 / bits consecutive *input* rows, the first in the lowest bits; `qzeros` int32
  [groups, out / (32 / bits)], the zero points packed the same way along the *output* columns; `scales`
  [groups, out]; `g_idx` int32 [in]: the group of each input row (act-order / desc_act checkpoints
  quantize the rows in another order, so groups are not contiguous). The format "gptq" (v1) stores
  each zero point minus 1; "gptq_v2" stores it as is. W^T[i, o] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o].
- AWQ (AutoAWQ's GEMM layout, which transformers reads): `qweight` int32 [in, out / 8] and `qzeros`
  int32 [groups, out / 8], both packed along the output columns in the order 0, 2, 4, 6, 1, 3, 5, 7
  (nibble i of a word holds column AWQ_ORDER[i] of its eight); `scales` [groups, out]; groups are
  contiguous runs of `group_size` input rows; zero points stored as they are.

At load each tensor is unpacked, this shard's slice taken (a column-parallel linear's output
columns, a row-parallel one's input rows and the groups they use) and its values kept two a byte
(PackedWeight). Groups run along the input rows, so any cut of the outputs works; a row-parallel
cut through a group is refused with the message (use fewer shards). Act-order rows reach any group,
so a row-parallel shard of such a checkpoint keeps the scales and zeros of every group its rows use.

The twin (`PackedLinear.forward_torch`) dequantizes the whole weight before each matmul. On CUDA the
Triton w4a16 kernel (kernels/w4a16_triton.py) multiplies straight from these integers, unless the
startup self-check (worker/self_check.py) found it off from the twin; on CPU, where the fused ops are
built, `int4_linear` (kernels/cpu_int4.cpp) does, for 4-bit weights whose groups are runs of rows
(every layout but a row-parallel slice of an act-order checkpoint, whose runs differ in length).

LoRA stays in full precision beside these linears, as with every other scheme (worker/lora.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraxpy.kernels import w4a16_triton
from loraxpy.kernels.cpu_fused import FusedOps
from loraxpy.worker.layers import ColumnParallelLinear, RowParallelLinear

logger = logging.getLogger(__name__)

PACKED_PARAMS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its eight


@dataclass(frozen=True)
class QuantConfig:
    """What a GPTQ / AWQ checkpoint's quantization_config says about its packed tensors."""

    method: str  # gptq | awq
    bits: int
    group_size: int  # -1: one group over all input rows
    desc_act: bool = False  # GPTQ act-order: g_idx is not i // group_size
    zero_offset: int = 0  # added to each stored zero point: 1 for GPTQ's v1 format

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @classmethod
    def from_checkpoint(cls, q: dict[str, Any]) -> QuantConfig:
        """Reads and checks a config.json's quantization_config; refuses what this server cannot read."""
        method = str(q.get("quant_method", "")).lower()
        bits = int(q.get("bits", q.get("w_bit", 4)))
        group_size = int(q.get("group_size", q.get("q_group_size", 128)))
        if group_size == 0 or group_size < -1:
            raise ValueError(f"{method} quantization_config: group_size {group_size} is not a group size")
        if method == "gptq":
            if bits not in (2, 4, 8):
                raise ValueError(
                    f"gptq quantization_config: {bits}-bit weights are not read (2, 4 and 8 are)"
                )
            fmt = str(q.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise ValueError(
                    f"gptq quantization_config: checkpoint_format {fmt!r} is not read (gptq and gptq_v2 are)"
                )
            if q.get("static_groups"):
                raise ValueError("gptq quantization_config: static_groups is not read")
            return cls("gptq", bits, group_size, bool(q.get("desc_act", False)), 1 if fmt == "gptq" else 0)
        if method == "awq":
            if bits != 4:
                raise ValueError(f"awq quantization_config: {bits}-bit weights are not read (4 is)")
            version = str(q.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(
                    f"awq quantization_config: version {version!r} is not read (AutoAWQ's gemm layout is)"
                )
            if not q.get("zero_point", True):
                raise ValueError("awq quantization_config: zero_point false is not read")
            if group_size == -1:
                raise ValueError("awq quantization_config: group_size -1 is not read")
            return cls("awq", bits, group_size)
        raise ValueError(f"quant_method {method!r} is not a GPTQ or AWQ checkpoint")

    def group_of_rows(self, in_features: int) -> torch.Tensor:
        """g_idx of a checkpoint without act-order: row i is in group i // group_size."""
        size = in_features if self.group_size == -1 else self.group_size
        return torch.arange(in_features, dtype=torch.int32) // size


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's qweight int32 [in / p, out] → int32 [in, out]: value j of a word (bits j*b..) is row p*r + j."""
    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    q = (packed.unsqueeze(1) >> shifts.view(1, pack, 1)) & ((1 << bits) - 1)
    return q.reshape(-1, packed.shape[1])


def unpack_columns(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [rows, cols / p] packed along the columns → int32 [rows, cols]; `order`: which column of
    each word's p each value (in bit order) holds (AWQ's AWQ_ORDER), None: in order."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    q = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, words, p] in bit order
    if order is not None:
        q = q[..., torch.tensor(order).argsort()]  # column c of a word sits at bit position order.index(c)
    return q.reshape(packed.shape[0], -1)


class PackedWeight(nn.Module):
    """One checkpoint tensor's part on this shard: W^T [in, out] as 4-bit values two a byte (other
    widths a byte each), its scales and zero points per group; `forward` dequantizes it to fp32.

    Whatever the checkpoint's packing, the values are kept in one layout, the fastest to expand here:
    byte [r, o] holds rows 2r (low nibble) and 2r + 1 of column o. Act-order rows are kept sorted
    by group (`perm`: the input columns of x to take, in that order), so every group is a run of rows
    whose scale and zero broadcast over it; where the runs are of unequal length (a row-parallel
    shard's slice of an act-order checkpoint) each row's scale and zero are gathered instead.
    """

    values: torch.Tensor  # uint8 [in / 2, out] (4-bit) or [in, out]
    scales: torch.Tensor  # fp32 [groups, out]
    zeros: torch.Tensor  # fp32 [groups, out]: the zero points (v1's offset added)
    g_idx: torch.Tensor  # int64 [in]: each (sorted) row's group; only where the runs are unequal
    perm: torch.Tensor | None  # int64 [in]: x's columns in the rows' order; None: in order

    def __init__(
        self, bits: int, ints: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
    ) -> None:
        """ints: [in, out] the values; zeros, scales: [groups, out]; g_idx: [in] each row's group."""
        super().__init__()
        self.bits = bits
        self.in_features, self.out_features = ints.shape
        used, g_idx = torch.unique(g_idx.long(), return_inverse=True)  # only the groups these rows use
        scales, zeros = scales[used], zeros[used]
        perm = None
        if bool((g_idx[1:] < g_idx[:-1]).any()):
            perm = torch.argsort(g_idx, stable=True)
            ints, g_idx = ints[perm], g_idx[perm]
        self.register_buffer("perm", perm)
        size = int((g_idx == 0).sum())  # the first group's rows: every run but the last has as many
        self.run = size if torch.equal(g_idx, torch.arange(self.in_features) // size) else 0
        if bits == 4 and self.in_features % 2 == 0:
            self.packed = True
            u = ints.to(torch.uint8).view(-1, 2, self.out_features)
            values = u[:, 0] | (u[:, 1] << 4)
        else:
            self.packed = False
            values = ints.to(torch.uint8)
        self.register_buffer("values", values.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("zeros", zeros.float().contiguous())
        self.register_buffer(
            "g_idx", g_idx.contiguous() if not self.run else torch.empty(0, dtype=torch.long)
        )

    def ints(self) -> torch.Tensor:
        """The values, uint8 [in, out] in the kept (sorted) row order."""
        if not self.packed:
            return self.values
        return torch.stack((self.values & 0x0F, self.values >> 4), dim=1).view(-1, self.out_features)

    def forward(self) -> torch.Tensor:
        # -> fp32 W^T [in, out] = (q - z) * s, each row with its group's z and s (rows in the kept order)
        q = self.ints().float()
        if self.run:
            groups = self.scales.shape[0]
            pad = groups * self.run - self.in_features
            if pad:  # the last group is shorter
                q = torch.cat([q, q.new_zeros(pad, self.out_features)])
            w = q.view(groups, self.run, -1).sub_(self.zeros.unsqueeze(1)).mul_(self.scales.unsqueeze(1))
            return w.view(-1, self.out_features)[: self.in_features]
        return q.sub_(self.zeros.index_select(0, self.g_idx)).mul_(self.scales.index_select(0, self.g_idx))


class PackedLinear(nn.Module):
    """x W^T (+ b) with W's parts (a fused linear's q/k/v or gate/up, stacked by output rows) kept packed
    and dequantized at each call."""

    def __init__(self, parts: list[PackedWeight]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)  # registered (moved with .to); `weights`: the same, typed
        self.weights: list[PackedWeight] = list(parts)
        self.out_features = sum(part.out_features for part in parts)
        self.use_triton = False  # set by PackedCheckpoint.install on CUDA; the self-check may unset it
        self.cpu_kernel: FusedOps | None = None  # CPU: the fused ops, set by CausalLM.use_fused_ops
        perms = [part.perm for part in parts]
        # One product for all parts where their rows are in one order (q/k/v and gate/up share x).
        self.shared_order = all(
            (p is None and perms[0] is None)
            or (p is not None and perms[0] is not None and torch.equal(p, perms[0]))
            for p in perms
        )

    def dequantize(self) -> torch.Tensor:
        """fp32 W [out, in], the input columns in the checkpoint's order."""
        rows = []
        for part in self.weights:
            w_t = part()
            if part.perm is not None:
                w_t = torch.empty_like(w_t).index_copy_(0, part.perm, w_t)
            rows.append(w_t.t())
        return torch.cat(rows)

    @property
    def can_use_cpu_kernel(self) -> bool:
        """Every part 4 bits two a byte, its groups runs of rows: what int4_linear multiplies."""
        return all(part.packed and part.run for part in self.weights)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]. On CUDA with Triton the w4a16 kernel
        # (kernels/w4a16_triton.py) unless the startup self-check turned it off; on CPU int4_linear
        # (kernels/cpu_int4.cpp) where the fused ops are on; else forward_torch.
        if self.use_triton and x.is_cuda:
            return self.forward_triton(x, bias)
        if self.cpu_kernel is not None and not x.is_cuda:
            return self.forward_cpu(x, bias)
        return self.forward_torch(x, bias)

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[PackedWeight, torch.Tensor, slice]]]:
        """y [num_tokens, out] to fill, and each part with its input (x's columns in the part's row
        order) and its columns of y; q/k/v or gate/up in one order gather x once."""
        x = x if x.stride(1) == 1 else x.contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        first = self.weights[0].perm
        shared = x if first is None or not self.shared_order else x.index_select(1, first)
        parts, start = [], 0
        for part in self.weights:
            xp = shared if self.shared_order or part.perm is None else x.index_select(1, part.perm)
            parts.append((part, xp, slice(start, start + part.out_features)))
            start += part.out_features
        return y, parts

    def forward_triton(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Each part's integers multiplied in place by the Triton kernel, into its columns of y: the
        weight is never expanded in memory."""
        y, parts = self._parts(x)
        for part, xp, columns in parts:
            w4a16_triton.w4a16_matmul(
                xp,
                part.values,
                part.scales,
                part.zeros,
                None if part.run else part.g_idx,
                part.run,
                part.packed,
                out=y[:, columns],
            )
        return y if bias is None else y + bias

    def forward_cpu(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Each part's 4-bit values multiplied by int4_linear into its columns of y, W^T[i, o] =
        (q - zero) * scale as forward_torch computes it: the weight is expanded 16 columns at a time,
        never whole."""
        assert self.cpu_kernel is not None
        y, parts = self._parts(x)
        for part, xp, columns in parts:
            self.cpu_kernel.int4_linear(
                xp, part.values, part.zeros, part.scales, part.run, True, y[:, columns]
            )
        return y if bias is None else y + bias

    def forward_torch(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The whole weight dequantized to fp32, cast to x's dtype, one matmul (CPU, and the Triton
        kernel's twin). x @ W^T straight from the [in, out] dequantized values: F.linear would take
        their transpose and copy it first."""
        if self.shared_order:
            perm = self.weights[0].perm
            parts = [part() for part in self.weights]
            w_t = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).to(x.dtype)
            y = (x if perm is None else x.index_select(1, perm)) @ w_t
        else:
            y = torch.cat(
                [
                    (x if part.perm is None else x.index_select(1, part.perm)) @ part().to(x.dtype)
                    for part in self.weights
                ],
                dim=1,
            )
        return y if bias is None else y + bias


def _unpacked(config: QuantConfig, tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """A checkpoint tensor's packed parts → ints [in, out], zeros [groups, out] (offset added), fp32
    scales [groups, out], g_idx [in]; their shapes checked against each other."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{what}: qweight and qzeros must be int32, not {qweight.dtype} and {qzeros.dtype}")
    out_features = scales.shape[1]
    if config.method == "awq":
        ints = unpack_columns(qweight, config.bits, AWQ_ORDER)
    else:
        ints = unpack_rows(qweight, config.bits)
    in_features = ints.shape[0]
    if "g_idx" in tensors and config.method == "gptq":
        g_idx = tensors["g_idx"].long()
    else:
        g_idx = config.group_of_rows(in_features).long()
    groups = -(-in_features // (in_features if config.group_size == -1 else config.group_size))
    zeros = unpack_columns(qzeros, config.bits, AWQ_ORDER if config.method == "awq" else None)
    if (
        ints.shape[1] != out_features
        or scales.shape[0] != groups
        or zeros.shape[0] != groups
        or zeros.shape[1] < out_features
        or g_idx.shape != (in_features,)
        or int(g_idx.min()) < 0
        or int(g_idx.max()) >= groups
    ):
        raise ValueError(
            f"{what}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
            f"{tuple(scales.shape)} and g_idx {tuple(g_idx.shape)} do not fit one {config.bits}-bit "
            f"linear in groups of {config.group_size}"
        )
    if not config.desc_act and not torch.equal(g_idx, config.group_of_rows(in_features).long()):
        raise ValueError(f"{what}: g_idx is not in row order but the config says desc_act false")
    return {
        "ints": ints,
        "zeros": zeros[:, :out_features] + config.zero_offset,
        "scales": scales.float(),
        "g_idx": g_idx,
    }


def _rows_of_shard(
    config: QuantConfig, t: dict[str, torch.Tensor], start: int, size: int, what: str
) -> dict[str, torch.Tensor]:
    """A row-parallel shard's input rows [start, start + size) and the groups they use."""
    in_features = t["ints"].shape[0]
    t = {**t, "ints": t["ints"][start : start + size], "g_idx": t["g_idx"][start : start + size]}
    if config.desc_act or size == in_features:  # act-order rows use any group: PackedWeight keeps those used
        return t
    group = in_features if config.group_size == -1 else config.group_size
    end = start + size
    if start % group or (end % group and end != in_features):  # the last group may be shorter
        raise ValueError(
            f"{what}: {size} input rows per shard do not hold whole quantization groups of "
            f"{'all the input rows' if config.group_size == -1 else group}; use fewer shards"
        )
    return t


class PackedCheckpoint:
    """Collects the packed tensors of each linear while the checkpoint streams in (weights.load_weights
    hands them here), then puts a PackedLinear in each linear's place (`install`)."""

    params = PACKED_PARAMS

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.tensors: dict[str, dict[str, dict[str, torch.Tensor]]] = {}

    def add(
        self, module_name: str, module: nn.Module, slice_name: str, param: str, tensor: torch.Tensor
    ) -> None:
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            raise ValueError(
                f"{module_name}: {self.config.method} packs a layer this server keeps in full precision "
                "(only the decoder's attention and MLP linears are read quantized)"
            )
        self.tensors.setdefault(module_name, {}).setdefault(slice_name, {})[param] = tensor

    def describe(self) -> str:
        c = self.config
        order = ", act-order" if c.desc_act else ""
        return f"read packed ({c.bits}-bit, group size {c.group_size}{order}), dequantized at each matmul"

    def install(self, model: nn.Module) -> int:
        """Puts a PackedLinear in place of every collected linear; returns how many."""
        modules = dict(model.named_modules())
        for module_name, by_slice in self.tensors.items():
            module = modules[module_name]
            if isinstance(module, ColumnParallelLinear) and set(by_slice) - set(module.local_sizes):
                raise ValueError(
                    f"{module_name}: fused packed tensors are not read; the checkpoint stores {set(by_slice)}"
                )
            order = list(module.local_sizes) if isinstance(module, ColumnParallelLinear) else list(by_slice)
            if set(order) != set(by_slice):
                raise ValueError(
                    f"{module_name}: {sorted(set(order) - set(by_slice))} stored unquantized beside "
                    f"quantized {sorted(by_slice)}; one fused layer must be quantized whole"
                )
            fused = isinstance(module, ColumnParallelLinear) and len(order) > 1
            module.quant = PackedLinear(
                [
                    self._part(
                        module, f"{module_name}.{name}" if fused else module_name, name, by_slice[name]
                    )
                    for name in order
                ]
            ).to(module.weight.device)
            module.quant.use_triton = module.weight.device.type == "cuda" and w4a16_triton.available()
            placeholder = torch.zeros((), dtype=module.weight.dtype, device=module.weight.device).expand(
                module.weight.shape
            )
            module.weight = nn.Parameter(placeholder, requires_grad=False)
        return len(self.tensors)

    def _part(
        self,
        module: ColumnParallelLinear | RowParallelLinear,
        what: str,
        name: str,
        tensors: dict[str, torch.Tensor],
    ) -> PackedWeight:
        config = self.config
        missing = {"qweight", "qzeros", "scales"} - set(tensors)
        if missing:
            raise ValueError(f"{what}: the checkpoint lacks {', '.join(sorted(missing))}")
        t = _unpacked(config, tensors, what)
        in_features, out_features = t["ints"].shape
        shard = module.shard
        if isinstance(module, ColumnParallelLinear):
            size = module.local_sizes[name]
            if size * shard.world_size != out_features or in_features != module.weight.shape[1]:
                raise ValueError(f"{what}: packed [{in_features}, {out_features}] does not fit the layer")
            cols = slice(
                shard.rank * size, (shard.rank + 1) * size
            )  # groups run along the inputs: any cut works
            t = {
                **t,
                "ints": t["ints"][:, cols],
                "zeros": t["zeros"][:, cols],
                "scales": t["scales"][:, cols],
            }
        else:
            size = module.in_local
            if size * shard.world_size != in_features or out_features != module.weight.shape[0]:
                raise ValueError(f"{what}: packed [{in_features}, {out_features}] does not fit the layer")
            t = _rows_of_shard(config, t, shard.rank * size, size, what)
        return PackedWeight(config.bits, t["ints"], t["zeros"], t["scales"], t["g_idx"])
