"""Decode steps replayed from CUDA graphs, one per batch-size bucket (opt-in: --cuda-graphs).

A step qualifies when every scheduled request computes exactly one token and there are at most
`max_batch_size` of them. Its rows are padded up to the next bucket: padding rows read token 0 at
position 0, store no K/V (slot -1), belong to sequences with no query tokens (attention skips
them) and use no adapter. The forward pass over a bucket's static inputs is captured once, with
and without adapter rows, sharing one memory pool; each step copies its inputs in and replays.
Sampling and the LM head stay eager. Where nothing can be captured (CPU) the same padded forward
runs eagerly: that is the twin the CPU tests compare with the plain step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loraxpy.kernels.attention import AttentionMetadata
from loraxpy.worker.batch import BatchPlan
from loraxpy.worker.lora import LoraManager
from loraxpy.worker.model import CausalLM, ForwardBatch

logger = logging.getLogger(__name__)

_BUCKETS = (1, 2, 4, 8, *range(16, 257, 16), *range(288, 1025, 32))


def bucket_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes that get a graph: small powers of two, then steps of 16 and 32, up to the maximum."""
    return [b for b in _BUCKETS if b < max_batch_size] + [max_batch_size]


@dataclass
class StaticInputs:
    """Device buffers a captured graph reads; bucket b uses the first b rows (b + 1 query starts)."""

    input_ids: torch.Tensor  # [capacity] int64
    positions: torch.Tensor  # [capacity] int64
    slot_mapping: torch.Tensor  # [capacity] int64, -1 on padding rows
    query_start_loc: torch.Tensor  # [capacity + 1] int64
    seq_lens: torch.Tensor  # [capacity] int64, 0 on padding rows
    block_tables: torch.Tensor  # [capacity, max_blocks_per_seq] int64

    @classmethod
    def allocate(cls, capacity: int, max_blocks_per_seq: int, device: torch.device) -> StaticInputs:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        return cls(
            zeros(capacity),
            zeros(capacity),
            zeros(capacity).fill_(-1),
            zeros(capacity + 1),
            zeros(capacity),
            zeros(capacity, max_blocks_per_seq),
        )

    def fill(self, plan: BatchPlan, bucket: int) -> None:
        """Copies a decode plan of n <= bucket rows in, padding rows n..bucket-1, in one upload."""
        n = len(plan.input_ids)
        pad = bucket - n
        flat = [
            *plan.input_ids, *[0] * pad,
            *plan.positions, *[0] * pad,
            *plan.slot_mapping, *[-1] * pad,
            *range(n + 1), *[n] * pad,
            *plan.seq_lens, *[0] * pad,
        ]  # fmt: skip
        host = torch.tensor(flat, dtype=torch.int64)
        width = max(len(t) for t in plan.block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in plan.block_tables], dtype=torch.int64)
        device = self.input_ids.device
        values = host.to(device, non_blocking=True).split([bucket, bucket, bucket, bucket + 1, bucket])
        targets = (self.input_ids, self.positions, self.slot_mapping, self.query_start_loc, self.seq_lens)
        for target, value in zip(targets, values, strict=True):
            target[: value.shape[0]].copy_(value)
        # Entries past a table's length are never read: attention stops at each sequence's length.
        self.block_tables[:n, :width].copy_(tables.to(device, non_blocking=True))

    def forward_batch(
        self, bucket: int, max_model_len: int, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> ForwardBatch:
        attn = AttentionMetadata(
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            # Host copies for kernels that size work on the host; the Triton path reads only these two.
            query_lens_host=(1,) * bucket,
            seq_lens_host=(max_model_len,) * bucket,
            max_query_len=1,
            max_seq_len=max_model_len,
        )
        return ForwardBatch(
            input_ids=self.input_ids[:bucket],
            positions=self.positions[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            attn=attn,
            kv_caches=kv_caches,
        )


class DecodeGraphs:
    """Captured decode forward passes per (bucket, uses adapters), and the padded eager twin."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        lora: LoraManager | None,
        *,
        max_batch_size: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.lora = lora
        self.buckets = bucket_sizes(max_batch_size)
        self.max_model_len = max_model_len
        self.is_captured = False
        self.inputs = StaticInputs.allocate(self.buckets[-1], max_blocks_per_seq, device)
        if lora is not None:
            lora.allocate_static_batch(self.buckets[-1], device)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def can_run(self, plan: BatchPlan) -> bool:
        return len(plan.query_lens) <= self.buckets[-1] and all(n == 1 for n in plan.query_lens)

    def bucket_for(self, num_rows: int) -> int:
        return next(b for b in self.buckets if b >= num_rows)

    def capture(self) -> None:
        """Captures every bucket, largest first so the smaller graphs reuse its memory pool (CUDA)."""
        pool = None
        stream = torch.cuda.Stream(self.inputs.input_ids.device)
        variants = (False, True) if self.lora is not None else (False,)
        for bucket in reversed(self.buckets):
            for with_adapters in variants:
                self._set_adapters([0] * bucket, bucket, with_adapters)
                batch = self.inputs.forward_batch(bucket, self.max_model_len, self.kv_caches)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # one eager pass first: lazy inits, Triton compiles
                    self.model(batch)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.model(batch)
                pool = graph.pool()
                self._graphs[(bucket, with_adapters)] = (graph, hidden)
        self.is_captured = True
        logger.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def run(self, plan: BatchPlan, token_adapter_indices: list[int]) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode plan of n rows (a view the next run overwrites)."""
        n = len(plan.input_ids)
        bucket = self.bucket_for(n)
        self.inputs.fill(plan, bucket)
        with_adapters = any(token_adapter_indices)
        self._set_adapters(token_adapter_indices + [0] * (bucket - n), bucket, with_adapters)
        if self.is_captured:
            graph, hidden = self._graphs[(bucket, with_adapters)]
            graph.replay()
        else:
            hidden = self.model(self.inputs.forward_batch(bucket, self.max_model_len, self.kv_caches))
        return hidden[:n]

    def _set_adapters(self, token_adapter_indices: list[int], bucket: int, with_adapters: bool) -> None:
        if self.lora is not None:
            self.lora.set_static_batch(token_adapter_indices if with_adapters else None, bucket)
