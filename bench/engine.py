"""Engine-level runs: the worker's ModelRunner driven in process with Steps, as the router would.

One run = a batch of B prompts of the same length, prefilled in chunks of at most `prefill_chunk`
tokens per step, then `warmup_steps + decode_steps` decode steps of one token per request, timed
step by step (with a device synchronisation, so a step's time is all of its work). Every request
gets its whole block table up front, so no step allocates.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraxpy.bench.bounds import ByteCosts
from loraxpy.bench.shapes import ModelShape, write_random_adapter
from loraxpy.bench.workloads import Workload
from loraxpy.worker.batch import CachedRequestData, NewRequestData, StepInput
from loraxpy.worker.runner import ModelRunner, RunnerOptions
from loraxpy.worker.sampling import SamplingParams

GREEDY = SamplingParams()


@dataclass(frozen=True)
class RunSpec:
    workload: Workload
    batch_size: int
    context_len: int
    warmup_steps: int
    decode_steps: int


@dataclass
class RunResult:
    shape: str
    workload: str
    kind: str
    batch_size: int
    context_len: int
    num_adapters: int
    distinct_adapters: int  # in the batch
    weight_bytes: int
    kv_bytes: float  # mean over measured decode steps
    adapter_bytes: int  # distinct adapters of the batch, at their own ranks
    decode_step_ms: float  # median
    decode_step_ms_mean: float
    decode_tokens_per_s: float
    decode_bound_ms: float
    decode_bound_tokens_per_s: float
    decode_efficiency: float  # bound / measured
    prefill_tokens: int
    prefill_s: float
    prefill_tokens_per_s: float
    prefill_bound_s: float  # loose: prefill is compute-bound, not byte-bound
    prefill_efficiency: float
    end_to_end_tokens_per_s: float  # generated tokens / (prefill + every decode step)
    warmup_steps: int
    decode_steps: int
    first_prompt: list[int]
    first_adapter: str | None  # adapter folder of row 0, None for the base model
    first_tokens: list[int]  # greedy tokens of row 0: the prefill's token, then one per decode step
    all_tokens: list[list[int]] = field(default_factory=list, repr=False)  # not written to JSON
    engine_paths: str = ""  # which kernels ran: attention backend, LoRA backend, decode graphs


class AdapterPool:
    """PEFT folders under `root`, written on first use; adapter j of rank r uses file (j - 1) % max_files.

    Distinct adapter indices occupy distinct device slots, so a step reads distinct bytes even when
    two slots were loaded from the same file; capping the files keeps disk use bounded on 8b.
    """

    def __init__(self, root: Path, shape: ModelShape, dtype: torch.dtype, max_files: int, seed: int) -> None:
        self.root, self.shape, self.dtype, self.max_files, self.seed = root, shape, dtype, max_files, seed

    def folder(self, rank: int, adapter_index: int) -> str:
        k = (adapter_index - 1) % self.max_files
        name = f"r{rank}-{k}"
        if not (self.root / name / "adapter_config.json").exists():
            seed = self.seed * 1_000_003 + rank * 1009 + k
            write_random_adapter(self.shape, self.root / name, rank, self.dtype, seed)
        return name


def make_prompts(vocab_size: int, batch_size: int, context_len: int, seed: int) -> list[list[int]]:
    """Random prompts that depend only on the batch shape, so every workload sees the same ones."""
    rng = random.Random(f"{seed}-{batch_size}-{context_len}")
    return [[rng.randrange(vocab_size) for _ in range(context_len)] for _ in range(batch_size)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineBench:
    """One ModelRunner with `max_loras` slots of `max_rank`, and the adapters it currently holds."""

    def __init__(
        self,
        model_dir: Path,
        pool: AdapterPool,
        options: RunnerOptions,
        *,
        num_blocks: int,
        prefill_chunk: int,
        max_batch: int,
    ) -> None:
        self.pool = pool
        self.device = options.device
        self.prefill_chunk = prefill_chunk
        self.runner = ModelRunner(model_dir, options)
        self.runner.warmup(prefill_chunk, max_batch, num_blocks=num_blocks)
        self.block_size = options.block_size
        self.costs = ByteCosts.of(
            self.runner.model,
            self.runner.config,
            self.runner.kv_spec.bytes_per_block // self.block_size,
            targets=pool.shape.targets,
        )
        self.loaded: dict[int, str] = {}

    def load_workload(self, workload: Workload) -> None:
        for j in range(1, workload.num_adapters + 1):
            folder = self.pool.folder(workload.rank_of(j), j)
            if self.loaded.get(j) != folder:
                self.runner.load_adapter(j, folder, "local")
                self.loaded[j] = folder

    def run(
        self,
        spec: RunSpec,
        shape_name: str,
        bandwidth: float,
        seed: int,
        prompts: list[list[int]] | None = None,
    ) -> RunResult:
        """`prompts` (B of exactly `context_len` tokens) replaces the random ones, e.g. a tokenized text."""
        self.load_workload(spec.workload)
        b, ctx = spec.batch_size, spec.context_len
        if prompts is None:
            prompts = make_prompts(self.runner.config.vocab_size, b, ctx, seed)
        if len(prompts) != b or any(len(p) != ctx for p in prompts):
            raise ValueError(f"the engine needs {b} prompts of exactly {ctx} tokens")
        rows = spec.workload.assign(b, random.Random(f"{seed}-{spec.workload.name}-{b}"))
        ranks = {a: spec.workload.rank_of(a) for a in set(rows) if a}
        ids = list(range(1, b + 1))
        tokens: dict[int, list[int]] = {rid: [] for rid in ids}

        prefill_s, prefill_bound_bytes = self._prefill(ids, prompts, rows, spec, tokens, ranks)
        decode_times = self._decode(ids, spec.warmup_steps + spec.decode_steps, tokens)
        self.runner.step(StepInput(finished_ids=tuple(ids)))

        measured = decode_times[spec.warmup_steps :]
        step_s = statistics.median(measured)
        # seq_len after decode step j (0-based) is ctx + j + 1: the prefill sampled token ctx + 1.
        first, last = spec.warmup_steps, spec.warmup_steps + spec.decode_steps - 1
        kv_tokens = b * (ctx + 1 + (first + last) / 2)
        bound_s = self.costs.step_bytes(kv_tokens, ranks.values()) / bandwidth
        prefill_bound_s = prefill_bound_bytes / bandwidth
        generated = b * (1 + len(decode_times))
        return RunResult(
            shape=shape_name,
            workload=spec.workload.name,
            kind=spec.workload.kind,
            batch_size=b,
            context_len=ctx,
            num_adapters=spec.workload.num_adapters,
            distinct_adapters=len(ranks),
            weight_bytes=self.costs.weight_bytes,
            kv_bytes=kv_tokens * self.costs.kv_bytes_per_token,
            adapter_bytes=sum(ranks.values()) * self.costs.adapter_bytes_per_rank,
            decode_step_ms=step_s * 1e3,
            decode_step_ms_mean=statistics.fmean(measured) * 1e3,
            decode_tokens_per_s=b / step_s,
            decode_bound_ms=bound_s * 1e3,
            decode_bound_tokens_per_s=b / bound_s,
            decode_efficiency=bound_s / step_s,
            prefill_tokens=b * ctx,
            prefill_s=prefill_s,
            prefill_tokens_per_s=b * ctx / prefill_s,
            prefill_bound_s=prefill_bound_s,
            prefill_efficiency=prefill_bound_s / prefill_s,
            end_to_end_tokens_per_s=generated / (prefill_s + sum(decode_times)),
            warmup_steps=spec.warmup_steps,
            decode_steps=spec.decode_steps,
            first_prompt=prompts[0],
            first_adapter=self.loaded[rows[0]] if rows[0] else None,
            first_tokens=tokens[1],
            all_tokens=[tokens[rid] for rid in ids],
            engine_paths=self.paths(),
        )

    def paths(self) -> str:
        r = self.runner
        graphs = r.graphs
        decode = "eager" if graphs is None else "cuda-graphs" if graphs.is_captured else "graph-twin"
        return f"attention={r.attention_backend} lora={r.lora.backend if r.lora else 'none'} decode={decode}"

    def _prefill(
        self,
        ids: list[int],
        prompts: list[list[int]],
        rows: list[int],
        spec: RunSpec,
        tokens: dict[int, list[int]],
        ranks: dict[int, int],
    ) -> tuple[float, float]:
        """Prefills every prompt in chunked steps; returns (seconds, the steps' byte bound in bytes)."""
        total_len = spec.context_len + spec.warmup_steps + spec.decode_steps + 1
        blocks_per_request = -(-total_len // self.block_size)
        steps: list[StepInput] = []
        step_bytes = 0.0
        done = [0] * len(ids)
        i = 0
        while i < len(ids):
            budget, new, cached, kv_tokens, adapters = self.prefill_chunk, [], [], 0, set()
            while i < len(ids) and budget > 0:
                n = min(budget, spec.context_len - done[i])
                if done[i] == 0:
                    table = tuple(range(i * blocks_per_request, (i + 1) * blocks_per_request))
                    new.append(
                        NewRequestData(ids[i], tuple(prompts[i]), len(prompts[i]), GREEDY, rows[i], table, n)
                    )
                else:
                    cached.append(CachedRequestData(ids[i], (), n))
                done[i] += n
                budget -= n
                kv_tokens += done[i]
                adapters.add(rows[i])
                if done[i] == spec.context_len:
                    i += 1
            steps.append(StepInput(new_requests=tuple(new), cached_requests=tuple(cached)))
            step_bytes += self.costs.step_bytes(kv_tokens, (ranks[a] for a in adapters if a))
        _sync(self.device)
        start = time.perf_counter()
        for step in steps:
            self._collect(self.runner.step(step), tokens)
        _sync(self.device)
        return time.perf_counter() - start, step_bytes

    def _decode(self, ids: list[int], num_steps: int, tokens: dict[int, list[int]]) -> list[float]:
        step = StepInput(cached_requests=tuple(CachedRequestData(rid, (), 1) for rid in ids))
        times = []
        for _ in range(num_steps):
            _sync(self.device)
            start = time.perf_counter()
            outputs = self.runner.step(step)
            _sync(self.device)
            times.append(time.perf_counter() - start)
            self._collect(outputs, tokens)
        return times

    @staticmethod
    def _collect(outputs: list, tokens: dict[int, list[int]]) -> None:
        for out in outputs:
            if out.token is not None:
                tokens[out.id].append(out.token[0])
