"""`lorax-bench model`: flags → ModelBenchConfig, then every path on one real model, table, JSON, PNG.

Defaults are the measurement of issue 10 (the packaged SmolLM2-135M-Instruct on CPU, fp32, batch
1/16/32, 64 prompt tokens, 32 new tokens, base / one adapter / 4 and 16 distinct rank-16 adapters);
`--quick` shrinks the grid to a smoke run of a minute or so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

from loraxpy.bench.model_report import comparison_rows, document, evaluate_targets, format_report, plot_paths
from loraxpy.bench.model_suite import PATHS, ModelBenchConfig, run_model_bench
from loraxpy.proto.settings import add_flags, flag_values
from loraxpy.proto.worker_settings import WorkerSettings
from loraxpy.worker.config import torch_dtype
from loraxpy.worker.model_source import ModelSourceError

BENCH_SETTINGS = ("dtype", "quantize")  # lorax-worker's flags, declared once in proto/worker_settings.py
BENCH_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}

# (full default, --quick default) of every flag --quick changes
GRID_DEFAULTS: dict[str, tuple[str, str]] = {
    "batch_sizes": ("1,16,32", "1,4"),
    "adapter_counts": ("4,16", "4"),
    "prompt_len": ("64", "16"),
    "new_tokens": ("32", "8"),
    "target_batch_sizes": ("16,32", "4"),
    "repeats": ("3", "1"),
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorax-bench model",
        description="A real model on CPU, fp32: the matmul floor, the engine in process, the server over "
        "HTTP and HF transformers (+ PEFT) on the same prompts and adapters, with issue 10's targets.",
    )
    p.add_argument("--model-id", help="a local HF model folder (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("LORAX_CACHE", "~/.cache/loraxpy")).expanduser(),
        help="where the default model is converted once (env LORAX_CACHE; default ~/.cache/loraxpy)",
    )
    p.add_argument("--quick", action="store_true", help="a small grid: batch 1,4, 16 prompt and 8 new tokens")
    p.add_argument("--batch-sizes", help="comma-separated (default 1,16,32)")
    p.add_argument("--adapter-counts", help="N distinct adapters round robin, each >= 2 (default 4,16)")
    p.add_argument("--prompt-len", help="prompt tokens per row (default 64)")
    p.add_argument("--new-tokens", help="greedy tokens per row, EOS ignored (default 32)")
    p.add_argument("--target-batch-sizes", help="batch sizes the targets are checked at (default 16,32)")
    p.add_argument("--rank", type=int, default=16, help="rank of every adapter (all seven projections)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    p.add_argument(
        "--threads", type=int, help="torch threads of the floor, engine and HF (default: torch's, the cores)"
    )
    p.add_argument(
        "--server-threads",
        type=int,
        help="the server worker's torch threads (default: the launcher's, the usable cores per shard)",
    )
    p.add_argument(
        "--prefill-tokens",
        type=int,
        default=4096,
        help="engine prefill chunk = server --max-batch-prefill-tokens",
    )
    p.add_argument("--floor-repeats", type=int, default=10, help="timed passes of the matmul floor (fastest)")
    p.add_argument(
        "--repeats",
        default=None,
        help="engine and server runs of each batch, alternating; the median is kept (default 3; --quick 1)",
    )
    p.add_argument("--port", type=int, default=0, help="the server's port (0: a free one)")
    p.add_argument("--seed", type=int, default=0)
    # lorax-worker's own --dtype and --quantize (proto/worker_settings.py: env, default, checks); every
    # path runs the dtype (auto: the worker's choice on CPU, fp32; the targets are for fp32, and bf16
    # needs AMX or AVX512-BF16 to pay); --quantize quantizes the engine's base linears at load (with
    # --paths engine), and a GGUF --model-id is served in its blocks without it
    add_flags(p, WorkerSettings, names=BENCH_SETTINGS)
    p.add_argument(
        "--overlap-steps",
        action="store_true",
        help="launch the server path with --overlap-steps (server / engine with the router's step overlapped)",
    )
    p.add_argument("--output", type=Path, default=Path("bench-model.json"), help="JSON results")
    p.add_argument("--plot", type=Path, help="PNG of tokens/s vs adapters (default: --output with .png)")
    p.add_argument("--workdir", type=Path, help="keep the adapters and the server's log here (default: temp)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each run as it finishes")
    return p


def config_from_args(args: argparse.Namespace) -> ModelBenchConfig:
    def pick(name: str) -> str:
        given = getattr(args, name)
        return given if given is not None else GRID_DEFAULTS[name][1 if args.quick else 0]

    threads = args.threads or torch.get_num_threads()
    settings = WorkerSettings(
        **flag_values(WorkerSettings, args, names=BENCH_SETTINGS)
    )  # the worker's checks
    dtype = torch_dtype(settings.dtype, torch.device("cpu"))
    if dtype not in BENCH_DTYPES:
        raise ValueError(f"--dtype {settings.dtype}: lorax-bench model runs float32 or bfloat16 on CPU")
    return ModelBenchConfig(
        model_id=args.model_id,
        cache_dir=args.cache_dir,
        batch_sizes=_ints(pick("batch_sizes")),
        adapter_counts=_ints(pick("adapter_counts")),
        prompt_len=int(pick("prompt_len")),
        new_tokens=int(pick("new_tokens")),
        rank=args.rank,
        paths=tuple(p.strip() for p in args.paths.split(",") if p.strip()),
        threads=threads,
        server_threads=args.server_threads,
        prefill_tokens=args.prefill_tokens,
        floor_repeats=args.floor_repeats,
        repeats=int(pick("repeats")),
        target_batch_sizes=_ints(pick("target_batch_sizes")),
        port=args.port,
        seed=args.seed,
        dtype=BENCH_DTYPES[dtype],
        quantize=settings.quantize,
        overlap_steps=args.overlap_steps,
    )


def run(config: ModelBenchConfig, output: Path, plot: Path, workdir: Path) -> None:
    result = run_model_bench(config, workdir)
    rows = comparison_rows(result)
    targets = evaluate_targets(rows, config)
    doc = document(result, rows, targets)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1))
    plot_paths(plot, rows)
    m, t = doc["machine"], doc["threads"]
    print(
        f"{result.model_dir.name} on {m['cpu_model']} ({m['usable_cpus']} of {m['cpu_count']} CPUs, "
        f"{'/'.join(m['simd'])}), torch {m['torch']}: {t['floor_engine_hf_torch_threads']} threads in "
        f"process, {t['server_worker_threads']} in the server's worker"
    )
    load = max(result.load_average.values(), default=0.0)
    if load > m["usable_cpus"]:
        print(
            f"warning: load average {load:.1f} on {m['usable_cpus']} CPUs: other processes skew these numbers"
        )
    print(format_report(rows, targets, config))
    print(f"\nwrote {output} and {plot}")


def model_main(argv: list[str]) -> int:
    args = build_model_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"lorax-bench model: {e}", file=sys.stderr)
        return 2
    plot = args.plot or args.output.with_suffix(".png")
    try:
        if args.workdir is not None:
            run(config, args.output, plot, args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="lorax-bench-model-") as tmp:
                run(config, args.output, plot, Path(tmp))
    except ModelSourceError as e:
        print(f"lorax-bench model: {e}", file=sys.stderr)
        return 2
    return 0
