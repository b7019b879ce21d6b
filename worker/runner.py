"""Runs one step: releases, admits, lays out the batch, runs the model and samples. Owns request state."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraxpy.kernels import cpu_fused
from loraxpy.kernels.attention import FP8_KV_DTYPE, AttentionMetadata, select_attention_backend
from loraxpy.proto.adapter_policy import AdapterSettings
from loraxpy.proto.worker_settings import WorkerSettings
from loraxpy.worker.adapter_sources import SourceOptions
from loraxpy.worker.adapter_store import AdapterStore
from loraxpy.worker.adapters import AdapterFiles, LoraAdapter, max_adapter_bytes, read_adapter_files
from loraxpy.worker.batch import (
    BatchPlan,
    Limits,
    RequestOutputData,
    RequestState,
    StepInput,
    WorkerInputError,
    plan_batch,
    validate_step,
)
from loraxpy.worker.cuda_graphs import DecodeGraphs
from loraxpy.worker.gguf_weights import gguf_file_of, load_gguf
from loraxpy.worker.kv_cache import KVCacheSpec
from loraxpy.worker.layers import Shard
from loraxpy.worker.lora import LoraManager, StagedAdapter, num_adapter_slots
from loraxpy.worker.medusa import propose, read_medusa_heads
from loraxpy.worker.merge import MergeRequest
from loraxpy.worker.model import CausalLM, ForwardBatch
from loraxpy.worker.model_config import ModelConfig
from loraxpy.worker.pooling import Pooling
from loraxpy.worker.prepacked import prepack_model
from loraxpy.worker.quantization import check_quantization, packed_checkpoint, quantize_model, weight_bytes
from loraxpy.worker.sampling import SamplingParams, SamplingRow, make_generator, sample
from loraxpy.worker.self_check import SelfCheck, attention_of
from loraxpy.worker.speculative import DraftRequest, Verified, verify
from loraxpy.worker.weights import load_weights

logger = logging.getLogger(__name__)

_GREEDY = SamplingParams()


class NotReadyError(RuntimeError):
    """A Step arrived before Warmup allocated the KV cache."""


@dataclass(frozen=True)
class RunnerOptions:
    dtype: torch.dtype
    device: torch.device
    block_size: int = 16
    shard: Shard = field(default_factory=Shard)
    # CPU: bytes for the KV cache. CUDA: fraction of device memory the worker may use in total.
    kv_cache_bytes: int = 1 << 30
    gpu_memory_utilization: float = 0.9
    max_loras: int = 8  # adapter slots on the device; 0 disables adapters
    adapter_memory_fraction: float = 0.1  # CUDA: share of device memory adapter slots may take
    max_lora_rank: int = 64
    adapter_root: Path | None = None  # local adapters must lie inside it
    hub_cache_dir: Path | None = None
    hub_token: str | None = None  # the server's: only for hub adapters adapter_policy allows
    offline: bool = False
    cache_dir: Path = Path(".cache")  # downloaded adapters (hub, s3) live under cache_dir/adapters
    adapter_host_cache_bytes: int = 4 << 30  # parsed adapters kept in host memory (LRU)
    # Which adapters requests may use and with whose credentials; size, disk, time and load caps.
    adapter_settings: AdapterSettings = field(default_factory=AdapterSettings)
    attention_backend: str = "auto"  # auto | sdpa | triton | flash (auto: flash-attn, else Triton on CUDA)
    # Decode steps of up to this many requests replay CUDA graphs (0: off). On CPU nothing is
    # captured and such steps run the graphs' padded eager twin, which is how it is tested.
    cuda_graph_max_batch_size: int = 0
    quantize: str | None = None  # --quantize: the base linears' scheme (worker/quantization.py)
    cpu_weight_layout: str = "auto"  # CPU: weights packed once for oneDNN (worker/prepacked.py), or plain
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8: e4m3 K/V (kernels/attention.py's sdpa-fp8)

    @classmethod
    def of_settings(
        cls, settings: WorkerSettings, dtype: torch.dtype, device: torch.device, **overrides: Any
    ) -> RunnerOptions:
        """The options `settings` name (WorkerSettings, or a subclass with more fields such as
        WorkerConfig), with dtype and device in torch's terms and the caller's `overrides` on top:
        lorax-worker and lorax-bench build their runners from the same declaration."""
        given = {f.name for f in dataclasses.fields(settings)} - {"dtype", "device"}
        values: dict[str, Any] = {
            f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if f.name in given
        }
        values["kv_cache_bytes"] = settings.kv_cache_memory_mib * 2**20
        values["adapter_host_cache_bytes"] = settings.adapter_host_cache_mib * 2**20
        return cls(**{**values, **overrides, "dtype": dtype, "device": device})


class ModelRunner:
    def __init__(self, model_path: Path, options: RunnerOptions) -> None:
        self.options = options
        self.model_path = model_path
        self.config = ModelConfig.from_folder(model_path)
        self.pooling = Pooling.from_folder(model_path)
        check_quantization(model_path, options.quantize, options.device)
        backend = options.attention_backend
        if self.config.attn_softcap is not None:  # the Triton kernels have no soft-capping
            if backend in ("triton", "flash"):
                raise ValueError(
                    f"{self.config.model_type} soft-caps attention scores: use --attention-backend sdpa"
                )
            backend = "sdpa"
        attention = select_attention_backend(
            options.device,
            backend,
            options.kv_cache_dtype,
            dtype=options.dtype,
            block_size=options.block_size,
            graphs=options.cuda_graph_max_batch_size > 0,
        )
        self.attention_backend = attention.name
        started = time.perf_counter()
        self.model = CausalLM(
            self.config,
            shard=options.shard,
            attention=attention,
            dtype=options.dtype,
            device=options.device,
        )
        prequantized = packed_checkpoint(model_path, options.quantize)  # GPTQ / AWQ: read as stored
        if (gguf_file := gguf_file_of(model_path)) is not None:  # its linears stay in their blocks
            load_gguf(self.model, gguf_file, self.config)
        else:
            load_weights(
                self.model, model_path, tied_lm_head=self.config.tie_word_embeddings, packed=prequantized
            )
        quantize_model(self.model, options.quantize, prequantized)
        packed = prepack_model(self.model, options.cpu_weight_layout, options.device, options.dtype)
        self.cpu_ops = self._use_fused_ops() if options.device.type == "cpu" else ""
        self.weight_bytes = weight_bytes(self.model)
        self.quantization = "gguf" if gguf_file is not None else (options.quantize or "")
        logger.info(
            "model %s (%s, %s%s on %s, attention %s, %d CPU threads) loaded in %.1f s, %.1f MiB of weights",
            model_path,
            self.config.model_type,
            options.dtype,
            f" quantized {self.quantization}" if self.quantization else "",
            options.device,
            self.attention_backend,
            torch.get_num_threads(),
            time.perf_counter() - started,
            self.weight_bytes / 2**20,
        )
        if packed:
            logger.info(
                "CPU linears packed once for oneDNN (--cpu-weight-layout %s): %.1f MiB of packed copies",
                options.cpu_weight_layout,
                packed / 2**20,
            )
        self.kv_spec = KVCacheSpec(
            num_layers=self.config.num_layers,
            block_size=options.block_size,
            num_kv_heads=options.shard.split(self.config.num_kv_heads, "num_key_value_heads"),
            head_dim=self.config.head_dim,
            dtype=FP8_KV_DTYPE if options.kv_cache_dtype != "auto" else options.dtype,
        )
        self.kv_blocks_freed = 0  # by --kv-cache-dtype fp8: blocks beyond what the model's dtype fits
        o = options
        self.num_adapter_slots = num_adapter_slots(
            self.config, o.shard, o.max_loras, o.max_lora_rank, o.dtype, o.device, o.adapter_memory_fraction
        )
        self.lora = (
            LoraManager.attach(
                self.model, self.config, options.shard, self.num_adapter_slots, options.max_lora_rank
            )
            if self.num_adapter_slots > 0
            else None
        )
        if self.lora is not None and self.cpu_ops == "fused" and (ops := cpu_fused.load()) is not None:
            self.lora.use_fused_ops(ops)
        self.adapters = self._adapter_store()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.limits: Limits | None = None
        self.requests: dict[int, RequestState] = {}
        self.graphs: DecodeGraphs | None = None
        self.self_check = SelfCheck.for_device(options.device)  # CUDA: fast paths proven at warmup

    def _use_fused_ops(self) -> str:
        """CPU: the fused norm, activation, rotary/store and decode-attention ops where the model's
        layers take them (kernels/cpu_fused.py); "fused", or "torch" when they are off or unbuilt."""
        ops = cpu_fused.load()
        used = self.model.use_fused_ops(ops) if ops is not None else ""
        logger.info(
            "CPU ops: %s",
            "fused (kernels/cpu_fused.cpp)"
            if used
            else f"torch ({cpu_fused.unavailable_reason() or 'this model family keeps the torch path'})",
        )
        return used or "torch"

    @property
    def is_ready(self) -> bool:
        return self.limits is not None

    @property
    def can_reuse_prefixes(self) -> bool:
        """A prefix's K/V depend on its tokens and adapter only (not under LongRoPE, whose table
        is chosen by the prompt's length, and whose crossing step rewrites the whole sequence)."""
        return self.config.rope.rope_type != "longrope"

    # ---- warmup -------------------------------------------------------------------------------

    def warmup(self, max_prefill_tokens: int, max_num_seqs: int, num_blocks: int = 0) -> int:
        """Profiles the largest step, then allocates the KV cache; returns the number of blocks."""
        if max_prefill_tokens < 1 or max_num_seqs < 1:
            raise WorkerInputError("warmup needs max_prefill_tokens >= 1 and max_num_seqs >= 1")
        self.kv_caches = []
        self.requests.clear()
        # Before profiling, so a kernel that fails its check is never profiled or served.
        self.self_check.check_kernels(self.model, self.lora, self.options.block_size)
        self.attention_backend = attention_of(self.model).name
        peak = self._profile(max_prefill_tokens, max_num_seqs)
        if num_blocks == 0:
            num_blocks = self._blocks_from_memory(peak)
        if num_blocks < 1:
            raise WorkerInputError(
                "no memory is left for the KV cache; lower max_prefill_tokens or the model size"
            )
        self.kv_caches = self.kv_spec.allocate(num_blocks, self.options.device)
        self.limits = Limits(
            vocab_size=self.config.vocab_size,
            num_blocks=num_blocks,
            block_size=self.options.block_size,
            max_model_len=self.config.max_position_embeddings,
            max_step_tokens=max_prefill_tokens,
            can_reuse_prefixes=self.can_reuse_prefixes,
        )
        cache_bytes = num_blocks * self.kv_spec.bytes_per_block
        if self.options.kv_cache_dtype != "auto":  # what the model's dtype would fit in the same bytes
            plain = dataclasses.replace(self.kv_spec, dtype=self.options.dtype)
            self.kv_blocks_freed = num_blocks - plain.num_blocks_for(cache_bytes)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)%s",
            num_blocks,
            self.options.block_size,
            cache_bytes / 2**20,
            f", fp8 (e4m3): {self.kv_blocks_freed} more blocks than {self.options.dtype} in these bytes"
            if self.options.kv_cache_dtype != "auto"
            else "",
        )
        self.graphs = self.self_check.check_graphs(
            self._decode_graphs(max_num_seqs), self.kv_caches, self.options.block_size, self.config.vocab_size
        )
        return num_blocks

    def _decode_graphs(self, max_num_seqs: int) -> DecodeGraphs | None:
        """The decode graphs, captured now on CUDA; None when off or the attention cannot be captured."""
        max_batch = min(self.options.cuda_graph_max_batch_size, max_num_seqs)
        if max_batch < 1:
            return None
        if self.config.rope.rope_type == "longrope":  # its table depends on each sequence's length
            logger.warning("CUDA graphs do not capture LongRoPE's table choice; decoding eagerly")
            return None
        if self.config.moe is not None and self.options.device.type == "cuda":
            logger.warning("CUDA graphs do not capture the experts' host-side grouping; decoding eagerly")
            return None
        if self.attention_backend != "triton":  # SDPA sizes its work from host-side lengths
            logger.warning("CUDA graphs need the Triton attention backend; decoding eagerly")
            return None
        if self.lora is not None and self.lora.backend != "triton" and self.options.device.type == "cuda":
            logger.warning("CUDA graphs with adapters need the Triton LoRA path; decoding eagerly")
            return None
        assert self.limits is not None
        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.lora,
            max_batch_size=max_batch,
            max_blocks_per_seq=-(-self.limits.max_model_len // self.limits.block_size),
            max_model_len=self.limits.max_model_len,
            device=self.options.device,
        )
        if self.options.device.type == "cuda":
            graphs.capture()
        return graphs

    def _profile(self, num_tokens: int, num_seqs: int) -> int:
        """Runs a forward pass over `num_tokens` dummy tokens; returns peak device bytes (CUDA) or 0."""
        device = self.options.device
        num_seqs = min(num_seqs, num_tokens)
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        bs = self.options.block_size
        blocks_per_seq = [-(-n // bs) for n in lens]
        caches = self.kv_spec.allocate(sum(blocks_per_seq), device)
        states, next_block = [], 0
        for i, n in enumerate(lens):
            table = list(range(next_block, next_block + blocks_per_seq[i]))
            next_block += blocks_per_seq[i]
            states.append((RequestState(-1, [0] * n, n, _GREEDY, 0, table, None), n))
        if self.lora is not None:
            self.lora.set_batch([], device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = self._forward_batch(plan_batch(states, bs), caches)
        hidden = self.model(batch)
        self.model.compute_logits(hidden[-num_seqs:])
        del caches, batch, hidden
        if device.type != "cuda":
            return 0
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()
        return peak

    def _blocks_from_memory(self, peak: int) -> int:
        if self.options.device.type != "cuda":
            return self.kv_spec.num_blocks_for(self.options.kv_cache_bytes)
        _, total = torch.cuda.mem_get_info(self.options.device)
        budget = int(total * self.options.gpu_memory_utilization) - peak
        return self.kv_spec.num_blocks_for(budget)

    # ---- step ---------------------------------------------------------------------------------

    def step(self, step: StepInput) -> list[RequestOutputData]:
        if self.limits is None:
            raise NotReadyError("Warmup must run before the first Step")
        loaded = self.lora.index_to_slot.keys() if self.lora else ()
        validate_step(step, self.requests, self.limits, loaded)
        for rid in step.finished_ids:
            del self.requests[rid]
        scheduled = self._admit(step)
        if not scheduled:
            return []
        if self.config.rope.rope_type == "longrope":
            scheduled = [self._longrope_crossing(state, n) for state, n in scheduled]
        plan = plan_batch(scheduled, self.options.block_size)
        token_adapters = [s.adapter_index for s, n in scheduled for _ in range(n)]
        if self.graphs is not None and self.graphs.can_run(plan):
            hidden = self.graphs.run(plan, token_adapters)
        else:
            if self.lora is not None:
                self.lora.set_batch(token_adapters, self.options.device)
            hidden = self.model(self._forward_batch(plan, self.kv_caches))
        outputs = self._sample(scheduled, plan, hidden)
        if step.num_proposed_tokens and self.lora is not None and self.lora.medusa:
            outputs = self._propose(scheduled, plan, hidden, outputs, step.num_proposed_tokens)
        for (state, _), out in zip(scheduled, outputs, strict=True):
            state.num_computed_tokens = out.num_computed_tokens  # less the rejected draft tokens
            state.recomputing = False
            state.draft_token_ids = ()
        return outputs

    def _admit(self, step: StepInput) -> list[tuple[RequestState, int]]:
        scheduled: list[tuple[RequestState, int]] = []
        for new in step.new_requests:
            state = RequestState(
                id=new.id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens or len(new.token_ids),
                params=new.params,
                adapter_index=new.adapter_index,
                block_table=list(new.block_table),
                # Shards must draw alike: without a seed, every shard falls back to the request id.
                generator=make_generator(new.params, self.options.device, fallback_seed=new.id),
                allowed_token_mask=new.allowed_token_mask,
                is_embedding=new.is_embedding,
                num_computed_tokens=new.num_computed_tokens,
            )
            self.requests[new.id] = state
            scheduled.append((state, new.num_scheduled_tokens))
        for cached in step.cached_requests:
            state = self.requests[cached.id]
            state.block_table.extend(cached.new_block_ids)
            state.allowed_token_mask = cached.allowed_token_mask
            state.draft_token_ids = cached.draft_token_ids
            if cached.draft_token_ids:  # computed now like tokens; verified (and cut back) in _sample
                state.token_ids.extend(cached.draft_token_ids)
            scheduled.append((state, cached.num_scheduled_tokens))
        return scheduled

    def _forward_batch(
        self, plan: BatchPlan, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> ForwardBatch:
        device = self.options.device

        def ids(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return ForwardBatch(
            input_ids=ids(plan.input_ids),
            positions=ids(plan.positions),
            slot_mapping=ids(plan.slot_mapping),
            attn=AttentionMetadata.build(plan.query_lens, plan.seq_lens, plan.block_tables, device),
            kv_caches=kv_caches,
            rope_lengths=ids(plan.rope_lengths) if self.config.rope.rope_type == "longrope" else None,
        )

    def _sample(
        self, scheduled: list[tuple[RequestState, int]], plan: BatchPlan, hidden: torch.Tensor
    ) -> list[RequestOutputData]:
        sampling = [
            (i, row)
            for i, row in enumerate(plan.sample_rows)
            if row >= 0 and not scheduled[i][0].is_embedding
        ]
        tokens: dict[int, tuple[tuple[int, float], tuple[tuple[int, float], ...]]] = {}
        drafts = [(i, row) for i, row in sampling if scheduled[i][0].draft_token_ids]
        verified: dict[int, Verified] = {}
        if drafts:
            sampling = [(i, row) for i, row in sampling if not scheduled[i][0].draft_token_ids]
            states = [scheduled[i][0] for i, _ in drafts]
            verified = dict(
                zip(
                    [i for i, _ in drafts],
                    self._verify_drafts(states, [r for _, r in drafts], hidden),
                    strict=True,
                )
            )
        if sampling:
            rows = torch.tensor([row for _, row in sampling], device=hidden.device)
            logits = self.model.compute_logits(hidden[rows], rows)
            sampling_rows = [
                SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.generator)
                for s, _ in (scheduled[i] for i, _ in sampling)
            ]
            masks = [scheduled[i][0].allowed_token_mask for i, _ in sampling]
            result = sample(logits, sampling_rows, masks, self.model.fused)
            for k, (i, _) in enumerate(sampling):
                top = tuple((int(t), float(lp)) for t, lp in result.top_logprobs[k])
                tokens[i] = ((result.token_ids[k], result.logprobs[k]), top)
        outputs = []
        row0 = 0
        for i, (state, num_scheduled) in enumerate(scheduled):
            start, values = self._prompt_logprobs(state, num_scheduled, hidden, row0)
            embedding = self._pooled(state, num_scheduled, hidden, row0)
            row0 += num_scheduled
            token, top = tokens.get(i, (None, ()))
            accepted: tuple[tuple[int, float], ...] = ()
            num_computed = state.num_computed_tokens + num_scheduled
            if i in verified:  # drop the rejected guesses from the tokens and the count
                accepted, token = verified[i].accepted, verified[i].token
                num_rejected = len(state.draft_token_ids) - len(accepted)
                del state.token_ids[len(state.token_ids) - num_rejected :]
                num_computed -= num_rejected
            if token is not None:
                state.token_ids.append(token[0])
            outputs.append(
                RequestOutputData(
                    id=state.id,
                    num_computed_tokens=num_computed,
                    token=token,
                    top_logprobs=top,
                    prompt_logprobs_start=start,
                    prompt_logprobs=values,
                    embedding=embedding,
                    accepted_draft_tokens=accepted,
                )
            )
        return outputs

    def _propose(
        self,
        scheduled: list[tuple[RequestState, int]],
        plan: BatchPlan,
        hidden: torch.Tensor,
        outputs: list[RequestOutputData],
        num_tokens: int,
    ) -> list[RequestOutputData]:
        """Medusa speculation: the guesses of each adapter's heads after every token sampled under
        it, from the hidden state that token was sampled from (after its accepted guesses)."""
        assert self.lora is not None
        by_adapter: dict[int, list[tuple[int, int]]] = {}  # adapter index → (output, hidden row)
        for i, ((state, _), out) in enumerate(zip(scheduled, outputs, strict=True)):
            if out.token is None or state.adapter_index not in self.lora.medusa:
                continue
            num_rejected = len(state.draft_token_ids) - len(out.accepted_draft_tokens)
            by_adapter.setdefault(state.adapter_index, []).append((i, plan.sample_rows[i] - num_rejected))
        outputs = list(outputs)
        for adapter_index, items in by_adapter.items():
            rows = torch.tensor([row for _, row in items], device=hidden.device)

            def lm_head(states: torch.Tensor, rows: torch.Tensor = rows) -> torch.Tensor:
                return self.model.compute_logits(states, rows.repeat(states.shape[0] // rows.shape[0]))

            guesses = propose(self.lora.medusa[adapter_index], hidden[rows], num_tokens, lm_head)
            for (i, _), guess in zip(items, guesses, strict=True):
                outputs[i] = dataclasses.replace(outputs[i], proposed_draft_tokens=guess)
        return outputs

    def _verify_drafts(
        self, states: list[RequestState], last_rows: list[int], hidden: torch.Tensor
    ) -> list[Verified]:
        """Speculative decoding: each state's guesses verified against the logits at its last
        token and at each guess (rows last_row - k .. last_row of the batch)."""
        rows = torch.tensor(
            [
                r
                for s, last in zip(states, last_rows, strict=True)
                for r in range(last - len(s.draft_token_ids), last + 1)
            ],
            device=hidden.device,
        )
        logits = self.model.compute_logits(hidden[rows], rows)
        requests = [
            DraftRequest(
                SamplingRow(
                    s.params,
                    s.token_ids[: len(s.token_ids) - len(s.draft_token_ids)],
                    s.num_prompt_tokens,
                    s.generator,
                ),
                s.draft_token_ids,
            )
            for s in states
        ]
        return verify(logits, requests)

    def _pooled(
        self, state: RequestState, num_scheduled: int, hidden: torch.Tensor, row0: int
    ) -> tuple[float, ...]:
        """An embedding request's vector: its whole prompt's hidden states (all in this step), pooled."""
        if not state.is_embedding:
            return ()
        return tuple(self.pooling.pool(hidden[row0 : row0 + num_scheduled]).tolist())

    def _longrope_crossing(self, state: RequestState, num_scheduled: int) -> tuple[RequestState, int]:
        """(state, tokens to compute), recomputing the whole sequence in the step where it first
        outgrows LongRoPE's original context, as HF transformers' Phi-3 does (it drops its cache then):
        every earlier K was turned with the short table, and from here on all of them use the long one.
        The blocks are the request's own; this step computes more tokens than the router scheduled."""
        original = self.config.rope.original_max_position_embeddings
        done = state.num_computed_tokens
        was_short = max(state.num_prompt_tokens, done) <= original
        if done == 0 or not was_short or max(state.num_prompt_tokens, done + num_scheduled) <= original:
            return state, num_scheduled
        state.num_computed_tokens, state.recomputing = 0, True
        return state, done + num_scheduled

    def _prompt_logprobs(
        self, state: RequestState, num_scheduled: int, hidden: torch.Tensor, row0: int
    ) -> tuple[int, tuple[float, ...]]:
        """Log-probs of prompt tokens j in [s+1, min(e+1, P)) from the logits at j-1 (s..e computed now)."""
        if not state.params.prompt_logprobs or state.recomputing:  # sent when the prompt first ran
            return 0, ()
        s = state.num_computed_tokens
        first, last = s + 1, min(s + num_scheduled + 1, state.num_prompt_tokens)
        if first >= last:
            return 0, ()
        rows = torch.arange(row0, row0 + last - first, device=hidden.device)
        logits = self.model.compute_logits(hidden[rows], rows)
        targets = torch.tensor(state.token_ids[first:last], device=logits.device)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        return first, tuple(logprobs.tolist())

    # ---- adapters -----------------------------------------------------------------------------

    def _adapter_store(self) -> AdapterStore:
        o, settings = self.options, self.options.adapter_settings
        max_bytes = settings.max_adapter_size_mib * 2**20 or max_adapter_bytes(self.config, o.max_lora_rank)
        self.max_adapter_bytes = max_bytes
        sources = SourceOptions(
            settings.policy(), o.adapter_root, o.hub_cache_dir, o.hub_token, o.offline, max_bytes
        )
        disk_bytes = settings.adapter_disk_cache_mib * 2**20
        return AdapterStore(
            sources, o.cache_dir / "adapters", disk_bytes, o.adapter_host_cache_bytes, self._parse_adapter
        )

    def read_adapter(
        self, adapter_id: str, source: str, api_token: str = "", merge: MergeRequest | None = None
    ) -> LoraAdapter:
        """Fetches and parses (or merges) an adapter for a request holding `api_token`; touches no
        device slot, so it runs beside `step`. Parsed adapters stay in the host-memory cache."""
        if self.lora is None:
            raise WorkerInputError("this worker was started without adapter slots (--max-loras 0)")
        return self.adapters.read(adapter_id, source, api_token, merge)

    def _parse_adapter(self, files: AdapterFiles) -> LoraAdapter:
        adapter = read_adapter_files(files, self.config, self.options.max_lora_rank, self.max_adapter_bytes)
        adapter = dataclasses.replace(adapter, medusa=read_medusa_heads(files, self.config))
        return self._check_base_layers(adapter)

    def _check_base_layers(self, adapter: LoraAdapter) -> LoraAdapter:
        """Refuses an adapter whose saved LM head / embedding differs from the model's; drops them."""
        for name, saved in adapter.base_layers.items():
            own = self.model.lm_head if name == "lm_head" else self.model.embed_tokens
            rows = min(own.vocab_local, max(0, own.vocab_size - own.vocab_start))
            mine = own.weight[:rows].float().cpu()
            if saved.shape != (own.vocab_size, mine.shape[1]) or not torch.allclose(
                saved[own.vocab_start : own.vocab_start + rows].float(), mine, rtol=1e-2, atol=1e-3
            ):
                raise WorkerInputError(
                    f"adapter replaces the model's {name} weights (a resized or retrained vocabulary: "
                    f"{tuple(saved.shape)}); only adapters over the base model's own {name} can be served"
                )
        return dataclasses.replace(adapter, base_layers={})

    def stage_adapter(self, adapter: LoraAdapter) -> StagedAdapter:
        """Uploads a parsed adapter to the device without touching a slot, so it runs beside `step`."""
        if self.lora is None:
            raise WorkerInputError("this worker was started without adapter slots (--max-loras 0)")
        return self.lora.stage(adapter)

    def install_adapter(self, adapter_index: int, adapter: LoraAdapter | StagedAdapter) -> int:
        """Writes a parsed (or staged) adapter into a device slot under `adapter_index`; returns its bytes."""
        if self.lora is None:
            raise WorkerInputError("this worker was started without adapter slots (--max-loras 0)")
        if adapter_index < 1:
            raise WorkerInputError("adapter index 0 is the base model; adapters use indices from 1")
        if any(s.adapter_index == adapter_index for s in self.requests.values()):
            raise WorkerInputError(f"adapter index {adapter_index} is used by a running request")
        self.lora.load(adapter_index, adapter)
        logger.info(
            "adapter index %d: rank %d, %d modules", adapter_index, adapter.rank, len(adapter.weights)
        )
        return adapter.nbytes

    def load_adapter(
        self,
        adapter_index: int,
        adapter_id: str,
        source: str,
        api_token: str = "",
        merge: MergeRequest | None = None,
    ) -> int:
        """`read_adapter` then `install_adapter`."""
        return self.install_adapter(adapter_index, self.read_adapter(adapter_id, source, api_token, merge))

    def download_adapter(self, adapter_id: str, source: str, api_token: str = "") -> tuple[int, str]:
        """Checks that `api_token` may read the adapter and fetches its files; returns their bytes
        and the adapter's own chat template ("": none)."""
        return self.adapters.download(adapter_id, source, api_token)

    def offload_adapter(self, adapter_index: int) -> None:
        if self.lora is None or adapter_index not in self.lora.index_to_slot:
            raise WorkerInputError(f"adapter index {adapter_index} is not loaded")
        if any(s.adapter_index == adapter_index for s in self.requests.values()):
            raise WorkerInputError(f"adapter index {adapter_index} is used by a running request")
        self.lora.offload(adapter_index)
