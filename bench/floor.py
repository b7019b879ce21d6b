"""The matmul floor of a decode step: the model's linear layers alone, at the step's batch size.

A decode step of B rows multiplies a [B, in] activation by every projection of every decoder layer
(q, k, v, o, gate, up, down, as separate tensors, the way the checkpoint stores them) and by the LM
head. Attention over the cache, norms, sampling and all Python around them are extra, so no engine
of these weights decodes faster than B / (time of those matmuls) on the same threads. Random
weights of the model's shapes time the same as the real ones (fp32 matmul speed does not depend on
the values, and their non-denormal normal draws avoid slow paths).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraxpy.bench.shapes import ModelShape
from loraxpy.worker.prepacked import PrepackedLinear


@dataclass(frozen=True)
class FloorResult:
    batch_size: int
    step_ms: float  # the fastest timed repeat: a floor is what the matmuls can do, not a typical step
    step_ms_median: float
    tokens_per_s: float  # batch_size / step_ms
    num_linears: int
    weight_bytes: int


def linear_shapes(shape: ModelShape) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear a decode step runs, in order: layers, then LM head."""
    per_layer = [(fan_out, fan_in) for fan_in, fan_out in shape.module_shapes().values()]
    return per_layer * shape.num_layers + [(shape.vocab_size, shape.hidden_size)]


class MatmulFloor:
    """The model's linear weights, allocated once, timed at any batch size.

    `packed`: the weights in oneDNN's layout, multiplied as a CPU worker multiplies them by default
    (worker/prepacked.py); the plain floor is issue 10's definition (F.linear on the stored weights).
    """

    def __init__(
        self, shape: ModelShape, dtype: torch.dtype = torch.float32, seed: int = 0, *, packed: bool = False
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        # Separate tensors, so each matmul streams its own weight from memory as the model's would.
        self.weights = [
            torch.randn(out_f, in_f, generator=gen, dtype=dtype) * 0.02
            for out_f, in_f in linear_shapes(shape)
        ]
        self.packed = [PrepackedLinear(w) for w in self.weights] if packed else None
        self.dtype = dtype

    @property
    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)

    def _step(self, inputs: dict[int, torch.Tensor]) -> None:
        if self.packed is not None:
            for w, linear in zip(self.weights, self.packed, strict=True):
                linear(inputs[w.shape[1]], None)
            return
        for w in self.weights:
            F.linear(inputs[w.shape[1]], w)

    def measure(self, batch_size: int, repeats: int = 10) -> FloorResult:
        # x: [batch_size, in_features], one per distinct input width (hidden, intermediate)
        inputs = {w.shape[1]: torch.randn(batch_size, w.shape[1], dtype=self.dtype) for w in self.weights}
        times = []
        with torch.inference_mode():
            self._step(inputs)  # first touch: page faults and oneDNN/MKL kernel selection
            for _ in range(repeats):
                start = time.perf_counter()
                self._step(inputs)
                times.append(time.perf_counter() - start)
        best, median = min(times), statistics.median(times)
        return FloorResult(
            batch_size, best * 1e3, median * 1e3, batch_size / best, len(self.weights), self.weight_bytes
        )
