"""The router's gRPC client for worker shards. Protobuf stops here: callers see dataclasses.

Every Step and adapter RPC goes to all shards at once (they run one forward pass together);
rank 0's answer is returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc
from loraxpy.proto.auth import call_metadata
from loraxpy.router.scheduler import SchedulerOutput

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class WorkerError(RuntimeError):
    """A shard failed or refused a call; `code` is the gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details or message

    @property
    def is_refusal(self) -> bool:
        """The call changed nothing on the workers: every shard validates a call whole before acting
        on it and answers INVALID_ARGUMENT, and a call that cannot be encoded is never sent."""
        return self.code is grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class WorkerInfo:
    model_id: str
    model_path: str
    model_type: str
    dtype: str
    device_type: str
    world_size: int
    vocab_size: int
    max_position_embeddings: int
    block_size: int
    eos_token_ids: tuple[int, ...]
    attention_backend: str
    num_adapter_slots: int = 0  # the fewest any shard has
    supports_adapters: bool = False  # every shard serves adapters (has adapter slots)
    kernel_paths: dict[str, str] = field(default_factory=dict)  # fast path → what runs it on the shards
    self_check_failures: dict[str, str] = field(default_factory=dict)  # path → why it fell back
    can_reuse_prefixes: bool = False  # every shard's K/V of a prefix depend only on it (prefix caching)
    quantize: str = ""  # the base linears' quantization (a --quantize scheme, "gguf"), "" if none
    weight_bytes_per_shard: tuple[int, ...] = ()
    kv_cache_dtype: str = ""  # the KV cache's element type: the model's dtype, or float8_e4m3fn
    kv_blocks_freed: int = 0  # blocks beyond what the model's dtype fits in the same bytes (fp8 cache)


def merge_kernel_paths(per_shard: list[dict[str, str]]) -> dict[str, str]:
    """Each fast path's implementation on every shard; "mixed: a, b" where shards differ (one
    shard's self-check switched a path its peers kept)."""
    merged: dict[str, str] = {}
    for path in sorted({p for paths in per_shard for p in paths}):
        values = sorted({paths.get(path, "") for paths in per_shard})
        merged[path] = values[0] if len(values) == 1 else "mixed: " + ", ".join(values)
    return merged


@dataclass(frozen=True)
class AdapterMerge:
    """A per-request merged adapter: which adapters, their weights, and PEFT's merge options."""

    adapter_ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    @property
    def key(self) -> str:
        """A readable name for the merge; equal merges share it (and the loaded result)."""
        parts = ",".join(f"{a}*{w!r}" for a, w in zip(self.adapter_ids, self.weights, strict=True))
        return f"merge:{self.strategy}(density={self.density!r},sign={self.majority_sign_method})[{parts}]"

    def to_proto(self) -> pb.MergeSpec:
        return pb.MergeSpec(
            adapter_ids=list(self.adapter_ids),
            weights=list(self.weights),
            strategy=self.strategy,
            density=self.density,
            majority_sign_method=self.majority_sign_method,
        )


@dataclass(frozen=True)
class StepReply:
    results: list[StepResult]
    worker_seconds: float  # the slowest shard's own time for the step (its forward pass and sampling)


@dataclass(frozen=True)
class StepResult:
    """One request's output from a step."""

    id: int
    num_computed_tokens: int
    token: tuple[int, float] | None
    top_logprobs: tuple[tuple[int, float], ...]
    prompt_logprobs_start: int
    prompt_logprobs: tuple[float, ...]
    embedding: tuple[float, ...] = ()  # an embedding request's pooled vector
    accepted_draft_tokens: tuple[tuple[int, float], ...] = ()  # verified guesses, before `token`
    proposed_draft_tokens: tuple[int, ...] = ()  # the adapter's Medusa heads' guesses after `token`


