"""`lorax-bench model`: one real model, every path, the same prompts and adapters, in one run.

Paths: the matmul floor (the model's linears alone), the engine in process (the worker's
ModelRunner driven by Steps), the server over HTTP (a `lorax-launcher` subprocess), and HF
transformers `generate` (+ PEFT's mixed-batch `adapter_names`). Workloads: the base model, one
adapter for the whole batch, and N distinct adapters round robin; random rank-r PEFT adapters on
all seven projections, written for the model's shapes. Prompts are text the router tokenizes to
exactly `prompt_len` tokens; the in-process paths get those very ids. Every request generates
exactly `new_tokens` greedy tokens (EOS ignored). The paths run one after another, never at once.

The engine and the server alternate, batch by batch and `repeats` times each (the server stays up
beside the engine, idle while the engine runs), and each keeps its median run: the speed of a shared
machine drifts over minutes, and ratios of one path to the other are only fair from the same minute.
The server's prefix cache is off, so a repeat recomputes its prompts as the engine does.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraxpy.bench.baseline import BaselineSpec, run_baseline
from loraxpy.bench.bounds import measure_copy_bandwidth
from loraxpy.bench.engine import AdapterPool, EngineBench, RunSpec
from loraxpy.bench.floor import FloorResult, MatmulFloor
from loraxpy.bench.prompts import TextPrompt, text_prompts
from loraxpy.bench.served import ServerOptions, generate_batch, launched_server, logged_worker_threads
from loraxpy.bench.shapes import ModelShape
from loraxpy.bench.workloads import Workload
from loraxpy.router.text import Tokenizer
from loraxpy.worker.model_source import resolve_model
from loraxpy.worker.prepacked import prepack_supported
from loraxpy.worker.runner import RunnerOptions

logger = logging.getLogger(__name__)

PATHS = ("floor", "engine", "server", "hf")
CPU = torch.device("cpu")
BLOCK_SIZE = 16


@dataclass(frozen=True)
class ModelBenchConfig:
    model_id: str | None  # None: the packaged default model
    cache_dir: Path
    batch_sizes: tuple[int, ...] = (1, 16, 32)
    adapter_counts: tuple[int, ...] = (4, 16)  # N distinct adapters, round robin
    prompt_len: int = 64
    new_tokens: int = 32
    rank: int = 16
    paths: tuple[str, ...] = PATHS
    threads: int = 1  # torch intra-op threads of this process: floor, engine and HF
    server_threads: int | None = None  # the server's worker (OMP_NUM_THREADS); None: the launcher's choice
    prefill_tokens: int = 4096  # the engine's prefill chunk and the server's --max-batch-prefill-tokens
    floor_repeats: int = 10
    repeats: int = 1  # engine and server runs of each batch (the median is kept)
    target_batch_sizes: tuple[int, ...] = (16, 32)
    port: int = 0
    seed: int = 0
    dtype: str = "float32"  # every path's: floor, engine, server (--dtype) and HF
    quantize: str | None = None  # the engine's base linears (--quantize); the other paths refuse it
    overlap_steps: bool = False  # the server's --overlap-steps (the engine in process has no router)

    def __post_init__(self) -> None:
        if min(self.batch_sizes, default=0) < 1 or self.prompt_len < 1 or self.rank < 1:
            raise ValueError("batch sizes, prompt length and rank must be positive")
        if self.new_tokens < 2:
            raise ValueError("--new-tokens must be at least 2 (a prefill token and a decode step)")
        if min(self.adapter_counts, default=2) < 2:
            raise ValueError("adapter counts start at 2 (one adapter for the whole batch is `single`)")
        if unknown := set(self.paths) - set(PATHS):
            raise ValueError(f"unknown paths {sorted(unknown)}; choose from {', '.join(PATHS)}")
        if self.quantize and set(self.paths) != {"engine"}:
            raise ValueError("--quantize times the engine only: pass --paths engine")
        if (
            min(self.threads, self.server_threads or 1, self.floor_repeats, self.prefill_tokens, self.repeats)
            < 1
        ):
            raise ValueError("threads, repeats and prefill tokens must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    @property
    def max_adapters(self) -> int:
        return max((1, *self.adapter_counts))

    def workloads(self) -> list[Workload]:
        return [
            Workload("base", "base", 0),
            Workload("single", "single", 1, (self.rank,)),
            *(Workload(f"uniform-{n}", "uniform", n, (self.rank,)) for n in self.adapter_counts),
        ]


@dataclass
class PathRun:
    path: str  # engine, server or hf
    batch_size: int
    workload: str
    tokens_per_s: float  # generated tokens / wall time of the whole batch, prefill included
    tokens: list[list[int]]  # greedy ids per row
    decode_tokens_per_s: float | None = None  # engine: batch / median decode step
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelBenchResult:
    config: ModelBenchConfig
    model_dir: Path
    shape: ModelShape
    prompts: list[TextPrompt]
    floors: dict[int, FloorResult]  # F.linear on the stored weights: issue 10's matmul floor
    runs: dict[tuple[str, int, str], PathRun]  # (path, batch size, workload)
    threads: dict[str, Any]
    copy_bandwidth: float
    # 1-minute load average before and after: other processes on the cores make every number noisy
    load_average: dict[str, float] = field(default_factory=dict)
    # the same matmuls on weights packed as the engine packs them (worker/prepacked.py), where it does
    packed_floors: dict[int, FloorResult] = field(default_factory=dict)


def row_adapters(workload: Workload, batch_size: int) -> list[int]:
    """Adapter index of each row (0: base): round robin, as PEFT's `adapter_names` baseline assigns."""
    return workload.assign(batch_size, random.Random(0))  # base, single and uniform draw nothing


