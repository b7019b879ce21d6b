"""`lorax-bench [engine]`: flags → BenchConfig, then the engine benchmark, its table, JSON and plot;
`lorax-bench serve`: flags → ServeConfig, then streaming clients against a running server;
`lorax-bench model`: a real model on CPU through every path (bench/model_cli.py);
`lorax-bench soak`: a server at saturation for a set time, counting lost requests (bench/soak_cli.py);
`lorax-bench quantized`: the engine on one model in fp32 and under each --quantize scheme, in one run
(bench/quantized_cli.py).

Defaults follow the device: on CUDA the shapes and grid of issue 6 (1b and 8b, bf16, batch 1/32/128,
context 128/1024, 1/8/32/128 adapters, PEFT at batch 32 × 128 prompt tokens × 64 new tokens with
32 adapters); on CPU a tiny fp32 model and a grid small enough to finish in seconds. The engine's
own settings (ENGINE_SETTINGS) are lorax-worker's flags, declared once in proto/worker_settings.py,
with its defaults and environment variables: the engine benchmarked is the one a server runs with
the same flags. So decode CUDA graphs are off unless `--cuda-graph-max-batch-size` asks for them,
as in lorax-worker and LoRAX's launcher (`--compile`), where graphs are opt-in too; `make gpu-check`
asks for 128.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from loraxpy.bench.bounds import measure_copy_bandwidth
from loraxpy.bench.engine import RunResult
from loraxpy.bench.model_cli import model_main
from loraxpy.bench.overlap import compare_overlap
from loraxpy.bench.quantized_cli import quantized_main
from loraxpy.bench.report import BaselineComparison, format_table, machine_info, plot_throughput, write_json
from loraxpy.bench.serving import (
    CONSTRAINED_FORMAT,
    ServeConfig,
    copy_task_prompt,
    format_report,
    report_dict,
    run_serving,
    shared_system_prompt,
)
from loraxpy.bench.shapes import SHAPES
from loraxpy.bench.soak_cli import soak_main
from loraxpy.bench.suite import BenchConfig, run_shape
from loraxpy.bench.workloads import KINDS
from loraxpy.proto.settings import add_flags, flag_values
from loraxpy.proto.worker_settings import WorkerSettings
from loraxpy.worker.config import WorkerConfig, check_device, torch_device

# The worker's settings the in-process engine takes (the rest name a model, a cache size or adapter
# sources, which the benchmark writes or sizes itself).
ENGINE_SETTINGS = (
    "dtype",
    "attention_backend",
    "cpu_weight_layout",
    "cuda_graph_max_batch_size",
    "block_size",
)
# (CUDA default, CPU default) for every flag whose default depends on the device
DEVICE_DEFAULTS: dict[str, tuple[str, str]] = {
    "shapes": ("1b,8b", "tiny"),
    "batch_sizes": ("1,32,128", "1,8"),
    "context_lens": ("128,1024", "16,64"),
    "adapter_counts": ("1,8,32,128", "1,4,8"),
    "mixed_adapters": ("32", "8"),
    "decode_steps": ("32", "8"),
    "prefill_chunk": ("8192", "1024"),
    "baseline_batch": ("32", "4"),
    "baseline_prompt_len": ("128", "16"),
    "baseline_new_tokens": ("64", "8"),
    "baseline_adapters": ("32", "4"),
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorax-bench [engine]",
        description="Engine-level benchmark: decode and prefill speed against the byte bound and HF+PEFT. "
        "`lorax-bench serve --help` describes the serving benchmark, `lorax-bench model --help` the "
        "real-model run through every path (floor, engine, server, HF).",
    )
    engine = p.add_argument_group(
        "engine",
        "lorax-worker's flags (auto: the first GPU where there is one; bfloat16 on CUDA, float32 on CPU)",
    )
    add_flags(engine, WorkerConfig, names=("device",))
    add_flags(engine, WorkerSettings, names=ENGINE_SETTINGS)
    p.add_argument(
        "--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default 1b,8b on CUDA, tiny on CPU)"
    )
    p.add_argument("--batch-sizes", help="comma-separated (default 1,32,128 on CUDA)")
    p.add_argument("--context-lens", help="prompt tokens before decoding (default 128,1024 on CUDA)")
    p.add_argument(
        "--adapter-counts", help="N distinct adapters for uniform and Zipf (default 1,8,32,128 on CUDA)"
    )
    p.add_argument(
        "--workloads", default=",".join(KINDS), help=f"comma-separated kinds of {', '.join(KINDS)}"
    )
    p.add_argument("--rank", type=int, default=16, help="rank of the single, uniform and Zipf adapters")
    p.add_argument("--mixed-ranks", default="8,16,32,64", help="ranks the mixed workload cycles through")
    p.add_argument("--mixed-adapters", help="distinct adapters of the mixed workload (default 32 on CUDA)")
    p.add_argument(
        "--zipf-s", type=float, default=1.0, help="Zipf exponent: adapter k drawn with weight 1/k^s"
    )
    p.add_argument("--warmup-steps", type=int, default=3, help="decode steps run before timing")
    p.add_argument("--decode-steps", help="timed decode steps per run (default 32 on CUDA)")
    p.add_argument("--prefill-chunk", help="most tokens per prefill step (default 8192 on CUDA)")
    p.add_argument(
        "--max-adapter-files", type=int, default=16, help="distinct adapter files per rank on disk"
    )
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip HF transformers + PEFT")
    p.add_argument("--baseline-batch", help="PEFT baseline batch size (default 32 on CUDA)")
    p.add_argument("--baseline-prompt-len", help="PEFT baseline prompt tokens (default 128 on CUDA)")
    p.add_argument("--baseline-new-tokens", help="PEFT baseline generated tokens (default 64 on CUDA)")
    p.add_argument("--baseline-adapters", help="PEFT baseline distinct adapters (default 32 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("bench-results.json"), help="JSON results")
    p.add_argument("--plot", type=Path, help="PNG of throughput vs adapters (default: --output with .png)")
    p.add_argument(
        "--workdir", type=Path, help="keep the random model and adapters here (default: a temp dir)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log each run as it finishes")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    check_device(args.device)
    device = torch_device(args.device)
    on_cuda = device.type == "cuda"

    def pick(name: str) -> str:
        given = getattr(args, name)
        return given if given is not None else DEVICE_DEFAULTS[name][0 if on_cuda else 1]

    shapes = tuple(s.strip() for s in pick("shapes").split(",") if s.strip())
    unknown = [s for s in shapes if s not in SHAPES]
    kinds = tuple(k.strip() for k in args.workloads.split(",") if k.strip())
    bad_kinds = [k for k in kinds if k not in KINDS]
    if unknown or bad_kinds or not shapes:
        raise ValueError(f"unknown shapes {unknown} or workloads {bad_kinds}")
    if int(pick("baseline_new_tokens")) < 2:
        raise ValueError("the baseline needs at least 2 new tokens (a prefill token and a decode step)")
    return BenchConfig(
        shapes=shapes,
        device=device,
        batch_sizes=_ints(pick("batch_sizes")),
        context_lens=_ints(pick("context_lens")),
        adapter_counts=_ints(pick("adapter_counts")),
        kinds=kinds,
        rank=args.rank,
        mixed_ranks=_ints(args.mixed_ranks),
        mixed_adapters=int(pick("mixed_adapters")),
        zipf_s=args.zipf_s,
        warmup_steps=args.warmup_steps,
        decode_steps=int(pick("decode_steps")),
        prefill_chunk=int(pick("prefill_chunk")),
        max_adapter_files=args.max_adapter_files,
        baseline=args.baseline,
        baseline_batch=int(pick("baseline_batch")),
        baseline_prompt_len=int(pick("baseline_prompt_len")),
        baseline_new_tokens=int(pick("baseline_new_tokens")),
        baseline_adapters=int(pick("baseline_adapters")),
        seed=args.seed,
        engine=WorkerSettings(**flag_values(WorkerSettings, args, names=ENGINE_SETTINGS)),
    )


def run(config: BenchConfig, output: Path, plot: Path, workdir: Path) -> dict:
    """Measures the bandwidth, runs every shape, writes JSON and PNG; returns the machine info."""
    bandwidth = measure_copy_bandwidth(config.device)
    machine = machine_info(config.device, config.dtype, bandwidth)
    runs: list[RunResult] = []
    baselines: list[BaselineComparison] = []
    config_doc = {
        **{k: str(v) if isinstance(v, torch.device) else v for k, v in vars(config).items() if k != "engine"},
        **{name: getattr(config.engine, name) for name in ENGINE_SETTINGS},
        "dtype": str(config.dtype),  # resolved on the device, as before
    }

    def save(
        shape_runs: list[RunResult], shape_baselines: list[BaselineComparison], engine_done: bool
    ) -> None:
        """JSON after every run (the plot once a shape's grid is done): a run stopped at a deadline
        (bench/gpu_check.py's stages) keeps every result it reached."""
        write_json(output, machine, config_doc, runs + shape_runs, baselines + shape_baselines)
        if engine_done and not shape_baselines:
            plot_throughput(plot, runs + shape_runs)

    for name in config.shapes:
        shape_runs, shape_baselines = run_shape(config, SHAPES[name], bandwidth, workdir, save)
        runs += shape_runs
        baselines += shape_baselines
    write_json(output, machine, config_doc, runs, baselines)
    plot_throughput(plot, runs)
    print(
        f"device {machine['device_name']} ({machine['device']}), {machine['dtype']}, "
        f"copy bandwidth {machine['copy_bandwidth_gb_per_s']:.1f} GB/s"
    )
    print(format_table(runs, baselines))
    print(f"\nwrote {output} and {plot}")
    return machine


def build_serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorax-bench serve",
        description="Serving benchmark: Poisson arrivals of streaming requests against a running server.",
    )
    p.add_argument("--url", default="http://127.0.0.1:3000", help="the server (start lorax-launcher first)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=4.0, help="mean request arrivals per second")
    p.add_argument(
        "--adapter-ids", default="", help="comma-separated adapter pool; an empty item is the base model"
    )
    p.add_argument("--distribution", default="uniform", choices=["uniform", "zipf"])
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--prompt", default=ServeConfig.prompt)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--api-key", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--constrained",
        action="store_true",
        help="run the workload again constrained to a JSON schema and report both throughputs",
    )
    p.add_argument(
        "--shared-system-prompt",
        type=int,
        default=0,
        metavar="WORDS",
        help="start every prompt with the same system prompt of about WORDS words; run it first with "
        "a different first word per request (no shared prefix: the prefix cache cannot help), then "
        "shared, and report the TTFT and throughput ratios",
    )
    p.add_argument(
        "--copy-task",
        action="store_true",
        help="every prompt is a passage and the start of its copy (the workload prompt-lookup "
        "speculation speeds up: run it against servers with and without --speculative-tokens)",
    )
    p.add_argument(
        "--compare-overlap",
        metavar="MODEL",
        help="instead of --url: launch servers of MODEL (a shape such as tiny, random weights; default, "
        "the packaged model; or a local folder) without and with --overlap-steps, run the workload "
        "against each, and report both with the workers' busy share and the throughput ratio",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="with --compare-overlap: runs against each server, alternating"
    )
    p.add_argument("--output", type=Path, help="JSON: the report and every request")
    return p


def _shared_prefix_runs(config: ServeConfig, words: int) -> tuple[dict[str, Any], bool]:
    """The shared-system-prompt workload: unshared first, then shared; the JSON and whether both ran."""
    unshared_config = dataclasses.replace(
        config, system_prompt=shared_system_prompt(words), unique_prefix=True
    )
    shared_config = dataclasses.replace(unshared_config, unique_prefix=False)
    unshared, unshared_records = asyncio.run(run_serving(unshared_config))
    print("system prompt, no prefix shared:\n" + format_report(unshared))
    shared, shared_records = asyncio.run(run_serving(shared_config))
    print("system prompt shared:\n" + format_report(shared))
    ttft = shared.ttft_s.get("p50", 0.0) / unshared.ttft_s["p50"] if unshared.ttft_s.get("p50") else 0.0
    throughput = (
        shared.output_tokens_per_s / unshared.output_tokens_per_s if unshared.output_tokens_per_s else 0.0
    )
    print(f"shared / unshared: TTFT p50 {ttft:.3f}, output throughput {throughput:.3f}")
    body = {
        "unshared": report_dict(unshared_config, unshared, unshared_records),
        "shared": report_dict(shared_config, shared, shared_records),
        "ttft_p50_ratio": ttft,
        "throughput_ratio": throughput,
    }
    ok = unshared.num_failed < unshared.num_requests and shared.num_failed < shared.num_requests
    return body, ok


def serve_main(argv: list[str]) -> int:
    args = build_serve_parser().parse_args(argv)
    try:
        config = ServeConfig(
            url=args.url,
            num_requests=args.num_requests,
            rate=args.rate,
            adapter_ids=tuple(a.strip() for a in args.adapter_ids.split(",")),
            distribution=args.distribution,
            zipf_s=args.zipf_s,
            prompt=copy_task_prompt() if args.copy_task else args.prompt,
            max_new_tokens=args.max_new_tokens,
            api_key=args.api_key,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"lorax-bench serve: {e}", file=sys.stderr)
        return 2
    if args.shared_system_prompt < 0:
        print("lorax-bench serve: --shared-system-prompt must be >= 0 words", file=sys.stderr)
        return 2
    if args.compare_overlap:
        body, ok = compare_overlap(config, args.compare_overlap, args.rounds)
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(body, indent=1))
        return 0 if ok else 1
    report, records = asyncio.run(run_serving(config))
    print(format_report(report))
    body = report_dict(config, report, records)
    ok = report.num_failed < report.num_requests
    if args.constrained:
        constrained_config = dataclasses.replace(config, response_format=CONSTRAINED_FORMAT)
        constrained, constrained_records = asyncio.run(run_serving(constrained_config))
        print("constrained (JSON schema):\n" + format_report(constrained))
        ratio = (
            constrained.output_tokens_per_s / report.output_tokens_per_s
            if report.output_tokens_per_s
            else 0.0
        )
        print(f"constrained / unconstrained output throughput: {ratio:.3f}")
        body["constrained"] = report_dict(constrained_config, constrained, constrained_records)
        body["constrained_throughput_ratio"] = ratio
        ok = ok and constrained.num_failed < constrained.num_requests
    if args.shared_system_prompt:
        body["shared_system_prompt"], shared_ok = _shared_prefix_runs(config, args.shared_system_prompt)
        ok = ok and shared_ok
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(body, indent=1))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    if argv[:1] == ["model"]:
        return model_main(argv[1:])
    if argv[:1] == ["soak"]:
        return soak_main(argv[1:])
    if argv[:1] == ["quantized"]:
        return quantized_main(argv[1:])
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["engine"] else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"lorax-bench: {e}", file=sys.stderr)
        return 2
    plot = args.plot or args.output.with_suffix(".png")
    if args.workdir is not None:
        run(config, args.output, plot, args.workdir)
        return 0
    with tempfile.TemporaryDirectory(prefix="lorax-bench-") as tmp:
        run(config, args.output, plot, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
