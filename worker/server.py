"""The gRPC Worker service: protobuf in, domain dataclasses to the runner, protobuf out.

Protobuf stops here. Every exception is mapped to a gRPC status in one place (`_rpc`): bad input
becomes INVALID_ARGUMENT and leaves the worker's state untouched, so one bad Step never stops the
worker serving the next one. A shard of a tensor-parallel group whose step fails mid-forward exits
instead: the group is broken, and only restarting all of it mends it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc
from loraxpy.proto.auth import SecretInterceptor
from loraxpy.worker import threads
from loraxpy.worker.adapter_loads import AdapterLoads
from loraxpy.worker.adapters import AdapterBusyError, AdapterError, AdapterNotFoundError, AdapterTimeoutError
from loraxpy.worker.batch import (
    CachedRequestData,
    NewRequestData,
    RequestOutputData,
    StepInput,
    WorkerInputError,
)
from loraxpy.worker.distributed import leave_broken_group
from loraxpy.worker.lora import SlotsFullError, StagedAdapter
from loraxpy.worker.merge import MergeOptions, MergeRequest
from loraxpy.worker.runner import ModelRunner, NotReadyError
from loraxpy.worker.sampling import SamplingParams
from loraxpy.worker.self_check import active_paths, experts_path, packed_path
from loraxpy.worker.step_order import StepOrder

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _rpc(method: F) -> F:
    """Maps exceptions to gRPC statuses; an unexpected one is logged with its traceback."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except AdapterNotFoundError as e:  # or not allowed: one answer, so it reveals nothing
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except AdapterBusyError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except AdapterTimeoutError as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except (WorkerInputError, AdapterError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except SlotsFullError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except NotReadyError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except NotImplementedError as e:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e))
        except Exception as e:
            logger.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper  # type: ignore[return-value]


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    try:
        return SamplingParams.from_proto(p)
    except ValueError as e:
        raise WorkerInputError(f"sampling parameters: {e}") from e


def step_from_proto(req: pb.StepRequest) -> StepInput:
    new_requests = []
    for r in req.new_requests:
        try:
            params = sampling_from_proto(r.params)
        except WorkerInputError as e:
            raise WorkerInputError(f"request {r.id}: {e}") from e
        new_requests.append(
            NewRequestData(
                id=r.id,
                token_ids=tuple(r.token_ids),
                num_prompt_tokens=r.num_prompt_tokens,
                params=params,
                adapter_index=r.adapter_index,
                block_table=tuple(r.block_table),
                num_scheduled_tokens=r.num_scheduled_tokens,
                allowed_token_mask=r.allowed_token_mask,
                is_embedding=r.is_embedding,
                num_computed_tokens=r.num_computed_tokens,
            )
        )
    return StepInput(
        finished_ids=tuple(req.finished_ids),
        new_requests=tuple(new_requests),
        cached_requests=tuple(
            CachedRequestData(
                r.id,
                tuple(r.new_block_ids),
                r.num_scheduled_tokens,
                r.allowed_token_mask,
                tuple(r.draft_token_ids),
            )
            for r in req.cached_requests
        ),
        num_proposed_tokens=req.num_proposed_tokens,
    )


def output_to_proto(out: RequestOutputData) -> pb.RequestOutput:
    msg = pb.RequestOutput(
        id=out.id,
        num_computed_tokens=out.num_computed_tokens,
        top_logprobs=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in out.top_logprobs],
        prompt_logprobs_start=out.prompt_logprobs_start,
        prompt_logprobs=out.prompt_logprobs,
        embedding=out.embedding,
        accepted_draft_tokens=[
            pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in out.accepted_draft_tokens
        ],
        proposed_draft_tokens=out.proposed_draft_tokens,
    )
    if out.token is not None:
        msg.token.CopyFrom(pb.TokenLogprob(token_id=out.token[0], logprob=out.token[1]))
    return msg


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """`fn(*args)` and the seconds it took (a step's own time, not its wait for the model thread)."""
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