def run_model_bench(config: ModelBenchConfig, workdir: Path) -> ModelBenchResult:
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    load_before = os.getloadavg()[0]
    try:
        result = _run_paths(config, workdir)
        result.load_average = {"start": load_before, "end": os.getloadavg()[0]}
        return result
    finally:
        torch.set_num_threads(threads_before)  # a caller (a test session) keeps its own setting


def _run_paths(config: ModelBenchConfig, workdir: Path) -> ModelBenchResult:
    model_dir = resolve_model(config.model_id, cache_dir=config.cache_dir)
    shape = ModelShape.of_model(model_dir)
    prompts = text_prompts(Tokenizer(model_dir), max(config.batch_sizes), config.prompt_len, config.seed)
    pool = AdapterPool(workdir / "adapters", shape, torch.float32, config.max_adapters, config.seed)
    pool.root.mkdir(parents=True, exist_ok=True)
    for j in range(1, config.max_adapters + 1):
        pool.folder(config.rank, j)  # written once, before any path is timed
    result = ModelBenchResult(
        config, model_dir, shape, prompts, {}, {}, _threads(config), measure_copy_bandwidth(CPU)
    )
    if "floor" in config.paths:
        floor = MatmulFloor(shape, dtype=config.torch_dtype, seed=config.seed)
        result.floors = {b: floor.measure(b, config.floor_repeats) for b in config.batch_sizes}
        del floor
        if prepack_supported(CPU, config.torch_dtype) is None:
            packed = MatmulFloor(shape, dtype=config.torch_dtype, seed=config.seed, packed=True)
            result.packed_floors = {b: packed.measure(b, config.floor_repeats) for b in config.batch_sizes}
            del packed
    if "hf" in config.paths:
        result.runs.update(_hf_runs(config, model_dir, pool, prompts))
        gc.collect()  # HF's model is gone before the engine's and the server's load
    if {"engine", "server"} & set(config.paths):
        result.runs.update(engine_and_server_runs(config, model_dir, pool, prompts, workdir))
    if "server" in config.paths:
        result.threads["server_worker_threads"] = logged_worker_threads(workdir / "launcher.log")
    return result


