"""The engine loop: schedule a step, send it to the workers, hand each request its new token.

One asyncio task runs the loop; each request is an async iterator of `TokenEvent`s fed through a
queue. The scheduler stays synchronous; only the worker call is awaited. A request whose consumer
goes away (client disconnect) is finished as aborted and released at the next step.

Workers keep a finished request until a step releases it, so changing adapter slots must wait
for the step in flight and release what has finished first: `between_steps` does both.

No exception ends the loop: a step that fails fails the requests in it (their clients get an
error, the log gets the cause) and the loop goes on. Only a worker's own failure marks the server
unhealthy, until a later step succeeds; a step the workers refused (INVALID_ARGUMENT) changed
nothing there and does not. With a healer attached (`on_worker_failure`, router/healing.py), a
worker's own failure also suspends the loop: waiting requests stay queued, rather than failing
against lost workers, until the healer has the workers back and calls `resume`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from loraxpy.proto.sampling import SamplingParams
from loraxpy.router.grammar import CompiledGrammar, GrammarCompiler, GrammarMatcher, MaskTimer
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import FinishReason, Scheduler, SchedulerOutput, SequenceState, Status
from loraxpy.router.tracing import Tracer
from loraxpy.router.worker_client import StepReply, StepResult, WorkerClient, WorkerError

logger = logging.getLogger(__name__)


class TextStream(Protocol):
    """Turns one request's token ids into text pieces and spots stop sequences."""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Returns text that is now final, and whether a stop sequence has ended the text."""
        ...

    def flush(self) -> str:
        """Text held back (a possible stop-sequence prefix) once the request ends otherwise."""
        ...


class _NoText:
    """The text stream of an embedding request, which generates no tokens."""

    def push(self, token_id: int) -> tuple[str, bool]:
        raise AssertionError("an embedding request samples no token")

    def flush(self) -> str:
        return ""


_NO_TEXT = _NoText()


class EngineError(RuntimeError):
    """Generation failed for a request (a worker error, or a request the cache can never hold).

    Its message reaches the client, so it never carries an exception's text: that goes to the log.
    """


class QueueTimeout(EngineError):
    """The request was still waiting for its first step at its queue deadline (--max-queue-time-s)."""


STEP_FAILED = "generation failed; the server log has the details"
BASE_PREFIX = "base"  # the prefix-cache identity of the base model (adapters' carry their source)
# Event-loop turns given to the HTTP handlers after a step: enough to hand out tokens and write them.
_HANDLER_TURNS = 3
# Computes constrained requests' next masks while the loop hands out a step's tokens and schedules the
# next (llguidance drops the GIL); one thread, so one batch at a time, its own so that no other work
# queues in front of it.
_MASK_THREAD = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")


@dataclass(frozen=True)
class GenerateInput:
    input_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_index: int = 0
    ignore_eos: bool = False
    grammar: CompiledGrammar | None = None  # structured output: tokens are constrained to it
    # Prefix caching: who may share this request's cached K/V (AdapterRegistry.prefix_identity);
    # None with an adapter: never cached. Base-model requests share BASE_PREFIX.
    prefix_identity: str | None = None


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float
    text: str  # new final text (may be empty while a multi-byte character or a stop prefix is pending)
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: FinishReason | None = None  # set on the last event


# An embedding request's one event: its vector is then in RequestOutput.embedding.
EMBEDDED = TokenEvent(-1, 0.0, "", finish_reason=FinishReason.LENGTH)


@dataclass
class RequestOutput:
    """What a consumer may read while or after iterating a request's events."""

    id: int
    embedding: tuple[float, ...] = ()
    prompt_logprobs: dict[int, float] = field(default_factory=dict)
    num_preemptions: int = 0
    queued_ns: int = field(default_factory=time.time_ns)
    scheduled_ns: int | None = None  # first time the request was in a step


