"""`lorax-bench quantized`: the engine on one model in full precision and under each quantization
scheme, in one run, so README's table compares them on the same machine at the same time.

Each variant is a `lorax-bench model --paths engine` measurement (bench/model_suite.py: the worker's
ModelRunner in process, no adapters (`base`) and one rank-16 adapter (`single`), greedy decode):
`fp32` (the model as given, no --quantize), a scheme quantized at load (`fp8`, `bitsandbytes`,
`bitsandbytes-nf4`, `bitsandbytes-fp4`), `gguf` (the packaged default model's GGUF file served in its
blocks) and pre-quantized checkpoints of the same model (`gptq=DIR`, `awq=DIR`). The variants take
turns, `--rounds` times over (the best of each is kept), so a burst of load from other processes
lands on all of them rather than on one. One model is in memory at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraxpy.bench.engine import AdapterPool
from loraxpy.bench.model_report import cpu_machine
from loraxpy.bench.model_suite import ModelBenchConfig, engine_and_server_runs
from loraxpy.bench.prompts import text_prompts
from loraxpy.bench.shapes import ModelShape
from loraxpy.proto.quantization import check_scheme_name
from loraxpy.router.text import Tokenizer
from loraxpy.worker.model_source import ModelSourceError, default_gguf_path, resolve_model

LOAD_SCHEMES = ("fp8", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
CHECKPOINT_SCHEMES = ("gptq", "awq")
WORKLOADS = ("base", "single")


@dataclass(frozen=True)
class Variant:
    name: str
    model_id: str | None  # None: the --model-id (the packaged default model if that is unset)
    quantize: str | None


def parse_variant(text: str, model_id: str | None) -> Variant:
    """fp32 | a scheme quantized at load | gguf | gptq=DIR | awq=DIR."""
    name, _, path = text.strip().partition("=")
    if name == "fp32" and not path:
        return Variant("fp32", model_id, None)
    if name in LOAD_SCHEMES and not path:
        check_scheme_name(name)
        return Variant(name, model_id, name)
    if name == "gguf":
        return Variant("gguf", path or str(default_gguf_path()), None)
    if name in CHECKPOINT_SCHEMES:
        if not path:
            raise ValueError(f"{name} reads a pre-quantized checkpoint: pass {name}=DIR")
        return Variant(name, path, name)
    raise ValueError(
        f"unknown variant {text!r}: fp32, {', '.join(LOAD_SCHEMES)}, gguf[=FILE], gptq=DIR or awq=DIR"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorax-bench quantized", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-id", help="a local HF model folder (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument(
        "--variants",
        default="fp32," + ",".join(LOAD_SCHEMES) + ",gguf",
        help="comma-separated: fp32, fp8, bitsandbytes, bitsandbytes-nf4, bitsandbytes-fp4, gguf[=FILE], "
        "gptq=DIR, awq=DIR (checkpoints of the same model)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("LORAX_CACHE", "~/.cache/loraxpy")).expanduser(),
        help="where the default model is converted once (env LORAX_CACHE; default ~/.cache/loraxpy)",
    )
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="turns of every variant; the best of each is kept")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("bench-quantized.json"))
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace, variants: list[Variant], workdir: Path) -> dict[str, Any]:
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    base_dir = resolve_model(args.model_id, cache_dir=args.cache_dir)
    shape = ModelShape.of_model(base_dir)
    prompts = text_prompts(Tokenizer(base_dir), max(batch_sizes), args.prompt_len, args.seed)
    pool = AdapterPool(workdir / "adapters", shape, torch.float32, 1, args.seed)
    pool.root.mkdir(parents=True, exist_ok=True)
    pool.folder(16, 1)
    load = [os.getloadavg()[0]]
    best: dict[str, dict[str, Any]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for _ in range(args.rounds):
            for v in variants:
                model_dir = resolve_model(v.model_id, cache_dir=args.cache_dir)
                config = ModelBenchConfig(
                    model_id=v.model_id,
                    cache_dir=args.cache_dir,
                    batch_sizes=batch_sizes,
                    adapter_counts=(),
                    prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens,
                    paths=("engine",),
                    threads=args.threads,
                    seed=args.seed,
                    dtype=args.dtype,
                    quantize=v.quantize,
                )
                runs = engine_and_server_runs(config, model_dir, pool, prompts, workdir)
                gc.collect()
                entry = best.setdefault(v.name, {"model": str(model_dir), "quantize": v.quantize, "runs": {}})
                for (_, b, workload), r in runs.items():
                    entry["weight_bytes_per_shard"] = r.extra["weight_bytes"]
                    key = f"{workload} B={b}"
                    entry["runs"][key] = max(entry["runs"].get(key, 0.0), r.decode_tokens_per_s or 0.0)
                load.append(os.getloadavg()[0])
    finally:
        torch.set_num_threads(threads)
    return {
        "machine": cpu_machine(0.0),
        "threads": args.threads,
        "dtype": args.dtype,
        "grid": {"batch_sizes": batch_sizes, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens},
        "rounds": args.rounds,
        "load_average": {"min": min(load), "max": max(load)},
        "decode_tokens_per_s": "batch / median decode step, the best of the rounds",
        "variants": best,
    }


def format_table(doc: dict[str, Any]) -> str:
    keys = [f"{w} B={b}" for w in WORKLOADS for b in doc["grid"]["batch_sizes"]]
    lines = [f"{'variant':<18} {'weights MiB':>12} " + " ".join(f"{k:>14}" for k in keys)]
    for name, v in doc["variants"].items():
        mib = v["weight_bytes_per_shard"] / 2**20
        lines.append(f"{name:<18} {mib:>12.0f} " + " ".join(f"{v['runs'].get(k, 0.0):>14.1f}" for k in keys))
    load = doc["load_average"]
    lines.append(
        f"decode tokens/s (batch / median decode step, best of {doc['rounds']} rounds), "
        f"{doc['threads']} thread(s), {doc['dtype']}; load average {load['min']:.1f} to {load['max']:.1f}"
    )
    return "\n".join(lines)


def quantized_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        variants = [parse_variant(t, args.model_id) for t in args.variants.split(",") if t.strip()]
        if args.rounds < 1 or args.new_tokens < 2 or args.prompt_len < 1:
            raise ValueError("--rounds and --prompt-len must be positive, --new-tokens at least 2")
        with tempfile.TemporaryDirectory(prefix="lorax-bench-quantized-") as tmp:
            doc = run(args, variants, Path(tmp))
    except (ValueError, ModelSourceError) as e:
        print(f"lorax-bench quantized: {e}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1))
    print(format_table(doc))
    return 0