def merge_from_proto(spec: pb.AdapterSpec) -> MergeRequest | None:
    if not spec.HasField("merge"):
        return None
    m = spec.merge
    if not m.adapter_ids or len(m.adapter_ids) != len(m.weights):
        raise WorkerInputError("a merge needs at least one adapter id and one weight per id")
    options = MergeOptions(m.strategy or "linear", m.density, m.majority_sign_method or "total")
    return MergeRequest(tuple(m.adapter_ids), tuple(m.weights), options)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        runner: ModelRunner,
        model_id: str | None,
        loads: AdapterLoads | None = None,
        model_thread: futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self.runner = runner
        self.model_id = model_id or ""
        # Adapter fetches and parses: their own threads, capped and timed (never Step's threads).
        settings = runner.options.adapter_settings
        self.loads = loads or AdapterLoads(
            settings.max_concurrent_adapter_loads, settings.adapter_load_timeout_s
        )
        # One forward pass at a time, always on the thread that loaded the model (worker/threads.py);
        # Health and Info never wait for it.
        self._model_thread = model_thread or threads.model_thread()
        self._step_order = StepOrder()

    def _exclusive(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn` on the model thread, after whatever it is running now (a step, a slot write)."""
        return self._model_thread.submit(fn, *args).result()

    @_rpc
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        r = self.runner
        return pb.InfoResponse(
            model_id=self.model_id,
            model_path=str(r.model_path),
            model_type=r.config.model_type,
            dtype=str(r.options.dtype).removeprefix("torch."),
            device_type=r.options.device.type,
            rank=r.options.shard.rank,
            world_size=r.options.shard.world_size,
            vocab_size=r.config.vocab_size,
            max_position_embeddings=r.config.max_position_embeddings,
            block_size=r.options.block_size,
            num_blocks=r.limits.num_blocks if r.limits else 0,
            attention_backend=r.attention_backend,
            supports_adapters=r.lora is not None,
            eos_token_ids=list(r.config.eos_token_ids),
            num_adapter_slots=r.num_adapter_slots,
            kernel_paths=active_paths(r.attention_backend, r.lora, r.graphs, r.cpu_ops, experts_path(r.model))
            | packed_path(r.model),
            self_check_failures=r.self_check.failures,
            can_reuse_prefixes=r.can_reuse_prefixes,
            quantize=r.quantization,
            weight_bytes=r.weight_bytes,
            kv_cache_dtype=str(r.kv_spec.dtype).removeprefix("torch."),
            kv_blocks_freed=r.kv_blocks_freed,
        )

    @_rpc
    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(ready=self.runner.is_ready)

    @_rpc
    def Warmup(self, request: pb.WarmupRequest, context: grpc.ServicerContext) -> pb.WarmupResponse:
        num_blocks = self._exclusive(
            self.runner.warmup, request.max_prefill_tokens, request.max_num_seqs or 1, request.num_blocks
        )
        return pb.WarmupResponse(num_blocks=num_blocks, block_size=self.runner.options.block_size)

    @_rpc
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        trace = dict(context.invocation_metadata() or ()).get("traceparent")
        if trace:
            logger.debug("step traceparent=%s", trace)
        # A step the router sent ahead queues on the model thread right behind the one it follows.
        with self._step_order.turn(request.step_id, request.after_step_id):
            step = step_from_proto(request)
            future = self._model_thread.submit(_timed, self.runner.step, step)
        try:
            outputs, seconds = future.result()
        except (WorkerInputError, NotReadyError):  # refused before any collective
            raise
        except Exception:
            self._leave_if_sharded()
            raise
        return pb.StepResponse(outputs=[output_to_proto(o) for o in outputs], step_time_us=int(seconds * 1e6))

    def _leave_if_sharded(self) -> None:
        """A step that failed mid-forward in a tensor-parallel group (a peer died, or this shard
        left a collective its peers are in) leaves the group unusable: this shard exits, after
        answering, so that the whole group restarts (lorax-launcher, or the pods' restart policy)."""
        world_size = self.runner.options.shard.world_size
        if world_size > 1:
            reason = f"a step failed inside the {world_size}-shard group"
            threading.Timer(0.5, leave_broken_group, (reason,)).start()

    @_rpc
    def DownloadAdapter(
        self, request: pb.DownloadAdapterRequest, context: grpc.ServicerContext
    ) -> pb.DownloadAdapterResponse:
        spec = request.adapter
        merge = merge_from_proto(spec)
        size, chat_template = 0, ""
        for adapter_id in merge.adapter_ids if merge else (spec.adapter_id,):
            num_bytes, chat_template = self.loads.run(
                self.runner.download_adapter, adapter_id, spec.source or "local", spec.api_token
            )
            size += num_bytes
        # A merge has no template of its own: its requests use the base model's.
        return pb.DownloadAdapterResponse(size_bytes=size, chat_template="" if merge else chat_template)

    @_rpc
    def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext
    ) -> pb.LoadAdapterResponse:
        spec = request.adapter
        if request.adapter_index < 1:
            raise WorkerInputError("adapter index 0 is the base model; adapters use indices from 1")
        # Fetching, parsing and the upload to the device (a side stream on CUDA) run beside steps;
        # only the device-to-device slot write waits for the step in flight.
        merge = merge_from_proto(spec)
        staged = self.loads.run(
            self._read_and_stage, spec.adapter_id, spec.source or "local", spec.api_token, merge
        )
        nbytes = self._exclusive(self.runner.install_adapter, request.adapter_index, staged)
        return pb.LoadAdapterResponse(memory_bytes=nbytes)

    def _read_and_stage(
        self, adapter_id: str, source: str, api_token: str, merge: MergeRequest | None
    ) -> StagedAdapter:
        return self.runner.stage_adapter(self.runner.read_adapter(adapter_id, source, api_token, merge))

    @_rpc
    def OffloadAdapter(
        self, request: pb.OffloadAdapterRequest, context: grpc.ServicerContext
    ) -> pb.OffloadAdapterResponse:
        self._exclusive(self.runner.offload_adapter, request.adapter_index)
        return pb.OffloadAdapterResponse()


def serve(
    servicer: WorkerServicer,
    listen: str,
    secret: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> grpc.Server:
    """Starts the server on `listen` (unix:///path or host:port) and returns it; raises if it cannot bind.
    With `secret`, every RPC (Health too) must carry it (`proto/auth.py`); with `credentials`, TLS."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=[SecretInterceptor(secret)] if secret else [],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    if credentials is not None:
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    if port == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server