@dataclass
class _Handle:
    seq: SequenceState
    stream: TextStream
    output: RequestOutput
    trace_span: Any = None
    queue: asyncio.Queue[TokenEvent | BaseException] = field(default_factory=asyncio.Queue)
    matcher: GrammarMatcher | None = None  # structured output: where the request is in its grammar


class RequestStream:
    """One request's tokens: an async iterator of TokenEvents, the last one carrying its
    finish_reason; `output` is filled in as the request runs. A consumer that may stop early uses
    it as `async with` (leaving aborts an unfinished request); one that reads to the end, or to an
    error, may just iterate it (it leaves by itself then)."""

    def __init__(self, queued: contextlib.AbstractContextManager[None], handle: _Handle) -> None:
        self._queued = queued  # queues the request on entering; forgets (or aborts) it on leaving
        self._handle = handle
        self._state = "new"  # -> "queued" -> "left"
        self.output = handle.output

    async def __aenter__(self) -> RequestStream:
        self._enter()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._leave()

    def _enter(self) -> None:
        if self._state == "new":
            self._queued.__enter__()
            self._state = "queued"

    def _leave(self) -> None:
        if self._state == "queued":
            self.output.num_preemptions = self._handle.seq.num_preemptions
            self._queued.__exit__(None, None, None)
        self._state = "left"

    def __del__(self) -> None:  # dropped unfinished without leaving, as a closed async generator would
        self._leave()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._state == "left":
            raise StopAsyncIteration
        self._enter()
        try:
            item = await self._handle.queue.get()
            if isinstance(item, BaseException):
                raise item
        except BaseException:
            self._leave()
            raise
        if item.finish_reason is not None:
            self._leave()
        return item


