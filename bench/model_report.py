"""`lorax-bench model`'s outputs: one row per (batch, workload) with every path and ratio, the
issue's targets marked met or not, the machine, a table on stdout, JSON and a PNG.

Measures compared: end-to-end tokens/s (all generated tokens / wall time, prefill included) for the
engine, the server and HF; the engine's decode tokens/s (batch / median decode step) against the
matmul floor, which is itself a decode step's matmuls.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from loraxpy.bench.model_suite import ModelBenchConfig, ModelBenchResult, PathRun, row_adapters
from loraxpy.bench.workloads import Workload

BASE, SINGLE = "base", "single"
SERVED_PATHS = ("engine", "server", "hf")  # the paths that generate tokens


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _equal_rows(a: PathRun | None, b: PathRun | None) -> int | None:
    if a is None or b is None:
        return None
    return sum(x == y for x, y in zip(a.tokens, b.tokens, strict=True))


def cpu_machine(copy_bandwidth: float) -> dict[str, Any]:
    """CPU model, cores, SIMD features and memory, from /proc where Linux has it."""
    info: dict[str, str] = {}
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    mem_kib = 0
    if Path("/proc/meminfo").exists():
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])  # MemTotal is the first line
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
        "memory_gib": round(mem_kib / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "copy_bandwidth_gb_per_s": copy_bandwidth / 1e9,
    }


def comparison_rows(result: ModelBenchResult) -> list[dict[str, Any]]:
    """One row per (batch size, workload): every path's tokens/s, the ratios, and agreeing rows."""
    return [_row(result, b, w) for b in result.config.batch_sizes for w in result.config.workloads()]


def _row(result: ModelBenchResult, b: int, w: Workload) -> dict[str, Any]:
    runs = {p: result.runs.get((p, b, w.name)) for p in SERVED_PATHS}
    base_runs = {p: result.runs.get((p, b, BASE)) for p in SERVED_PATHS}
    tps = {p: r.tokens_per_s if r else None for p, r in runs.items()}
    base = {p: r.tokens_per_s if r else None for p, r in base_runs.items()}
    engine, server, hf = runs["engine"], runs["server"], runs["hf"]
    floor = result.floors.get(b)
    floor_tps = floor.tokens_per_s if floor else None
    packed = result.packed_floors.get(b)
    packed_tps = packed.tokens_per_s if packed else None
    decode = engine.decode_tokens_per_s if engine else None
    return {
        "batch_size": b,
        "workload": w.name,
        "num_adapters": w.num_adapters,
        "distinct_adapters": len({a for a in row_adapters(w, b) if a}),
        "floor_tokens_per_s": floor_tps,
        "floor_step_ms": floor.step_ms if floor else None,
        "engine_tokens_per_s": tps["engine"],
        "engine_decode_tokens_per_s": decode,
        "server_tokens_per_s": tps["server"],
        "hf_tokens_per_s": tps["hf"],
        "engine_decode_vs_floor": _ratio(decode, floor_tps),
        "packed_floor_tokens_per_s": packed_tps,
        "engine_decode_vs_packed_floor": _ratio(decode, packed_tps),
        # the target's floor: the faster of the two layouts at this batch (the engine picks per step size)
        "engine_decode_vs_best_floor": _ratio(
            decode, max((t for t in (floor_tps, packed_tps) if t), default=None)
        ),
        "engine_vs_hf": _ratio(tps["engine"], tps["hf"]),
        "server_vs_hf": _ratio(tps["server"], tps["hf"]),
        "server_vs_engine": _ratio(tps["server"], tps["engine"]),
        **{f"{p}_vs_base": _ratio(tps[p], base[p]) for p in SERVED_PATHS},
        "rows": b,
        "engine_rows_equal_hf": _equal_rows(engine, hf),
        "server_rows_equal_engine": _equal_rows(server, engine),
        "server_rows_equal_hf": _equal_rows(server, hf),
        "row0": {
            "prompt": list(result.prompts[0].token_ids),
            **{p: r.tokens[0] for p, r in runs.items() if r},
        },
        "engine": engine.extra if engine else None,
        "server": server.extra if server else None,
    }


def _target(
    name: str, row: dict[str, Any] | None, path: str, ratio_key: str, threshold: float
) -> dict[str, Any] | None:
    if row is None:
        return None
    ratio = row[ratio_key]
    return {
        "target": name,
        "batch_size": row["batch_size"],
        "workload": row["workload"],
        "path": path,
        "ratio": ratio,
        "threshold": threshold,
        "met": None if ratio is None else ratio >= threshold,
    }


