"""`lorax-bench soak`: flags → SoakConfig; a running server (`--url`) or one it launches with many
more random adapters than device slots; the report printed, written as JSON, and the exit status
non-zero when a request was lost."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from loraxpy.bench.served import ServerOptions, launched_server
from loraxpy.bench.shapes import ModelShape, write_random_adapter
from loraxpy.bench.soak import SoakConfig, format_soak, run_soak, soak_dict


def build_soak_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorax-bench soak",
        description="Soak: a server at saturation for a set time with many more adapters than slots, "
        "streaming and not, random disconnects, mixed sampling; reports lost requests (must be 0), "
        "errors by kind, p50/p99 latency per window and the router's and workers' memory.",
    )
    p.add_argument("--url", help="a running server (its adapters: --adapter-ids); default: launch one")
    p.add_argument("--adapter-ids", default="", help="with --url: comma-separated adapters it can load")
    p.add_argument("--model-id", help="launched: a local HF folder (default: the packaged SmolLM2-135M)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("LORAX_CACHE", "~/.cache/loraxpy")).expanduser(),
        help="where the default model is converted once (env LORAX_CACHE)",
    )
    p.add_argument("--num-adapters", type=int, default=100, help="launched: random PEFT adapters written")
    p.add_argument("--max-active-adapters", type=int, default=16, help="launched: device adapter slots")
    p.add_argument(
        "--rank", type=int, default=8, help="launched: every adapter's rank (all seven projections)"
    )
    p.add_argument("--max-concurrent-requests", type=int, default=128, help="launched: the server's cap")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="launched: the server's KV cache")
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--concurrency", type=int, default=32, help="clients, each one request after another")
    p.add_argument("--max-new-tokens", type=int, default=32, help="each request asks for 1..this many")
    p.add_argument("--disconnect-probability", type=float, default=0.1, help="requests the client drops")
    p.add_argument("--window-s", type=float, default=60.0, help="latency and memory are reported per window")
    p.add_argument("--api-key", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="JSON: the config and the report")
    p.add_argument("--workdir", type=Path, help="launched: keep the adapters and the server's log here")
    return p


@contextlib.contextmanager
def _launched(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[str, tuple[str, ...]]]:
    """A launcher serving the model with `--num-adapters` random adapters under its adapter root."""
    if args.model_id:
        model_dir = Path(args.model_id)
    else:
        from loraxpy.worker.model_source import convert_default_model

        model_dir = convert_default_model(args.cache_dir)
    shape = ModelShape.of_model(model_dir)
    root = workdir / "adapters"
    ids = []
    for i in range(args.num_adapters):
        name = f"soak-{i:03d}"
        if not (root / name / "adapter_config.json").exists():
            write_random_adapter(shape, root / name, args.rank, torch.float32, args.seed * 1_000_003 + i)
        ids.append(name)
    options = ServerOptions(
        model_dir=model_dir,
        adapter_root=root,
        log_path=workdir / "server.log",
        threads=None,
        max_batch_size=args.max_concurrent_requests,
        max_adapters=args.max_active_adapters,
        max_lora_rank=args.rank,
        prefill_tokens=2048,
        kv_cache_mib=args.kv_cache_mib,
    )
    with launched_server(options) as url:
        yield url, ("", *ids)


def _run(args: argparse.Namespace, url: str, adapter_ids: tuple[str, ...]) -> int:
    config = SoakConfig(
        url=url,
        duration_s=args.duration_s,
        concurrency=args.concurrency,
        adapter_ids=adapter_ids,
        max_new_tokens=args.max_new_tokens,
        disconnect_probability=args.disconnect_probability,
        window_s=args.window_s,
        api_key=args.api_key,
        seed=args.seed,
    )
    report = asyncio.run(run_soak(config))
    print(format_soak(report))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(soak_dict(config, report), indent=1))
    return 1 if report.num_lost else 0


def soak_main(argv: list[str]) -> int:
    args = build_soak_parser().parse_args(argv)
    try:
        if args.url:
            return _run(args, args.url, tuple(a.strip() for a in args.adapter_ids.split(",")))
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            with _launched(args, args.workdir) as (url, ids):
                return _run(args, url, ids)
        with (
            tempfile.TemporaryDirectory(prefix="lorax-soak-") as tmp,
            _launched(args, Path(tmp)) as (url, ids),
        ):
            return _run(args, url, ids)
    except ValueError as e:
        print(f"lorax-bench soak: {e}", file=sys.stderr)
        return 2