def _threads(config: ModelBenchConfig) -> dict[str, Any]:
    return {
        "floor_engine_hf_torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        # None: the launcher's own split of the usable cores over its shards (OMP_NUM_THREADS)
        "server_worker_threads_requested": config.server_threads,
        "server_worker_threads": None,  # what the worker logged it runs with, after the server path
        "server_router": "one asyncio process (no torch) on the same cores as the worker",
        "client": "this process, idle in asyncio while the server runs (the paths never overlap)",
        "server_while_engine_runs": "up and idle (engine and server alternate batch by batch)",
        "env_omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _log(run: PathRun) -> PathRun:
    logger.info("%-6s B=%-3d %-11s %8.1f tok/s", run.path, run.batch_size, run.workload, run.tokens_per_s)
    return run


def _engine(
    config: ModelBenchConfig, model_dir: Path, pool: AdapterPool, prompts: list[TextPrompt]
) -> EngineBench:
    max_batch = max(config.batch_sizes)
    blocks_per_request = -(-(config.prompt_len + config.new_tokens + 1) // BLOCK_SIZE)
    options = RunnerOptions(
        dtype=config.torch_dtype,
        device=CPU,
        block_size=BLOCK_SIZE,
        max_loras=config.max_adapters,
        max_lora_rank=config.rank,
        adapter_root=pool.root,
        quantize=config.quantize,
    )
    bench = EngineBench(
        model_dir,
        pool,
        options,
        num_blocks=max_batch * blocks_per_request,
        prefill_chunk=config.prefill_tokens,
        max_batch=max_batch,
    )
    # The byte bound (bandwidth 1.0 here) is the engine mode's measure, not reported by this one.
    base = config.workloads()[0]
    ids = [list(prompts[0].token_ids)]
    bench.run(RunSpec(base, 1, config.prompt_len, 0, 1), "model", 1.0, config.seed, ids)  # warm-up
    return bench


def _engine_run(
    config: ModelBenchConfig, bench: EngineBench, prompts: list[TextPrompt], b: int, w: Workload
) -> PathRun:
    spec = RunSpec(w, b, config.prompt_len, 0, config.new_tokens - 1)
    r = bench.run(spec, "model", 1.0, config.seed, [list(p.token_ids) for p in prompts[:b]])
    extra = {
        "decode_step_ms": r.decode_step_ms,
        "prefill_s": r.prefill_s,
        "kernels": r.engine_paths,
        "weight_bytes": bench.runner.weight_bytes,
    }
    return PathRun("engine", b, w.name, r.end_to_end_tokens_per_s, r.all_tokens, r.decode_tokens_per_s, extra)


def _median_run(runs: list[PathRun]) -> PathRun:
    """The run of median tokens/s (the lower middle one of an even count), with every run's speed."""
    ordered = sorted(runs, key=lambda r: r.tokens_per_s)
    kept = ordered[(len(ordered) - 1) // 2]
    kept.extra["repeat_tokens_per_s"] = [r.tokens_per_s for r in runs]
    if kept.decode_tokens_per_s is not None:
        kept.extra["repeat_decode_tokens_per_s"] = [r.decode_tokens_per_s for r in runs]
    # greedy fp32 is deterministic: a repeat with other tokens is a bug worth seeing in the JSON
    kept.extra["repeats_equal"] = all(r.tokens == runs[0].tokens for r in runs)
    return _log(kept)


def engine_and_server_runs(
    config: ModelBenchConfig, model_dir: Path, pool: AdapterPool, prompts: list[TextPrompt], workdir: Path
) -> dict[tuple[str, int, str], PathRun]:
    bench = _engine(config, model_dir, pool, prompts) if "engine" in config.paths else None
    runs: dict[tuple[str, int, str], PathRun] = {}
    with contextlib.ExitStack() as stack:
        url = None
        if "server" in config.paths:
            url = stack.enter_context(launched_server(_server_options(config, model_dir, pool, workdir)))
        for b in config.batch_sizes:
            for w in config.workloads():
                done: dict[str, list[PathRun]] = {"engine": [], "server": []}
                for _ in range(config.repeats):
                    if bench is not None:
                        done["engine"].append(_engine_run(config, bench, prompts, b, w))
                    if url is not None:
                        done["server"].append(_server_run(config, url, pool, prompts, b, w))
                for path, path_runs in done.items():
                    if path_runs:
                        runs[(path, b, w.name)] = _median_run(path_runs)
    return runs


def _hf_runs(
    config: ModelBenchConfig, model_dir: Path, pool: AdapterPool, prompts: list[TextPrompt]
) -> dict[tuple[str, int, str], PathRun]:
    keys = [(b, w) for b in config.batch_sizes for w in config.workloads()]
    specs = [BaselineSpec(b, config.prompt_len, config.new_tokens, w.num_adapters) for b, w in keys]
    adapter_dirs = [pool.root / pool.folder(config.rank, j) for j in range(1, config.max_adapters + 1)]
    ids = [list(p.token_ids) for p in prompts]
    results = run_baseline(model_dir, adapter_dirs, specs, ids, config.torch_dtype, CPU)
    return {
        ("hf", b, w.name): _log(
            PathRun("hf", b, w.name, r.tokens_per_s, r.tokens, extra={"seconds": r.seconds})
        )
        for (b, w), r in zip(keys, results, strict=True)
    }


def _kv_cache_mib(config: ModelBenchConfig, shape: ModelShape) -> int:
    """Twice the K/V of the largest batch (fp32), so the server never preempts for blocks."""
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4
    blocks = -(-(config.prompt_len + config.new_tokens + 1) // BLOCK_SIZE) + 1
    need = max(config.batch_sizes) * blocks * BLOCK_SIZE * per_token
    return max(32, -(-2 * need // 2**20))


def _server_options(
    config: ModelBenchConfig, model_dir: Path, pool: AdapterPool, workdir: Path
) -> ServerOptions:
    return ServerOptions(
        model_dir=model_dir,
        adapter_root=pool.root,
        log_path=workdir / "launcher.log",
        threads=config.server_threads,
        max_batch_size=max((*config.batch_sizes, config.max_adapters)),
        max_adapters=config.max_adapters,
        max_lora_rank=config.rank,
        prefill_tokens=config.prefill_tokens,
        kv_cache_mib=_kv_cache_mib(config, pool.shape),
        port=config.port,
        dtype=config.dtype,
        # no prefix cache: a repeat (or the warm-up's prompt) would skip prefills the engine computes
        extra_args=(
            "--prefix-caching",
            "false",
            *(("--overlap-steps", "true") if config.overlap_steps else ()),
        ),
    )


def _server_run(
    config: ModelBenchConfig, url: str, pool: AdapterPool, prompts: list[TextPrompt], b: int, w: Workload
) -> PathRun:
    adapters = [pool.folder(config.rank, a) if a else None for a in row_adapters(w, b)]
    r = generate_batch(url, [p.text for p in prompts[:b]], adapters, config.new_tokens)
    extra = {
        "seconds": r.seconds,
        "prompt_tokens": sorted(set(r.prompt_tokens)),
        "step_ms": r.step_ms,
        "router_overhead_ms": r.router_overhead_ms,
    }
    return PathRun("server", b, w.name, r.tokens_per_s, r.tokens, extra=extra)