def step_to_proto(
    out: SchedulerOutput, masks: Mapping[int, bytes] | None = None, step_id: int = 0, after_step_id: int = 0
) -> pb.StepRequest:
    """The step on the wire; `masks`: each constrained request's allowed-token mask, by request id;
    `step_id` and `after_step_id`: its number, and the step it was sent ahead after (overlapped steps)."""
    req = pb.StepRequest(
        finished_ids=out.finished_ids,
        step_id=step_id,
        after_step_id=after_step_id,
        num_proposed_tokens=out.num_proposed_tokens,
    )
    masks = masks or {}
    for r in out.scheduled:
        seq = r.seq
        mask = masks.get(seq.id, b"")
        if r.is_new:
            req.new_requests.append(
                pb.NewRequest(
                    id=seq.id,
                    token_ids=seq.all_token_ids,
                    num_prompt_tokens=len(seq.prompt_ids),
                    params=seq.sampling.to_proto(),
                    adapter_index=seq.adapter_index,
                    block_table=seq.blocks,
                    is_embedding=seq.is_embedding,
                    num_scheduled_tokens=r.num_tokens,
                    allowed_token_mask=mask,
                    num_computed_tokens=r.num_computed_tokens,
                )
            )
        else:
            req.cached_requests.append(
                pb.CachedRequest(
                    id=seq.id,
                    new_block_ids=r.new_blocks,
                    num_scheduled_tokens=r.num_tokens,
                    allowed_token_mask=mask,
                    draft_token_ids=r.draft_token_ids,
                )
            )
    return req


def result_from_proto(o: pb.RequestOutput) -> StepResult:
    return StepResult(
        id=o.id,
        num_computed_tokens=o.num_computed_tokens,
        token=(o.token.token_id, o.token.logprob) if o.HasField("token") else None,
        top_logprobs=tuple((t.token_id, t.logprob) for t in o.top_logprobs),
        prompt_logprobs_start=o.prompt_logprobs_start,
        prompt_logprobs=tuple(o.prompt_logprobs),
        embedding=tuple(o.embedding),
        accepted_draft_tokens=tuple((t.token_id, t.logprob) for t in o.accepted_draft_tokens),
        proposed_draft_tokens=tuple(o.proposed_draft_tokens),
    )