def evaluate_targets(rows: list[dict[str, Any]], config: ModelBenchConfig) -> list[dict[str, Any]]:
    """Issue 10's targets at each target batch size: None where a path was not run."""
    many = f"uniform-{max(config.adapter_counts)}" if config.adapter_counts else None
    found: list[dict[str, Any] | None] = []
    for b in (b for b in config.target_batch_sizes if b in config.batch_sizes):
        by_name = {r["workload"]: r for r in rows if r["batch_size"] == b}
        base, single, heavy = by_name[BASE], by_name[SINGLE], by_name.get(many or "")
        found.append(
            _target(
                "base >= 0.8x matmul floor (decode; the faster of plain and packed)",
                base,
                "engine",
                "engine_decode_vs_best_floor",
                0.8,
            )
        )
        for path in ("engine", "server"):
            found.append(_target("base >= 1.3x HF generate", base, path, f"{path}_vs_hf", 1.3))
            found.append(_target(f"{many} >= 0.7x own base", heavy, path, f"{path}_vs_base", 0.7))
            found.append(_target(f"{many} >= 4x HF + PEFT", heavy, path, f"{path}_vs_hf", 4.0))
            found.append(_target("single >= 0.95x base", single, path, f"{path}_vs_base", 0.95))
        for row in by_name.values():
            found.append(_target("server >= 0.95x engine", row, "server", "server_vs_engine", 0.95))
    return [t for t in found if t is not None]


def _cell(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(rows: list[dict[str, Any]], targets: list[dict[str, Any]], config: ModelBenchConfig) -> str:
    head = (
        f"{'B':>3} {'workload':>11} | {'floor':>7} {'engine':>7} {'decode':>7} {'server':>7} {'HF':>7} | "
        f"{'dec/flr':>7} {'dec/pk':>6} {'eng/HF':>6} {'srv/HF':>6} {'srv/eng':>7} | {'eng/base':>8} {'srv/base':>8} "
        f"{'HF/base':>7} | equal rows eng=HF srv=eng"
    )
    lines = [
        f"tokens/s; {config.prompt_len} prompt tokens, {config.new_tokens} new tokens per row, "
        f"rank-{config.rank} adapters (HF: + PEFT adapter_names); decode = engine decode steps only; "
        "dec/flr: decode vs the matmul floor (F.linear), dec/pk: vs the same matmuls on packed weights"
        + (f"; engine and server: median of {config.repeats} alternating runs" if config.repeats > 1 else ""),
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r['batch_size']:>3} {r['workload']:>11} | {_cell(r['floor_tokens_per_s'], '7.1f')} "
            f"{_cell(r['engine_tokens_per_s'], '7.1f')} {_cell(r['engine_decode_tokens_per_s'], '7.1f')} "
            f"{_cell(r['server_tokens_per_s'], '7.1f')} {_cell(r['hf_tokens_per_s'], '7.1f')} | "
            f"{_cell(r['engine_decode_vs_floor'], '7.2f')} {_cell(r.get('engine_decode_vs_packed_floor'), '6.2f')} "
            f"{_cell(r['engine_vs_hf'], '6.2f')} "
            f"{_cell(r['server_vs_hf'], '6.2f')} {_cell(r['server_vs_engine'], '7.2f')} | "
            f"{_cell(r['engine_vs_base'], '8.2f')} {_cell(r['server_vs_base'], '8.2f')} "
            f"{_cell(r['hf_vs_base'], '7.2f')} | {_cell(r['engine_rows_equal_hf'], 'd'):>3}/{r['rows']} "
            f"{_cell(r['server_rows_equal_engine'], 'd'):>3}/{r['rows']}"
        )
    lines += ["", "targets (issue 10)"]
    for t in targets:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(
            f"  B={t['batch_size']:<3} {t['path']:>6} {t['target']:<40} {t['workload']:>11}: "
            f"{_cell(t['ratio'], '.2f')} (need {t['threshold']}) {met}"
        )
    return "\n".join(lines)


def document(result: ModelBenchResult, rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> dict:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result.config).items()}
    return {
        "machine": cpu_machine(result.copy_bandwidth),
        "threads": result.threads,
        "load_average": result.load_average,
        "config": config,
        "model": {"path": str(result.model_dir), "shape": asdict(result.shape)},
        "floor": [asdict(f) for f in result.floors.values()],
        "packed_floor": [asdict(f) for f in result.packed_floors.values()],
        "rows": rows,
        "targets": targets,
    }


def plot_paths(path: Path, rows: list[dict[str, Any]]) -> None:
    """One panel per batch size: tokens/s of each path against the workload's distinct adapters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    series = (
        ("engine_tokens_per_s", "engine (end to end)", "-o"),
        ("engine_decode_tokens_per_s", "engine (decode)", "--o"),
        ("server_tokens_per_s", "server over HTTP", "-s"),
        ("hf_tokens_per_s", "HF transformers (+ PEFT)", "-^"),
    )
    for ax, b in zip(axes[0], sizes, strict=True):
        mine = [r for r in rows if r["batch_size"] == b]
        labels = ["base" if r["workload"] == BASE else str(r["num_adapters"]) for r in mine]
        xs = list(range(len(mine)))
        for key, label, style in series:
            if any(r[key] is not None for r in mine):
                ax.plot(
                    xs, [r[key] if r[key] is not None else float("nan") for r in mine], style, label=label
                )
        if mine[0]["floor_tokens_per_s"] is not None:
            ax.axhline(mine[0]["floor_tokens_per_s"], color="gray", linestyle=":", label="matmul floor")
        ax.set_xticks(xs, labels)
        ax.set_xlabel("adapters in the workload (round robin; 1: one for every row)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"batch {b}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