class _StepLock(asyncio.Lock):
    """The loop's lock, which knows whether anyone waits for it (overlapped steps stop for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_waiting = 0

    async def acquire(self) -> Literal[True]:
        self.num_waiting += 1
        try:
            return await super().acquire()
        finally:
            self.num_waiting -= 1


@dataclass
class _InFlight:
    """A step sent to the workers whose tokens are not applied yet."""

    out: SchedulerOutput
    reply: Awaitable[StepReply]  # a task when steps may overlap (it is in flight while the next is made)
    step_id: int  # 0: unnumbered (steps do not overlap)
    started: float  # its time on the router began: scheduled, or (sent ahead) its predecessor answered


class Engine:
    def __init__(
        self,
        client: WorkerClient,
        scheduler: Scheduler,
        eos_token_ids: frozenset[int],
        on_step: Callable[[float, float, int], None] | None = None,
        tracer: Tracer | None = None,
        host_bound: bool = False,
        grammars: GrammarCompiler | None = None,
        overlap_steps: bool = False,
    ) -> None:
        self.tracer = tracer or Tracer(None)
        # Workers compute on CPU cores: the HTTP handlers hand out a step's tokens before the next
        # step is sent, so they never take a core from the workers' threads mid-step (on a GPU the
        # handlers overlap the step instead).
        self.host_bound = host_bound
        self.client = client
        self.scheduler = scheduler
        self.eos_token_ids = eos_token_ids
        self.on_step = on_step
        self._handles: dict[int, _Handle] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._step_lock = _StepLock()  # held while a step is in flight; FIFO, so no one starves
        # --overlap-steps: a decode-only step is sent before the tokens of the one in flight are back.
        self.overlap_steps = overlap_steps
        self._step_ids = itertools.count(random.randrange(1, 1 << 62))  # a new series per engine
        self.num_overlapped_steps = 0
        self.is_healthy = True
        self.on_worker_failure: Callable[[WorkerError], None] | None = None  # the healer's
        self._resumed = asyncio.Event()  # cleared while suspended (healing)
        self._resumed.set()
        self.grammars = grammars  # computes constrained requests' masks, all of a step's at once
        self.mask_time = MaskTimer()
        # The next step's masks in the making (on _MASK_THREAD); no one touches their matchers meanwhile.
        self._mask_job: Future[None] | None = None

    @property
    def num_active(self) -> int:
        return len(self._handles)

    @property
    def is_suspended(self) -> bool:
        """No steps are sent: the workers are being healed; new requests wait in the queue."""
        return not self._resumed.is_set()

    @property
    def is_running(self) -> bool:
        """The loop task is alive: started, and not ended (nothing but cancellation should end it)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-loop")
        self._task.add_done_callback(self._on_loop_end)

    def _on_loop_end(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        logger.critical("the engine loop ended", exc_info=task.exception())
        for handle in list(self._handles.values()):
            handle.queue.put_nowait(EngineError("the server's engine stopped"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for handle in list(self._handles.values()):
            handle.queue.put_nowait(EngineError("the server is shutting down"))

    def generate(
        self,
        inp: GenerateInput,
        stream: TextStream,
        trace_span: Any = None,
        queue_deadline: float | None = None,
    ) -> RequestStream:
        """The request's tokens (a RequestStream); it is queued when the stream is entered or first
        iterated. Not in a step by `queue_deadline` (event-loop time), it fails with QueueTimeout."""
        if not self.is_running:
            raise EngineError("the server's engine is not running")
        seq = SequenceState(
            id=next(self._ids),
            prompt_ids=list(inp.input_ids),
            max_new_tokens=inp.max_new_tokens,
            adapter_index=inp.adapter_index,
            sampling=inp.sampling,
            eos_token_ids=frozenset() if inp.ignore_eos else self.eos_token_ids,
            prefix_identity=BASE_PREFIX if inp.adapter_index == 0 else inp.prefix_identity,
            speculate=inp.grammar is None,  # a grammar's mask covers one token per step
        )
        matcher = inp.grammar.matcher() if inp.grammar is not None else None
        handle = _Handle(seq, stream, RequestOutput(seq.id), trace_span, matcher=matcher)
        return RequestStream(self._queued(handle, queue_deadline), handle)

    async def embed(
        self, input_ids: tuple[int, ...], adapter_index: int = 0, queue_deadline: float | None = None
    ) -> tuple[float, ...]:
        """The prompt's embedding: prefilled whole in one step, pooled by the workers, released
        right after (nothing generated, no K/V kept). The prompt must fit one step's token budget."""
        seq = SequenceState(
            id=next(self._ids), prompt_ids=list(input_ids), max_new_tokens=0, adapter_index=adapter_index
        )
        seq.is_embedding = True
        output = RequestOutput(seq.id)
        handle = _Handle(seq, _NO_TEXT, output)
        with self._queued(handle, queue_deadline):
            item = await handle.queue.get()
            if isinstance(item, BaseException):
                raise item
            return output.embedding

    @contextlib.contextmanager
    def _queued(self, handle: _Handle, queue_deadline: float | None) -> Iterator[None]:
        """Queues the handle's sequence, expired at `queue_deadline` if it has not started by then;
        on leaving, for any reason, forgets it, and a sequence that has not finished (its consumer
        left early) is aborted: its blocks are freed and the workers release it."""
        seq = handle.seq
        self._handles[seq.id] = handle
        self.scheduler.add(seq)
        expiry = None
        if queue_deadline is not None:
            expiry = asyncio.get_running_loop().call_at(queue_deadline, self._expire, handle)
        self._wake.set()
        try:
            yield
        finally:
            if expiry is not None:
                expiry.cancel()
            self._handles.pop(seq.id, None)
            if seq.finish_reason is None:
                self.scheduler.finish(seq, FinishReason.ABORTED)
                self._wake.set()

    @contextlib.asynccontextmanager
    async def between_steps(self) -> AsyncIterator[None]:
        """Holds the loop between two steps, with every finished request released on the workers."""
        async with self._step_lock:
            released = self.scheduler.take_released()
            if released:
                await self.client.step(SchedulerOutput((), released))
            yield

    # ---- healing (router/healing.py) ----------------------------------------------------------------

    def suspend(self) -> None:
        """Stops sending steps after the one in flight; requests keep arriving and wait."""
        self._resumed.clear()

    async def fail_running(self) -> None:
        """Fails the requests the workers hold (their state there is lost), after the step in flight."""
        async with self._step_lock:
            for seq in list(self.scheduler.running):
                self._fail(seq, EngineError(STEP_FAILED))

    async def restart(self, allocator: BlockAllocator) -> None:
        """The workers came back empty: running requests fail, waiting ones stay queued for a new
        KV cache (`allocator`), and nothing is left to release on them."""
        async with self._step_lock:
            for seq in list(self.scheduler.running):
                self._fail(seq, EngineError(STEP_FAILED))
            self.scheduler.restart(allocator)
            self.is_healthy = True  # the failed step was the old workers'

    def resume(self) -> None:
        self._resumed.set()
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            if not self._resumed.is_set():
                await self._resumed.wait()
                continue
            if not self.scheduler.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._step_lock:
                try:
                    stepped = await self._step()
                except Exception:  # not any one request's fault (scheduling itself): fail all, go on
                    logger.exception("engine step failed; failing every live request")
                    self._fail_all()
                    stepped = False
            if not stepped:
                await asyncio.sleep(0.001)
            elif self.host_bound:
                for _ in range(_HANDLER_TURNS):
                    await asyncio.sleep(0)

    async def _step(self) -> bool:
        """Runs one step, then any steps sent ahead of the one in flight (overlap_steps); False when
        nothing could be scheduled."""
        started = time.perf_counter()
        out = self.scheduler.schedule()
        if out.is_empty:
            self._fail_unschedulable()
            return False
        try:
            masks = await self._masks(out)
            step: _InFlight | None = self._send(out, masks, started)
        except Exception as e:  # a bug on this side of the wire: the step was never sent
            logger.exception("sending a step failed")
            await self._fail_step(out, WorkerError(f"{type(e).__name__}: {e}"))
            return True
        while step is not None:
            ahead = self._send_ahead(step)
            if not await self._receive(step, ahead):
                break
            step = ahead
        return True

    def _send(
        self, out: SchedulerOutput, masks: dict[int, bytes], started: float, after: int = 0
    ) -> _InFlight:
        """Sends `out` (numbered when steps may overlap; `after`: the step it was sent ahead after)."""
        metadata = self._note_scheduled(out)
        if not self.overlap_steps:  # awaited at once: the call starts before anything else runs
            return _InFlight(out, self.client.step(out, metadata, masks), 0, started)
        step_id = next(self._step_ids)
        reply = self.client.step(out, metadata, masks, step_id=step_id, after_step_id=after)
        return _InFlight(out, asyncio.ensure_future(reply), step_id, started)

    def _send_ahead(self, step: _InFlight) -> _InFlight | None:
        """With overlap_steps, the step after `step`, sent now when the scheduler already knows it
        (every request decodes the token `step` samples, which the workers hold) and nobody else
        waits to hold the loop between steps. Not for constrained requests: a mask needs the token."""
        if not self.overlap_steps or self._step_lock.num_waiting or not self._resumed.is_set():
            return None
        for r in step.out.scheduled:
            handle = self._handles.get(r.seq.id)
            if handle is not None and handle.matcher is not None:
                return None
        out = self.scheduler.schedule_ahead(step.out)
        if out is None:
            return None
        self.num_overlapped_steps += 1
        return self._send(out, {}, time.perf_counter(), after=step.step_id)

    async def _receive(self, step: _InFlight, ahead: _InFlight | None) -> bool:
        """Hands out `step`'s tokens; False when it failed (its requests fail, and `ahead` with them)."""
        try:
            reply = await step.reply
        except Exception as e:
            error = e if isinstance(e, WorkerError) else WorkerError(f"{type(e).__name__}: {e}")
            if not isinstance(e, WorkerError):  # a bug on this side: whether the workers got it is unknown
                logger.exception("sending a step failed")
            await self._abandon(ahead)
            await self._fail_step(step.out, error)
            return False
        if ahead is not None:  # the workers go on with it from now: its time on the router starts
            ahead.started = time.perf_counter()
        self.is_healthy = True
        # A request that ended before these results (in the step before an overlapped one, or
        # aborted meanwhile) computed one token too many: dropped, never shown.
        self._apply([r for r in reply.results if self._is_live(r.id)])
        if self.on_step is not None:  # from scheduling to tokens handed out, and the workers' part of it
            self.on_step(time.perf_counter() - step.started, reply.worker_seconds, len(step.out.scheduled))
        return True

    def _is_live(self, request_id: int) -> bool:
        handle = self._handles.get(request_id)
        return handle is not None and handle.seq.finish_reason is None

    async def _abandon(self, ahead: _InFlight | None) -> None:
        """The step before `ahead` failed, and every request in `ahead` fails with it: whatever came
        of `ahead`, its blocks go back, and its releases are sent again if the workers refused it."""
        if ahead is None:
            return
        releases: tuple[int, ...] = ()
        try:
            await ahead.reply
        except WorkerError as e:
            releases = ahead.out.finished_ids if e.is_refusal else ()
        except Exception:
            logger.exception("sending a step ahead failed")
        self.scheduler.refused(ahead.out)
        if releases:
            try:
                await self.client.step(SchedulerOutput((), releases))
            except WorkerError as e:
                logger.error("releasing %s failed: %s", list(releases), e.details)

    def _note_scheduled(self, out: SchedulerOutput) -> tuple[tuple[str, str], ...]:
        """Stamps first-scheduled times; returns the trace context of a traced request in the step."""
        now = time.time_ns()
        metadata: tuple[tuple[str, str], ...] = ()
        for r in out.scheduled:
            handle = self._handles.get(r.seq.id)
            if handle is None:
                continue
            if handle.output.scheduled_ns is None:
                handle.output.scheduled_ns = now
            if not metadata and handle.trace_span is not None:
                metadata = self.tracer.grpc_metadata(handle.trace_span)
        return metadata

    async def _masks(self, out: SchedulerOutput) -> dict[int, bytes]:
        """Allowed-token masks of the constrained requests that sample in this step: computed ahead
        (`_start_masks`) or at compile time; any that are not are computed here."""
        started = time.perf_counter()
        waited = self._masks_ready()
        matchers: dict[int, GrammarMatcher] = {}
        for r in out.scheduled:
            handle = self._handles.get(r.seq.id)
            if (
                handle is not None
                and handle.matcher is not None
                and r.seq.num_computed_tokens == r.seq.num_tokens
            ):
                matchers[r.seq.id] = handle.matcher
        if not matchers or self.grammars is None:
            if waited:
                self.mask_time.waited(started)
            return {}
        missing = [m for m in matchers.values() if m.cached_mask is None]
        if missing:
            self._compute_masks(missing)
        self.mask_time.waited(started)
        self.mask_time.sent(len(matchers))
        return {i: m.cached_mask for i, m in matchers.items() if m.cached_mask is not None}

    def _compute_masks(self, matchers: list[GrammarMatcher]) -> None:
        """Fills the matchers' masks (kept by each until its next token)."""
        assert self.grammars is not None
        started = time.perf_counter()
        self.grammars.masks(matchers)
        self.mask_time.computed(started)

    def _start_masks(self, results: list[StepResult]) -> None:
        """Starts computing, on the mask thread, the next masks of the constrained requests that
        took a token in this step and go on: the loop hands out the tokens and schedules the next
        step meanwhile, and that step waits only for what is left (masks depend on nothing else)."""
        if self.grammars is None:
            return
        matchers = []
        for res in results:
            handle = self._handles.get(res.id)
            if (
                res.token is not None
                and handle is not None
                and handle.matcher is not None
                and not handle.matcher.is_done
                and handle.seq.finish_reason is None
            ):
                matchers.append(handle.matcher)
        if matchers:
            self._mask_job = _MASK_THREAD.submit(self._compute_masks, matchers)

    def _masks_ready(self) -> bool:
        """Waits for the masks in the making, if any (True then): before a step is sent, and before
        their matchers take tokens (a step whose masks were not waited for must not move them under
        llguidance's feet). Blocking, not awaited: the step goes out the moment they are ready,
        and the time waited is the masks' alone (the loop's other work had its turn meanwhile).
        A job the thread has not started (no core was free) is called off: the loop computes the
        masks its step needs at once rather than wait for the thread to be scheduled."""
        job, self._mask_job = self._mask_job, None
        if job is None:
            return False
        if job.cancel():
            return True
        try:
            job.result()
        except Exception:  # computed again, on the loop, by whoever needs them
            logger.exception("computing grammar masks ahead failed")
        return True

    def _apply(self, results: list[StepResult]) -> None:
        self._masks_ready()
        sampled: dict[int, int] = {}
        accepted: dict[int, tuple[int, ...]] = {}  # speculative decoding: verified guesses
        proposed: dict[int, tuple[int, ...]] = {}  # Medusa heads' guesses for the next step
        num_outputs: dict[int, int] = {}  # tokens each request had before this step
        for res in results:
            handle = self._handles.get(res.id)
            if handle is None:
                continue
            for i, lp in enumerate(res.prompt_logprobs):
                handle.output.prompt_logprobs[res.prompt_logprobs_start + i] = lp
            if res.token is not None:
                sampled[res.id] = res.token[0]
                if res.proposed_draft_tokens:
                    proposed[res.id] = res.proposed_draft_tokens
                if res.accepted_draft_tokens:
                    accepted[res.id] = tuple(t for t, _ in res.accepted_draft_tokens)
                    num_outputs[res.id] = len(handle.seq.output_ids)
                if handle.matcher is not None:
                    handle.matcher.advance(res.token[0])
        self.scheduler.postprocess(sampled, accepted, proposed)
        self._end_grammars(results)
        self._start_masks(results)
        self._end_embeddings(results)
        for res in results:
            handle = self._handles.get(res.id)
            if handle is None or res.token is None:
                continue
            try:
                if res.id in num_outputs:
                    self._emit_run(handle, res, num_outputs[res.id])
                else:
                    self._emit(handle, res)
            except Exception:  # e.g. a token its detokenizer cannot handle: only this request fails
                logger.exception("request %d: handing out a token failed", res.id)
                self._fail(handle.seq, EngineError(STEP_FAILED))

    def _end_embeddings(self, results: list[StepResult]) -> None:
        """An embedding is done in its one step: its blocks are freed and it is released next step."""
        for res in results:
            handle = self._handles.get(res.id)
            if handle is None or not handle.seq.is_embedding or handle.seq.finish_reason is not None:
                continue
            handle.output.embedding = res.embedding
            self.scheduler.finish(handle.seq, FinishReason.LENGTH)
            handle.queue.put_nowait(EMBEDDED)

    def _end_grammars(self, results: list[StepResult]) -> None:
        """A request whose grammar has ended stops here, as if it had sampled EOS."""
        for res in results:
            handle = self._handles.get(res.id)
            if handle is None or handle.matcher is None or not handle.matcher.is_done:
                continue
            if handle.matcher.error:  # the workers sampled a token the mask forbade: a bug, not the client's
                logger.error("request %d left its grammar: %s", res.id, handle.matcher.error)
            if handle.seq.finish_reason is None:
                self.scheduler.finish(handle.seq, FinishReason.EOS_TOKEN)

    def _emit(self, handle: _Handle, res: StepResult) -> None:
        assert res.token is not None
        token_id, logprob = res.token
        seq = handle.seq
        text, stopped = handle.stream.push(token_id)
        if stopped and seq.finish_reason is None:
            self.scheduler.finish(seq, FinishReason.STOP_SEQUENCE)
        elif seq.finish_reason is not None and not stopped:
            text += handle.stream.flush()
        if stopped:
            seq.finish_reason = FinishReason.STOP_SEQUENCE
        handle.queue.put_nowait(TokenEvent(token_id, logprob, text, res.top_logprobs, seq.finish_reason))

    def _emit_run(self, handle: _Handle, res: StepResult, num_before: int) -> None:
        """Hands out accepted guesses and the sampled token one event each, as far as the scheduler
        appended them (EOS or the token limit ends the run there) or a stop sequence ends the text."""
        assert res.token is not None
        seq = handle.seq
        run = (*res.accepted_draft_tokens, res.token)[: max(1, len(seq.output_ids) - num_before)]
        for i, (token_id, logprob) in enumerate(run):
            text, stopped = handle.stream.push(token_id)
            if stopped:
                if seq.finish_reason is None:
                    self.scheduler.finish(seq, FinishReason.STOP_SEQUENCE)
                seq.finish_reason = FinishReason.STOP_SEQUENCE
                del seq.output_ids[num_before + i + 1 :]  # tokens after the stop were never shown
            is_last = stopped or i == len(run) - 1
            reason = seq.finish_reason if is_last else None
            if reason is not None and not stopped:
                text += handle.stream.flush()
            top = res.top_logprobs if i == len(run) - 1 else ()
            handle.queue.put_nowait(TokenEvent(token_id, logprob, text, top, reason))
            if stopped:
                return

    async def _fail_step(self, out: SchedulerOutput, error: WorkerError) -> None:
        """Fails the requests a step failed for. A refusal changed nothing on the workers: its new
        requests are the suspects and fail (everyone in it only if none was new), the rest run on,
        and its releases are sent again on their own so a refused request cannot hold them back."""
        failed = [r.seq for r in out.scheduled]
        if error.is_refusal:
            logger.error("workers refused a step: %s", error.details)
            self.scheduler.refused(out)
            failed = [r.seq for r in out.scheduled if r.is_new] or failed
        else:
            logger.error("step failed: %s", error)
            self.is_healthy = False
            if self.on_worker_failure is not None:
                self.suspend()  # until the healer has checked the workers (or brought them back)
                self.on_worker_failure(error)
        for seq in failed:
            self._fail(seq, EngineError(STEP_FAILED))
        if error.is_refusal and out.finished_ids:
            try:
                await self.client.step(SchedulerOutput((), out.finished_ids))
            except WorkerError as e:
                logger.error("releasing %s failed: %s", list(out.finished_ids), e.details)

    def _expire(self, handle: _Handle) -> None:
        """A request still waiting for its first step at its deadline leaves the queue. (Not one in
        the step in flight: a request is RUNNING from `schedule()` on, and stamped before the send.)"""
        if handle.output.scheduled_ns is None and handle.seq.status is Status.WAITING:
            self._fail(handle.seq, QueueTimeout("the request waited too long for its first step"))

    def _fail(self, seq: SequenceState, error: EngineError) -> None:
        handle = self._handles.get(seq.id)
        self.scheduler.finish(seq, FinishReason.ABORTED)
        if handle is not None:
            handle.queue.put_nowait(error)

    def _fail_all(self) -> None:
        for handle in list(self._handles.values()):
            with contextlib.suppress(Exception):  # scheduler state may be what broke
                self.scheduler.finish(handle.seq, FinishReason.ABORTED)
            handle.queue.put_nowait(EngineError(STEP_FAILED))

    def _fail_unschedulable(self) -> None:
        """Nothing running and the oldest waiting request still does not fit: it never will."""
        if self.scheduler.running:
            return
        for queue in self.scheduler.waiting.values():
            for seq in list(queue):
                message = f"request needs more KV cache than the server has ({seq.num_tokens} tokens)"
                self._fail(seq, EngineError(message))
                return
