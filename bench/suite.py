"""Runs the whole engine benchmark for one shape: writes the model, plans runners, runs, compares to PEFT.

Workloads are grouped by the largest rank they need, and each group gets one ModelRunner whose
slots have exactly that rank: the torch LoRA path reads rank-padded slots, so rank-16 workloads
must not pay for the mixed workload's rank 64. Only one runner lives at a time.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraxpy.bench.baseline import BaselineSpec, run_baseline
from loraxpy.bench.engine import AdapterPool, EngineBench, RunResult, RunSpec, make_prompts
from loraxpy.bench.report import BaselineComparison
from loraxpy.bench.shapes import ModelShape, write_random_model
from loraxpy.bench.workloads import Workload, default_workloads
from loraxpy.proto.worker_settings import WorkerSettings
from loraxpy.worker.config import torch_dtype
from loraxpy.worker.runner import RunnerOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    shapes: tuple[str, ...]
    device: torch.device
    batch_sizes: tuple[int, ...]
    context_lens: tuple[int, ...]
    adapter_counts: tuple[int, ...]
    kinds: tuple[str, ...]
    rank: int
    mixed_ranks: tuple[int, ...]
    mixed_adapters: int
    zipf_s: float
    warmup_steps: int
    decode_steps: int
    prefill_chunk: int
    max_adapter_files: int
    baseline: bool
    baseline_batch: int
    baseline_prompt_len: int
    baseline_new_tokens: int
    baseline_adapters: int
    seed: int
    # The runner's own settings, declared once for lorax-worker (proto/worker_settings.py): dtype,
    # attention backend, CPU weight layout, decode CUDA graphs, block size (bench/cli.py's
    # ENGINE_SETTINGS); a benchmark runs the engine a server would run with the same flags.
    engine: WorkerSettings = field(default_factory=WorkerSettings)

    def __post_init__(self) -> None:
        positive = {
            "batch sizes": min(self.batch_sizes, default=0),
            "context lengths": min(self.context_lens, default=0),
            "decode steps": self.decode_steps,
            "prefill chunk": self.prefill_chunk,
            "rank": self.rank,
            "adapter files": self.max_adapter_files,
            "baseline batch": self.baseline_batch,
            "baseline prompt length": self.baseline_prompt_len,
            "baseline new tokens": self.baseline_new_tokens,
        }
        for what, value in positive.items():
            if value < 1:
                raise ValueError(f"{what} must be at least 1")
        if self.warmup_steps < 0 or self.baseline_adapters < 0 or min(self.adapter_counts, default=1) < 1:
            raise ValueError("warmup steps, adapter counts and baseline adapters cannot be negative")

    @property
    def dtype(self) -> torch.dtype:
        """--dtype as the worker reads it on this device (auto: bf16 on CUDA, fp32 on CPU)."""
        return torch_dtype(self.engine.dtype, self.device)

    def workloads(self) -> list[Workload]:
        return default_workloads(
            self.adapter_counts,
            kinds=self.kinds,
            rank=self.rank,
            mixed_ranks=self.mixed_ranks,
            mixed_adapters=self.mixed_adapters,
            zipf_s=self.zipf_s,
        )

    def baseline_workloads(self) -> list[Workload]:
        """The engine's runs on PEFT's configuration: base, and N distinct adapters round robin."""
        n = self.baseline_adapters
        return [Workload("base", "base", 0)] + (
            [Workload(f"uniform-{n}", "uniform", n, (self.rank,))] if n else []
        )


# Called as results arrive: (the grid's runs so far, the PEFT comparisons so far, engine runs done).
Progress = Callable[[list[RunResult], list[BaselineComparison], bool], None]


def run_shape(
    config: BenchConfig, shape: ModelShape, bandwidth: float, workdir: Path, progress: Progress | None = None
) -> tuple[list[RunResult], list[BaselineComparison]]:
    """The shape's grid, then the PEFT baseline; `progress` sees each result as it comes, so a caller
    killed at a deadline (bench/gpu_check.py) has already written what ran."""
    dtype_name = str(config.dtype).removeprefix("torch.")
    model_dir = workdir / f"{shape.name}-{dtype_name}"
    if not (model_dir / "config.json").exists():  # written last (Llama) or the folder moved in whole
        logger.info("writing random %s weights to %s", shape.name, model_dir)
        write_random_model(shape, model_dir, config.dtype, seed=config.seed, device=config.device)
    pool = AdapterPool(model_dir / "adapters", shape, config.dtype, config.max_adapter_files, config.seed)

    specs = [
        RunSpec(w, b, ctx, config.warmup_steps, config.decode_steps)
        for b in config.batch_sizes
        for ctx in config.context_lens
        for w in config.workloads()
    ]
    baseline_specs = [
        RunSpec(w, config.baseline_batch, config.baseline_prompt_len, 0, config.baseline_new_tokens - 1)
        for w in config.baseline_workloads()
    ]
    groups: dict[int, list[RunSpec]] = {}
    for spec in specs + (baseline_specs if config.baseline else []):
        groups.setdefault(spec.workload.max_rank or config.rank, []).append(spec)

    results: dict[RunSpec, RunResult] = {}
    for max_rank, group in sorted(groups.items()):
        bench = _engine(config, model_dir, pool, max_rank, group)
        for spec in group:
            result = bench.run(spec, shape.name, bandwidth, config.seed)
            logger.info(
                "%s B=%d ctx=%d %s: %.3f ms/step (bound %.3f ms)",
                shape.name,
                spec.batch_size,
                spec.context_len,
                spec.workload.name,
                result.decode_step_ms,
                result.decode_bound_ms,
            )
            results[spec] = result
            if progress is not None and spec in specs:
                progress([results[s] for s in specs if s in results], [], False)
        del bench
        _free(config.device)
    runs = [results[s] for s in specs]
    if progress is not None:
        progress(runs, [], True)
    comparisons = (
        _compare_with_peft(config, shape, model_dir, pool, baseline_specs, results) if config.baseline else []
    )
    if progress is not None and comparisons:
        progress(runs, comparisons, True)
    return runs, comparisons


def _engine(
    config: BenchConfig, model_dir: Path, pool: AdapterPool, max_rank: int, group: list[RunSpec]
) -> EngineBench:
    bs = config.engine.block_size
    num_blocks = max(
        s.batch_size * -(-(s.context_len + s.warmup_steps + s.decode_steps + 1) // bs) for s in group
    )
    options = RunnerOptions.of_settings(
        config.engine,
        config.dtype,
        config.device,
        # Slots and their rank follow the workload group; the KV cache is sized by num_blocks below.
        max_loras=max(1, *(s.workload.num_adapters for s in group)),
        max_lora_rank=max_rank,
        # CUDA: 128 rank-16 slots of 8b take 10.7 GB, more than the default tenth of an H100's memory
        # (101 slots); the grid's batches need one slot per distinct adapter.
        adapter_memory_fraction=0.3,
        adapter_root=pool.root,
    )
    pool.root.mkdir(parents=True, exist_ok=True)
    return EngineBench(
        model_dir,
        pool,
        options,
        num_blocks=num_blocks,
        prefill_chunk=config.prefill_chunk,
        max_batch=max(s.batch_size for s in group),
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _compare_with_peft(
    config: BenchConfig,
    shape: ModelShape,
    model_dir: Path,
    pool: AdapterPool,
    specs: list[RunSpec],
    engine: dict[RunSpec, RunResult],
) -> list[BaselineComparison]:
    n = config.baseline_adapters
    adapter_dirs = [pool.root / pool.folder(config.rank, j) for j in range(1, n + 1)]
    hf_specs = [
        BaselineSpec(
            config.baseline_batch,
            config.baseline_prompt_len,
            config.baseline_new_tokens,
            s.workload.num_adapters,
        )
        for s in specs
    ]
    prompts = make_prompts(shape.vocab_size, config.baseline_batch, config.baseline_prompt_len, config.seed)
    hf_results = run_baseline(model_dir, adapter_dirs, hf_specs, prompts, config.dtype, config.device)
    _free(config.device)
    comparisons = []
    for spec, hf in zip(specs, hf_results, strict=True):
        ours = engine[spec]
        comparisons.append(
            BaselineComparison(
                shape=shape.name,
                num_adapters=spec.workload.num_adapters,
                batch_size=spec.batch_size,
                prompt_len=spec.context_len,
                new_tokens=config.baseline_new_tokens,
                hf_seconds=hf.seconds,
                hf_tokens_per_s=hf.tokens_per_s,
                engine_tokens_per_s=ours.end_to_end_tokens_per_s,
                speedup=ours.end_to_end_tokens_per_s / hf.tokens_per_s,
                rows_equal=sum(a == b for a, b in zip(ours.all_tokens, hf.tokens, strict=True)),
                rows=spec.batch_size,
            )
        )
    return comparisons
