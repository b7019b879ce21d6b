"""The startup self-check: each fast path runs a small case against its torch twin before serving.

At warmup on CUDA, Triton or flash-attn attention (with its KV store), Triton SGMV, the Triton
grouped experts of MoE models and the captured decode graphs each compute a small random case next
to their twins (SDPA, the grouped torch LoRA, the torch experts, the same forward run eagerly). A
compile error, a launch failure or a result off by more than the dtype's rounding logs a warning
naming the path and switches that path to its twin, so a kernel that misbehaves on some GPU costs
speed, never a crash or wrong tokens. Info reports the paths in use (`active_paths`) and why any
fast one was dropped. CPU serves the torch paths (Triton's interpreter is for tests), so nothing is
checked there and CPU startup pays nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from loraxpy.kernels.attention import AttentionBackend, select_attention_backend
from loraxpy.worker.gptq import PackedLinear
from loraxpy.worker.moe import SparseMoeBlock
from loraxpy.worker.self_check_cases import (
    Case,
    attention_case,
    decode_graph_case,
    experts_case,
    packed_case,
    sgmv_case,
)

if TYPE_CHECKING:
    from loraxpy.worker.cuda_graphs import DecodeGraphs
    from loraxpy.worker.lora import LoraManager, LoraSlots
    from loraxpy.worker.model import CausalLM

logger = logging.getLogger(__name__)

Outputs = Sequence[torch.Tensor]
# Largest relative L2 error ‖fast − twin‖ / ‖twin‖ that counts as equal: a few times each dtype's
# rounding (both sides round, in different orders). A wrong index or mask costs O(1) instead.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; NaN or inf anywhere gives NaN (which never passes)."""
    got, want = got.double(), want.double()
    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())):
        return float("nan")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def compare(fast: Callable[[], Outputs], twin: Callable[[], Outputs], dtype: torch.dtype) -> str | None:
    """Runs a fast path and its twin on the same inputs: None when every output agrees within
    `TOLERANCE[dtype]`, else why not (the fast path's exception, or the first output that differs)."""
    try:
        got = fast()
        if got and got[0].device.type == "cuda":
            torch.cuda.synchronize(got[0].device)  # launch errors surface here, not at the call
    except Exception as e:  # a compile or launch error of any kind: the twin takes over
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    want = twin()
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            return f"output {i} has shape {tuple(g.shape)} instead of {tuple(w.shape)}"
        error = relative_error(g, w)
        if not error <= tolerance:
            return f"output {i} differs from the twin's: relative error {error:.2e} > {tolerance:.0e}"
    return None


def attention_of(model: CausalLM) -> AttentionBackend:
    """The attention backend every layer uses (chosen once, so the first layer's is everyone's)."""
    return model.layers[0].self_attn.attention  # type: ignore[index, union-attr, return-value]


def use_attention(model: CausalLM, backend: AttentionBackend) -> None:
    for layer in model.layers:
        layer.self_attn.attention = backend  # type: ignore[union-attr]
        if backend.name != "sdpa":  # the fused CPU attention stands in for SDPA only
            layer.self_attn.fused = None  # type: ignore[union-attr]


def active_paths(
    attention: str,
    lora: LoraManager | None,
    graphs: DecodeGraphs | None,
    cpu_ops: str = "",
    experts: str = "",
) -> dict[str, str]:
    """What runs each fast path now: attention (flash-attn | vllm-flash-attn | triton | sdpa), lora
    (triton | torch | none), decode (cuda-graphs | graph-twin, the padded eager forward on CPU |
    eager), on CPU cpu_ops (fused: kernels/cpu_fused.cpp | torch), and in MoE models experts
    (triton | torch)."""
    decode = "eager" if graphs is None else "cuda-graphs" if graphs.is_captured else "graph-twin"
    paths = {"attention": attention, "lora": lora.backend if lora is not None else "none", "decode": decode}
    if cpu_ops:
        paths["cpu_ops"] = cpu_ops
    if experts:
        paths["experts"] = experts
    return paths


