"""The benchmark's outputs: a table on stdout, a JSON document, and a PNG of throughput vs adapters."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loraxpy.bench.engine import RunResult


@dataclass
class BaselineComparison:
    shape: str
    num_adapters: int
    batch_size: int
    prompt_len: int
    new_tokens: int
    hf_seconds: float
    hf_tokens_per_s: float
    engine_tokens_per_s: float  # end to end over the same prompts, adapters and token count
    speedup: float
    rows_equal: int  # rows whose greedy tokens equal PEFT's (all of them in fp32)
    rows: int


def machine_info(device: torch.device, dtype: torch.dtype, bandwidth: float) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
    }


def write_json(
    path: Path,
    machine: dict[str, Any],
    config: dict[str, Any],
    runs: list[RunResult],
    baselines: list[BaselineComparison],
) -> None:
    def run_dict(r: RunResult) -> dict[str, Any]:
        d = asdict(r)
        del d["all_tokens"]
        return d

    doc = {
        "machine": machine,
        "config": config,
        "runs": [run_dict(r) for r in runs],
        "baseline": [asdict(b) for b in baselines],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # replaced whole: a reader never sees half a file
    partial.write_text(json.dumps(doc, indent=1))
    partial.replace(path)


def format_table(runs: list[RunResult], baselines: list[BaselineComparison]) -> str:
    head = (
        f"{'shape':>5} {'batch':>5} {'ctx':>5} {'workload':>11} {'dist':>4} | {'step ms':>8} {'bound ms':>8} "
        f"{'eff':>6} {'tok/s':>9} | {'prefill tok/s':>13} {'eff':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r.shape:>5} {r.batch_size:>5} {r.context_len:>5} {r.workload:>11} {r.distinct_adapters:>4} | "
            f"{r.decode_step_ms:8.3f} {r.decode_bound_ms:8.3f} {r.decode_efficiency:6.1%} "
            f"{r.decode_tokens_per_s:9.1f} | {r.prefill_tokens_per_s:13.1f} {r.prefill_efficiency:6.1%}"
        )
    if baselines:
        lines += [
            "",
            "HF transformers + PEFT baseline (end-to-end generated tokens/s, same prompts and adapters)",
        ]
        lines.append(
            f"{'shape':>5} {'batch':>5} {'prompt':>6} {'new':>4} {'adapters':>8} | {'HF tok/s':>9} "
            f"{'engine tok/s':>12} {'speed-up':>8} | tokens equal"
        )
        for b in baselines:
            lines.append(
                f"{b.shape:>5} {b.batch_size:>5} {b.prompt_len:>6} {b.new_tokens:>4} {b.num_adapters:>8} | "
                f"{b.hf_tokens_per_s:9.1f} {b.engine_tokens_per_s:12.1f} {b.speedup:7.2f}x | "
                f"{b.rows_equal}/{b.rows} rows"
            )
    return "\n".join(lines)


def plot_throughput(path: Path, runs: list[RunResult]) -> None:
    """One panel per shape: decode tokens/s against distinct adapters loaded, per batch and context.

    Solid lines are uniform, dashed Zipf, dotted the byte bound; the base model is a thin horizontal line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r.shape for r in runs})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        mine = [r for r in runs if r.shape == shape]
        series = sorted({(r.batch_size, r.context_len) for r in mine})
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, (b, ctx) in enumerate(series):
            color = colors[k % len(colors)]
            for kind, style in (("uniform", "-"), ("zipf", "--")):
                points = sorted(
                    (r.num_adapters, r.decode_tokens_per_s, r.decode_bound_tokens_per_s)
                    for r in mine
                    if (r.batch_size, r.context_len, r.kind) == (b, ctx, kind)
                )
                if not points:
                    continue
                xs = [p[0] for p in points]
                ax.plot(
                    xs,
                    [p[1] for p in points],
                    style,
                    marker="o",
                    color=color,
                    label=f"B={b} ctx={ctx} {kind}",
                )
                if kind == "uniform":
                    ax.plot(xs, [p[2] for p in points], ":", color=color, alpha=0.6)
            for r in mine:
                if (r.batch_size, r.context_len, r.kind) == (b, ctx, "base"):
                    ax.axhline(r.decode_tokens_per_s, color=color, linewidth=0.8, alpha=0.5)
        ax.set_xscale("log", base=2)
        counts = sorted({r.num_adapters for r in mine if r.kind in ("uniform", "zipf")})
        if counts:
            ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_yscale("log")
        ax.set_xlabel("distinct adapters (N)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{shape}: solid uniform, dashed Zipf, dotted byte bound, line = base")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
