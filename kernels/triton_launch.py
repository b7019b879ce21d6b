"""What the host decides for one Triton kernel launch, shared by the runtime and the AOT checks.

Each Triton kernel module builds a `Launch` from its tensors in one function (grid, strides, block
sizes, constexprs); the runtime runs it, and `kernels/triton_aot.py` compiles the same `Launch`
for GPUs this machine lacks, so the checks see exactly the specialisations that would run.
No triton import here: a `Launch` only names the kernel's plain Python function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Launch:
    """One launch: `jit_kernels()[kernel.__name__][grid](*args, **constexprs, **options)`."""

    kernel: Callable[..., Any]  # the undecorated kernel function, named as in its module's jit_kernels()
    grid: tuple[int, ...]
    args: tuple[Any, ...]  # runtime arguments in the kernel's order: tensors, ints, floats
    constexprs: Mapping[str, Any]
    options: Mapping[str, int] = field(
        default_factory=dict
    )  # num_warps, num_stages when not Triton's default

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def run(self, jit_kernels: Mapping[str, Any]) -> None:
        """Launches this on the current device, with the module's JIT-decorated kernels."""
        jit_kernels[self.name][self.grid](*self.args, **self.constexprs, **self.options)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 stays fp32 on tensor cores (tl.dot would round it to tf32), so
    fp32 matches PEFT exactly. Shared by the project's Triton kernels (LoRA, MoE, w4a16)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def cdiv(n: int, d: int) -> int:
    return -(-n // d)
