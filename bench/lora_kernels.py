"""`python -m loraxpy.bench.lora_kernels`: the LoRA kernels alone, timed against the copy bandwidth.

For each fused adapted layer of a shape (q/k/v, o, gate/up, down), B rows spread round robin over
N distinct rank-R adapters (the engine's uniform workload: segments of one row each), one step's
LoRA delta (shrink then expand-add) is timed. The bytes it must move are each distinct adapter's
A and B once plus x, v and y; bytes / time over the measured device-to-device copy bandwidth is
the efficiency (issue 17's target: at least 0.75 with 32 or more distinct adapters). Weight sets
rotate so their total outruns the L2 cache, which would otherwise be measured instead of memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loraxpy.bench.bounds import measure_copy_bandwidth
from loraxpy.bench.shapes import SHAPES, ModelShape
from loraxpy.kernels.lora import LoraPlan, lora_add

ROTATE_BYTES = 256 << 20  # weight sets cycled per shape: several times an H100/H200 L2 (50 MB)
MAX_SETS = 16


@dataclass(frozen=True)
class LayerShape:
    name: str
    in_features: int
    out_sizes: tuple[int, ...]  # the fused slices' outputs, side by side in y


def layer_shapes(shape: ModelShape) -> list[LayerShape]:
    m = shape.module_shapes()
    return [
        LayerShape("qkv", shape.hidden_size, (m["q_proj"][1], m["k_proj"][1], m["v_proj"][1])),
        LayerShape("o", m["o_proj"][0], (shape.hidden_size,)),
        LayerShape("gate_up", shape.hidden_size, (shape.intermediate_size,) * 2),
        LayerShape("down", shape.intermediate_size, (shape.hidden_size,)),
    ]


@dataclass(frozen=True)
class KernelRun:
    shape: str
    layer: str
    backend: str
    batch_size: int
    num_adapters: int
    rank: int
    microseconds: float  # median of one shrink + expand-add
    bytes: int
    gb_per_s: float
    efficiency: float  # of the copy bandwidth


def step_bytes(layer: LayerShape, batch: int, num_adapters: int, rank: int, element: int) -> int:
    """Distinct adapters' A and B once, x read, v written and read, y read and written."""
    slices, out = len(layer.out_sizes), sum(layer.out_sizes)
    adapters = min(num_adapters, batch) * rank * (slices * layer.in_features + out)
    return element * (adapters + batch * layer.in_features + 2 * batch * slices * rank + 2 * batch * out)


def _weight_sets(
    layer: LayerShape, num_adapters: int, rank: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    slices, out = len(layer.out_sizes), sum(layer.out_sizes)
    per_set = (num_adapters + 1) * rank * (slices * layer.in_features + out) * dtype.itemsize
    count = max(1, min(MAX_SETS, ROTATE_BYTES // max(1, per_set)))
    sets = []
    for _ in range(count):
        a = (
            torch.randn(num_adapters + 1, slices * rank, layer.in_features, device=device)
            / layer.in_features**0.5
        )
        b = torch.randn(num_adapters + 1, out, rank, device=device) / rank**0.5
        a[0], b[0] = 0, 0  # slot 0: the base model
        sets.append((a.to(dtype), b.to(dtype)))
    return sets


def _delta_fn(
    layer: LayerShape, backend: str, rows: list[int], ranks: dict[int, int], rank: int, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """y += LoRA delta of x through (a, b): the Triton SGMV or the grouped torch path."""
    offsets = [sum(layer.out_sizes[:i]) for i in range(len(layer.out_sizes))]
    if backend == "triton":
        from loraxpy.kernels.lora_triton import Segments, SliceLayout, sgmv_expand_add, sgmv_shrink

        segments = Segments.build(rows, ranks, device)
        layout = SliceLayout.build(list(layer.out_sizes), offsets, device)

        def triton_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> None:
            sgmv_expand_add(sgmv_shrink(x, a, segments, len(layer.out_sizes)), b, segments, y, layout)

        return triton_delta
    plan = LoraPlan.build(rows, ranks, rank, device)
    assert plan is not None

    def torch_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> None:
        weights, b_start = [], 0
        for i, (size, offset) in enumerate(zip(layer.out_sizes, offsets, strict=True)):
            weights.append((a[:, i * rank : (i + 1) * rank], b[:, b_start : b_start + size], offset))
            b_start += size
        lora_add(x, y, weights, plan)

    return torch_delta


def _median_seconds(run: Callable[[int], None], device: torch.device, repeats: int) -> float:
    """Median time of `run(i)`; CUDA events on a GPU (no host sync inside the timed region)."""
    for i in range(3):  # warm up: compiles, allocator, caches
        run(i)
    times = []
    for i in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            run(i)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def time_layer(
    shape: ModelShape,
    layer: LayerShape,
    *,
    backend: str,
    batch: int,
    num_adapters: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    bandwidth: float,
    repeats: int,
) -> KernelRun:
    rows = [i % num_adapters + 1 for i in range(batch)]
    ranks = dict.fromkeys(range(1, num_adapters + 1), rank)
    sets = _weight_sets(layer, num_adapters, rank, dtype, device)
    x = torch.randn(batch, layer.in_features, device=device).to(dtype)
    y = torch.randn(batch, sum(layer.out_sizes), device=device).to(dtype)
    delta = _delta_fn(layer, backend, rows, ranks, rank, device)
    seconds = _median_seconds(lambda i: delta(x, *sets[i % len(sets)], y), device, repeats)
    moved = step_bytes(layer, batch, num_adapters, rank, dtype.itemsize)
    return KernelRun(
        shape.name, layer.name, backend, batch, num_adapters, rank,
        seconds * 1e6, moved, moved / seconds / 1e9, moved / seconds / bandwidth,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loraxpy.bench.lora_kernels", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shapes", default="8b,1b")
    p.add_argument("--batch-sizes", default="32,128")
    p.add_argument("--adapter-counts", default="32,128")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--backends", default="triton,torch", help="triton (SGMV, CUDA) and/or torch")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    bandwidth = measure_copy_bandwidth(device)
    runs: list[KernelRun] = []

    def save() -> None:  # after every run, whole: a run stopped at a deadline keeps what it timed
        doc = {
            "device": str(device),
            "dtype": args.dtype,
            "copy_bandwidth_gb_per_s": bandwidth / 1e9,
            "runs": [asdict(r) for r in runs],
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        partial = args.output.with_name(args.output.name + ".partial")
        partial.write_text(json.dumps(doc, indent=1))
        partial.replace(args.output)

    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        for backend in args.backends.split(","):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                for n in (int(c) for c in args.adapter_counts.split(",")):
                    for layer in layer_shapes(shape):
                        run = time_layer(
                            shape, layer, backend=backend, batch=batch, num_adapters=n, rank=args.rank,
                            dtype=dtype, device=device, bandwidth=bandwidth, repeats=args.repeats,
                        )  # fmt: skip
                        runs.append(run)
                        save()
                        print(
                            f"{run.shape:>5} {run.layer:>8} {run.backend:>6} B={run.batch_size:<4} "
                            f"N={run.num_adapters:<4} {run.microseconds:9.1f} us {run.gb_per_s:8.1f} GB/s "
                            f"{run.efficiency:6.1%} of copy",
                            flush=True,
                        )
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