def experts_path(model: nn.Module) -> str:
    """What runs the MoE layers' experts: triton (kernels/moe_triton.py) or torch; "" without any."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if not blocks:
        return ""
    return "triton" if all(b.experts.use_triton for b in blocks) else "torch"


def packed_path(model: nn.Module) -> dict[str, str]:
    """What multiplies a GPTQ / AWQ model's packed linears: {"w4a16": triton (kernels/w4a16_triton.py),
    cpu (kernels/cpu_int4.cpp) or torch (dequantize, then matmul)}; {} for other models."""
    linears = [q for m in model.modules() if isinstance(q := getattr(m, "quant", None), PackedLinear)]
    if not linears:
        return {}
    if all(linear.use_triton for linear in linears):
        return {"w4a16": "triton"}
    return {"w4a16": "cpu" if all(linear.cpu_kernel is not None for linear in linears) else "torch"}


def packed_linears(model: nn.Module) -> list[tuple[PackedLinear, torch.dtype, str]]:
    """The GPTQ / AWQ linears set to the Triton w4a16 kernel: each with its layer's dtype and the
    decoder layer it belongs to (its module name up to the layer index)."""
    found = []
    for name, module in model.named_modules():
        quant = getattr(module, "quant", None)
        if isinstance(quant, PackedLinear) and quant.use_triton:
            layer = ".".join(name.split(".")[:2])
            found.append((quant, module.weight.dtype, layer))
    return found


@dataclass
class SelfCheck:
    """Runs the checks at warmup and remembers what fell back: path → why."""

    is_enabled: bool
    failures: dict[str, str] = field(default_factory=dict)
    is_kernels_checked: bool = False

    @classmethod
    def for_device(cls, device: torch.device) -> SelfCheck:
        return cls(is_enabled=device.type == "cuda")

    def check_kernels(self, model: CausalLM, lora: LoraManager | None, block_size: int) -> None:
        """Triton attention, SGMV and grouped experts against their twins, once per process; a
        failing one is replaced by its twin in the model (attention, experts) or the LoRA manager."""
        if not self.is_enabled or self.is_kernels_checked:
            return
        self.is_kernels_checked = True
        chosen = fast = attention_of(model)
        twin = select_attention_backend(torch.device("cpu"), "sdpa")
        # The fp8 cache's SDPA path has no other twin. A failing fast path hands over to its
        # fallback (auto's flash → Triton), which is checked in turn, and SDPA ends the chain.
        while fast.name not in ("sdpa", "sdpa-fp8"):
            failure = _first_failure(
                attention_case(model, fast, twin, block_size, window) for window in _windows(model)
            )
            if failure is None:
                break
            following = fast.fallback or twin
            self._fall_back("attention", fast.name, following.name, failure)
            fast = following
        if fast is not chosen:
            use_attention(model, fast)
        if lora is not None and lora.backend == "triton":
            failure = _first_failure(sgmv_case(slots) for slots in _first_layer_slots(lora))
            if failure is not None:
                self._fall_back("lora", "triton", "torch", failure)
                lora.backend = "torch"
        moe_blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock) and m.experts.use_triton]
        if moe_blocks:
            failure = _first_failure([experts_case(moe_blocks[0])])
            if failure is not None:
                self._fall_back("experts", "triton", "torch", failure)
                for block in moe_blocks:
                    block.experts.use_triton = False
        packed = packed_linears(model)
        if packed:  # GPTQ / AWQ: the first layer's linears (every kernel variant a model launches)
            first = [(linear, dtype) for linear, dtype, layer in packed if layer == packed[0][2]]
            failure = _first_failure(packed_case(linear, dtype) for linear, dtype in first)
            if failure is not None:
                self._fall_back("w4a16", "triton", "torch", failure)
                for linear, _, _ in packed:
                    linear.use_triton = False

    def check_graphs(
        self,
        graphs: DecodeGraphs | None,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        vocab_size: int,
    ) -> DecodeGraphs | None:
        """A captured decode step against the same step run eagerly; None (decode eagerly) if it differs."""
        if not self.is_enabled or graphs is None or not graphs.is_captured:
            return graphs
        failure = _first_failure([decode_graph_case(graphs, kv_caches, block_size, vocab_size)])
        if failure is None:
            return graphs
        self._fall_back("decode", "cuda-graphs", "eager", failure)
        return None

    def _fall_back(self, path: str, fast: str, twin: str, failure: str) -> None:
        # Two fast paths of one kind failing (flash, then Triton attention) are both reported.
        earlier = self.failures.get(path)
        self.failures[path] = failure if earlier is None else f"{earlier}; {fast}: {failure}"
        logger.warning(
            "self-check: the %s %s path failed against its twin (%s); using %s instead",
            fast,
            path,
            failure,
            twin,
        )


def _windows(model: CausalLM) -> list[int | None]:
    """Each distinct sliding window of the model's layers (None: full attention), checked once each."""
    windows = {layer.self_attn.sliding_window for layer in model.layers}  # type: ignore[union-attr]
    return sorted(windows, key=lambda w: -1 if w is None else w)


def _first_layer_slots(lora: LoraManager) -> list[LoraSlots]:
    """One LoraSlots per fused layer kind (qkv, o, gate/up, down) of layer 0: every SGMV shape."""
    seen: dict[int, LoraSlots] = {}
    for (layer, _), slots in lora.slots.items():
        if layer == 0:
            seen.setdefault(id(slots), slots)
    return list(seen.values())


def _first_failure(cases: Iterable[Case]) -> str | None:
    for fast, twin, dtype in cases:
        failure = compare(fast, twin, dtype)
        if failure is not None:
            return failure
    return None
