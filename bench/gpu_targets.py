"""`python -m loraxpy.bench.gpu_targets`: issue 17's GPU targets, met or not, from one run's numbers.

Reads the `lorax-bench` JSON of each shape and the LoRA kernel JSON (`bench/lora_kernels.py`) and
reports each target with its measured value and threshold: met, not met, or not measured (its
runs are missing, e.g. a stage ran out of time). Efficiencies are bound / measured time, the byte
bound being the bytes a step must read (weights, K/V, each distinct adapter once) over the copy
bandwidth measured at the start of the same run. Plain JSON in, plain JSON out: no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# shape → (one adapter / no adapter throughput) threshold
SINGLE_ADAPTER_RATIO = {"8b": 0.95, "1b": 0.90}


@dataclass(frozen=True)
class Grid:
    """Where each target is read: the batch sizes, context and adapter counts of the run's grid."""

    decode_batch: int = 1
    big_batch: int = 128
    big_context: int = 1024
    many_adapters: int = 128
    kernel_adapters: int = 32
    peft_adapters: int = 32
    decode_shapes: tuple[str, ...] = ("8b",)  # the batch-1 target is set for 8b
    kernel_backend: str = "triton"


@dataclass(frozen=True)
class Target:
    name: str
    shape: str
    threshold: float
    measured: float | None  # None: not measured in this run
    detail: str

    @property
    def status(self) -> str:
        if self.measured is None:
            return "not measured"
        return "met" if self.measured >= self.threshold else "not met"


def _runs(bench: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in bench.get("runs", []) if all(r.get(k) == v for k, v in match.items())]


def _worst(values: list[float]) -> float | None:
    return min(values) if values else None


def shape_targets(shape: str, bench: dict[str, Any], grid: Grid) -> list[Target]:
    """The decode targets of one shape."""
    out = []
    if shape in grid.decode_shapes:
        runs = _runs(bench, shape=shape, batch_size=grid.decode_batch, kind="base")
        out.append(Target(
            f"decode at batch {grid.decode_batch}, no adapter: share of the byte bound", shape, 0.80,
            _worst([r["decode_efficiency"] for r in runs]), "worst over contexts " + _ctxs(runs),
        ))  # fmt: skip
    runs = _runs(bench, shape=shape, batch_size=grid.big_batch, context_len=grid.big_context, kind="base")
    out.append(Target(
        f"batch {grid.big_batch}, context {grid.big_context}, no adapter: share of the byte bound", shape,
        0.70, _worst([r["decode_efficiency"] for r in runs]), "",
    ))  # fmt: skip
    ratios, where = [], []
    for single in _runs(bench, shape=shape, kind="single"):
        base = _runs(
            bench,
            shape=shape,
            kind="base",
            batch_size=single["batch_size"],
            context_len=single["context_len"],
        )
        if base:
            ratios.append(single["decode_tokens_per_s"] / base[0]["decode_tokens_per_s"])
            where.append(f"B={single['batch_size']} ctx={single['context_len']}: {ratios[-1]:.3f}")
    out.append(Target(
        "one adapter for the whole batch / no adapter, decode tokens/s", shape,
        SINGLE_ADAPTER_RATIO.get(shape, 0.90), _worst(ratios), "; ".join(where),
    ))  # fmt: skip
    runs = _runs(
        bench, shape=shape, batch_size=grid.big_batch, num_adapters=grid.many_adapters, kind="uniform"
    )
    out.append(Target(
        f"{grid.many_adapters} distinct adapters at batch {grid.big_batch}: share of the adapter-inclusive byte bound",
        shape, 0.70, _worst([r["decode_efficiency"] for r in runs]), "worst over contexts " + _ctxs(runs),
    ))  # fmt: skip
    peft = [
        b
        for b in bench.get("baseline", [])
        if b["shape"] == shape and b["num_adapters"] == grid.peft_adapters
    ]
    out.append(Target(
        f"speed-up over HF + PEFT at its configuration ({grid.peft_adapters} distinct adapters)", shape, 150.0,
        _worst([b["speedup"] for b in peft]),
        "; ".join(f"B={b['batch_size']} new={b['new_tokens']}: HF {b['hf_tokens_per_s']:.1f} tok/s, "
                  f"engine {b['engine_tokens_per_s']:.1f} tok/s" for b in peft),
    ))  # fmt: skip
    return out


def _ctxs(runs: list[dict[str, Any]]) -> str:
    return ", ".join(str(r["context_len"]) for r in runs)


def kernel_target(kernels: dict[str, Any], grid: Grid) -> Target:
    """SGMV with >= `kernel_adapters` distinct adapters: bytes over time per (shape, batch, N), all layers."""
    totals: dict[tuple[str, int, int], list[float]] = {}
    for r in kernels.get("runs", []):
        if (
            r["backend"] == grid.kernel_backend
            and min(r["num_adapters"], r["batch_size"]) >= grid.kernel_adapters
        ):
            t = totals.setdefault((r["shape"], r["batch_size"], r["num_adapters"]), [0.0, 0.0])
            t[0] += r["bytes"]
            t[1] += r["microseconds"] / 1e6
    bandwidth = kernels.get("copy_bandwidth_gb_per_s", 0.0) * 1e9
    shares = {k: b / s / bandwidth for k, (b, s) in totals.items() if s > 0 and bandwidth > 0}
    detail = "; ".join(f"{s} B={b} N={n}: {v:.1%}" for (s, b, n), v in sorted(shares.items()))
    return Target(
        f"LoRA kernels with >= {grid.kernel_adapters} distinct adapters: share of the copy bandwidth",
        ",".join(sorted({s for s, _, _ in shares})), 0.75, _worst(list(shares.values())), detail,
    )  # fmt: skip


def evaluate(benches: dict[str, dict[str, Any]], kernels: dict[str, Any] | None, grid: Grid) -> list[Target]:
    targets = [t for shape, bench in sorted(benches.items()) for t in shape_targets(shape, bench, grid)]
    return [*targets, kernel_target(kernels or {}, grid)]


def format_table(targets: list[Target]) -> str:
    lines = [f"{'status':>12} | {'shape':>6} | {'measured':>9} | {'needs':>7} | target"]
    for t in targets:
        measured = "-" if t.measured is None else f"{t.measured:9.3f}"
        lines.append(f"{t.status:>12} | {t.shape:>6} | {measured:>9} | {t.threshold:7.2f} | {t.name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loraxpy.bench.gpu_targets", description=__doc__)
    p.add_argument("--bench", type=Path, nargs="*", default=[], help="lorax-bench JSON files (one per shape)")
    p.add_argument("--kernels", type=Path, help="bench/lora_kernels.py JSON")
    p.add_argument("--output", type=Path, required=True, help="the targets as JSON")
    for name, default in asdict(Grid()).items():
        if isinstance(default, int):
            p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--decode-shapes", default="8b", help="shapes with the batch-1 decode target")
    p.add_argument("--kernel-backend", default="triton", help="the LoRA kernels the kernel target reads")
    args = p.parse_args(argv)
    fields = {k: getattr(args, k) for k in asdict(Grid())}
    grid = Grid(**{**fields, "decode_shapes": tuple(args.decode_shapes.split(","))})
    benches = {}
    for path in args.bench:
        if path.exists():
            doc = json.loads(path.read_text())
            for shape in {r["shape"] for r in doc.get("runs", [])}:
                benches[shape] = doc
    kernels = json.loads(args.kernels.read_text()) if args.kernels and args.kernels.exists() else None
    targets = evaluate(benches, kernels, grid)
    print(format_table(targets))
    doc = [{**asdict(t), "status": t.status} for t in targets]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