class WorkerClient:
    """Async client over all shards of one model (addresses in rank order). Every call carries
    `secret` (the workers refuse calls without theirs); `tls` switches the channels to TLS."""

    def __init__(
        self,
        addresses: list[str],
        *,
        secret: str | None = None,
        tls: grpc.ChannelCredentials | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one worker address is needed")
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # A worker that went away is dialed again within 2 s of coming back (gRPC's default
            # backoff grows to 2 minutes), so healing does not wait on the channel.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls_server_name:  # the name the workers' certificates carry, when not the address's host
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        self.addresses = addresses
        self._auth = call_metadata(secret)
        self._channels = [
            grpc.aio.secure_channel(a, tls, options=options)
            if tls is not None
            else grpc.aio.insecure_channel(a, options=options)
            for a in addresses
        ]
        self._stubs = [worker_pb2_grpc.WorkerStub(c) for c in self._channels]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def _all(
        self,
        method: str,
        request: object,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> list[object]:
        metadata = self._auth + metadata
        calls = [
            getattr(stub, method)(request, timeout=timeout, metadata=metadata or None) for stub in self._stubs
        ]
        try:
            return list(await asyncio.gather(*calls))
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNAUTHENTICATED:
                raise WorkerError(
                    f"worker {method} refused: the router's WORKER_SECRET is not the workers'", e.code()
                ) from e
            raise WorkerError(f"worker {method} failed: {e.details()}", e.code(), e.details() or "") from e

    async def wait_ready(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self._channels)), timeout)

    async def info(self) -> WorkerInfo:
        replies = await self._all("Info", pb.InfoRequest())
        i = replies[0]
        assert isinstance(i, pb.InfoResponse)
        infos = [r for r in replies if isinstance(r, pb.InfoResponse)]
        slots = min(r.num_adapter_slots for r in infos)
        return WorkerInfo(
            model_id=i.model_id,
            model_path=i.model_path,
            model_type=i.model_type,
            dtype=i.dtype,
            device_type=i.device_type,
            world_size=i.world_size,
            vocab_size=i.vocab_size,
            max_position_embeddings=i.max_position_embeddings,
            block_size=i.block_size,
            eos_token_ids=tuple(i.eos_token_ids),
            attention_backend=i.attention_backend,
            num_adapter_slots=slots,
            supports_adapters=all(r.supports_adapters for r in infos),
            kernel_paths=merge_kernel_paths([dict(r.kernel_paths) for r in infos]),
            self_check_failures={k: v for r in reversed(infos) for k, v in r.self_check_failures.items()},
            can_reuse_prefixes=all(r.can_reuse_prefixes for r in infos),
            quantize=i.quantize,
            weight_bytes_per_shard=tuple(r.weight_bytes for r in infos),
            kv_cache_dtype=i.kv_cache_dtype,
            kv_blocks_freed=min(r.kv_blocks_freed for r in infos),
        )

    async def health(self, timeout: float = 5.0) -> bool:
        replies = await self._all("Health", pb.HealthRequest(), timeout=timeout)
        return all(isinstance(r, pb.HealthResponse) and r.ready for r in replies)

    async def warmup(self, max_prefill_tokens: int, max_num_seqs: int, num_blocks: int = 0) -> int:
        """Warms every shard; the cache holds as many blocks as the smallest shard can."""
        replies = await self._all(
            "Warmup",
            pb.WarmupRequest(
                max_prefill_tokens=max_prefill_tokens, max_num_seqs=max_num_seqs, num_blocks=num_blocks
            ),
        )
        blocks = min(r.num_blocks for r in replies if isinstance(r, pb.WarmupResponse))
        if num_blocks == 0 and len(replies) > 1:
            await self._all(
                "Warmup",
                pb.WarmupRequest(
                    max_prefill_tokens=max_prefill_tokens, max_num_seqs=max_num_seqs, num_blocks=blocks
                ),
            )
        return blocks

    async def step(
        self,
        out: SchedulerOutput,
        metadata: tuple[tuple[str, str], ...] = (),
        masks: Mapping[int, bytes] | None = None,
        step_id: int = 0,
        after_step_id: int = 0,
    ) -> StepReply:
        """Runs one step on every shard; `metadata` carries the trace context (W3C traceparent),
        `masks` the allowed-token masks of constrained requests (structured output); a step sent
        before step `after_step_id` answered runs right after it (see StepRequest)."""
        try:
            request = step_to_proto(out, masks, step_id, after_step_id)
        except (ValueError, TypeError) as e:  # a field beyond its wire type: the step never leaves
            raise WorkerError(
                f"step could not be encoded: {e}", grpc.StatusCode.INVALID_ARGUMENT, str(e)
            ) from e
        replies = await self._all("Step", request, metadata=metadata)
        reply = replies[0]
        assert isinstance(reply, pb.StepResponse)
        worker_us = max(r.step_time_us for r in replies if isinstance(r, pb.StepResponse))
        return StepReply([result_from_proto(o) for o in reply.outputs], worker_us / 1e6)

    async def load_adapter(
        self,
        adapter_index: int,
        adapter_id: str,
        source: str,
        api_token: str = "",
        merge: AdapterMerge | None = None,
    ) -> int:
        spec = pb.AdapterSpec(adapter_id=adapter_id, source=source, api_token=api_token)
        if merge is not None:
            spec.merge.CopyFrom(merge.to_proto())
        replies = await self._all(
            "LoadAdapter", pb.LoadAdapterRequest(adapter=spec, adapter_index=adapter_index)
        )
        return sum(r.memory_bytes for r in replies if isinstance(r, pb.LoadAdapterResponse))

    async def offload_adapter(self, adapter_index: int) -> None:
        await self._all("OffloadAdapter", pb.OffloadAdapterRequest(adapter_index=adapter_index))

    async def download_adapter(self, adapter_id: str, source: str, api_token: str = "") -> int:
        """Every shard checks that `api_token` may read the adapter at its source and fetches its
        files (a refusal reads like "not found"); returns the largest size a shard reports."""
        spec = pb.AdapterSpec(adapter_id=adapter_id, source=source, api_token=api_token)
        replies = await self._all("DownloadAdapter", pb.DownloadAdapterRequest(adapter=spec))
        return max(r.size_bytes for r in replies if isinstance(r, pb.DownloadAdapterResponse))

    async def adapter_chat_template(self, adapter_id: str, source: str, api_token: str = "") -> str:
        """The adapter's own chat template ("": none), fetched and access-checked as a download is."""
        spec = pb.AdapterSpec(adapter_id=adapter_id, source=source, api_token=api_token)
        replies = await self._all("DownloadAdapter", pb.DownloadAdapterRequest(adapter=spec))
        return next((r.chat_template for r in replies if isinstance(r, pb.DownloadAdapterResponse)), "")
