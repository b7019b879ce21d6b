"""The engine loop survives any failure in a step: only the requests involved fail, the cause goes
to the log (never to clients), and everyone else keeps being served."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto.sampling import SamplingParams
from loraxpy.router.engine import Engine, EngineError, GenerateInput, TokenEvent
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from loraxpy.router.worker_client import StepReply, StepResult, WorkerClient, WorkerError

POISON_TOP_K = 13  # a request the stand-in worker refuses, as a real one refuses a bad field
SECRET = "RuntimeError: CUDA error at /internal/path.cu:42"


class StrictWorker:
    """Validates each step whole before acting on it, like the real worker: an unknown release or a
    poisoned request makes it refuse the step (INVALID_ARGUMENT) and change nothing."""

    def __init__(self) -> None:
        self.live: set[int] = set()
        self.blocks: dict[int, list[int]] = {}
        self.refusals: list[str] = []
        self.crash_next = False

    def _refuse(self, details: str) -> None:
        self.refusals.append(details)
        raise WorkerError("worker Step failed", grpc.StatusCode.INVALID_ARGUMENT, details)

    def _validate(self, out: SchedulerOutput) -> None:
        if set(out.finished_ids) - self.live:
            self._refuse(f"finished_ids names unknown request(s) {set(out.finished_ids) - self.live}")
        for r in out.scheduled:
            if r.is_new and r.seq.sampling.top_k == POISON_TOP_K:
                self._refuse(f"request {r.seq.id}: poisoned")
            if not r.is_new and r.seq.id not in self.live:
                self._refuse(f"request {r.seq.id} is unknown")

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        await asyncio.sleep(0.002)
        self._validate(out)
        self.live -= set(out.finished_ids)
        if self.crash_next:  # fails mid-step, after admitting (the real runner's INTERNAL)
            self.crash_next = False
            self.live |= {r.seq.id for r in out.scheduled}
            raise WorkerError(f"worker Step failed: {SECRET}", grpc.StatusCode.INTERNAL, SECRET)
        results = []
        for r in out.scheduled:
            self.live.add(r.seq.id)
            blocks = self.blocks.setdefault(r.seq.id, [])
            blocks[:] = list(r.seq.blocks) if r.is_new else blocks + list(r.new_blocks)
            assert len(blocks) * 4 >= r.seq.num_computed_tokens, "the worker holds every block it was given"
            done = r.seq.num_computed_tokens >= r.seq.num_tokens
            results.append(
                StepResult(r.seq.id, r.seq.num_computed_tokens, (7, -0.5) if done else None, (), 0, ())
            )
        return StepReply(results, 0.002)


class Text:
    def __init__(self, fail_on: int | None = None) -> None:
        self.fail_on = fail_on
        self.count = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        self.count += 1
        if self.count == self.fail_on:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, SECRET)
        return "x", False

    def flush(self) -> str:
        return ""


def make_engine(worker: Any) -> Engine:
    scheduler = Scheduler(SchedulerConfig(max_step_tokens=64), BlockAllocator(256, 4))
    return Engine(worker, scheduler, frozenset())


async def run(engine: Engine, max_new_tokens: int, top_k: int = 0, text: Text | None = None) -> str:
    sampling = SamplingParams(do_sample=bool(top_k), top_k=top_k)
    inp = GenerateInput((1, 2, 3, 4, 5), max_new_tokens, sampling)
    try:
        events = [e async for e in engine.generate(inp, text or Text()) if isinstance(e, TokenEvent)]
    except EngineError as e:
        return f"error: {e}"
    return f"ok:{len(events)}"


def test_a_refused_newcomer_fails_alone_and_running_requests_go_on() -> None:
    async def scenario() -> tuple[list[str], StrictWorker, Engine]:
        worker = StrictWorker()
        engine = make_engine(worker)
        engine.start()
        long = asyncio.create_task(run(engine, 60))
        await asyncio.sleep(0.02)  # running, with blocks growing step by step
        poisoned = await run(engine, 5, top_k=POISON_TOP_K)
        after = await asyncio.gather(run(engine, 5), run(engine, 9))
        results = [await long, poisoned, *after]
        await engine.stop()
        return results, worker, engine

    results, worker, engine = asyncio.run(scenario())
    assert results[0] == "ok:60", "the running request is not failed for a newcomer's refusal"
    assert results[1].startswith("error:") and "poisoned" not in results[1]
    assert results[2:] == ["ok:5", "ok:9"]
    assert [r for r in worker.refusals if "poisoned" not in r] == [], "every release was one the worker knew"
    assert engine.is_healthy, "a refusal changes nothing on the workers: the server stays healthy"


def test_a_worker_failure_fails_its_step_without_leaking_the_cause_and_the_server_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> tuple[list[str], bool, StrictWorker, Engine]:
        worker = StrictWorker()
        engine = make_engine(worker)
        engine.start()
        worker.crash_next = True
        failed = await run(engine, 5)
        unhealthy = not engine.is_healthy
        after = await asyncio.gather(run(engine, 5), run(engine, 3))
        await engine.stop()
        return [failed, *after], unhealthy, worker, engine

    with caplog.at_level(logging.ERROR, logger="loraxpy.router.engine"):
        results, was_unhealthy, worker, engine = asyncio.run(scenario())
    assert results[0].startswith("error:") and SECRET not in results[0]
    assert SECRET in caplog.text, "the cause goes to the log"
    assert results[1:] == ["ok:5", "ok:3"]
    assert worker.refusals == [], "requests admitted before the crash were released, not forgotten"
    assert was_unhealthy and engine.is_healthy, "unhealthy until a step succeeds again"


def test_a_request_whose_token_cannot_be_handled_fails_alone() -> None:
    async def scenario() -> list[str]:
        engine = make_engine(StrictWorker())
        engine.start()
        results = await asyncio.gather(run(engine, 8, text=Text(fail_on=3)), run(engine, 8), run(engine, 4))
        results.append(await run(engine, 2))
        await engine.stop()
        return list(results)

    results = asyncio.run(scenario())
    assert results[0].startswith("error:") and SECRET not in results[0]
    assert results[1:] == ["ok:8", "ok:4", "ok:2"]


class EncodingClient(WorkerClient):
    """The real client's Step encoding in front of the stand-in worker (no gRPC underneath)."""

    def __init__(self, worker: StrictWorker) -> None:
        super().__init__(["127.0.0.1:1"])  # channels connect lazily; none is used
        self.worker = worker

    async def _all(
        self, method: str, request: object, timeout: float | None = None, metadata: Any = ()
    ) -> list[object]:
        return [pb.StepResponse()]

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        await super().step(out, metadata)  # encodes (and refuses) as the real client does
        return await self.worker.step(out, metadata)


def test_a_step_that_cannot_be_encoded_fails_only_its_request() -> None:
    async def scenario() -> tuple[list[str], StrictWorker, bool]:
        worker = StrictWorker()
        client = EncodingClient(worker)
        engine = make_engine(client)
        engine.start()
        # A value no validation lets through, forged as a bug elsewhere might: top_k beyond uint32.
        forged = SamplingParams(do_sample=True)
        object.__setattr__(forged, "top_k", 2**33)
        inp = GenerateInput((1, 2, 3), 4, forged)
        try:
            [e async for e in engine.generate(inp, Text())]
            bad = "ok"
        except EngineError as e:
            bad = f"error: {e}"
        after = await asyncio.gather(run(engine, 4), run(engine, 6))
        running = engine.is_running
        await engine.stop()
        await client.close()
        return [bad, *after], worker, running and engine.is_healthy

    results, worker, alive_and_healthy = asyncio.run(scenario())
    assert results[0].startswith("error:") and "out of range" not in results[0]
    assert results[1:] == ["ok:4", "ok:6"]
    assert alive_and_healthy and worker.refusals == []


def test_a_dead_loop_is_visible_and_refuses_new_requests_at_once() -> None:
    async def scenario() -> tuple[bool, str]:
        engine = make_engine(StrictWorker())
        engine.start()
        assert engine.is_running
        assert engine._task is not None
        engine._task.cancel()  # the loop gone, as if something had killed it
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return engine.is_running, await asyncio.wait_for(run(engine, 3), timeout=2)

    running, result = asyncio.run(scenario())
    assert not running and result.startswith("error:")


class GatedWorker(StrictWorker):
    """Holds a step with a poisoned newcomer until `gate` opens (so its client can leave meanwhile),
    then refuses it as StrictWorker does."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = asyncio.Event()
        self.gate = asyncio.Event()

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        if any(r.is_new and r.seq.sampling.top_k == POISON_TOP_K for r in out.scheduled):
            self.holding.set()
            await self.gate.wait()
        return await super().step(out, metadata, masks)


def test_a_request_aborted_while_its_refused_first_step_is_in_flight_is_never_released() -> None:
    """The client of a newcomer leaves while the newcomer's first step is in flight, and the workers
    refuse that step: they never held the request, so no later step may name it in finished_ids
    (a worker refuses a step that releases an unknown request, and the running one would fail)."""

    async def scenario() -> tuple[str, GatedWorker, Engine]:
        worker = GatedWorker()
        engine = make_engine(worker)
        engine.start()
        long = asyncio.create_task(run(engine, 40))
        await asyncio.sleep(0.02)
        leaving = asyncio.create_task(run(engine, 5, top_k=POISON_TOP_K))
        await worker.holding.wait()
        leaving.cancel()  # its client hangs up: the request is aborted while its step is in flight
        await asyncio.gather(leaving, return_exceptions=True)
        worker.gate.set()
        result = await long
        async with engine.between_steps():
            pass
        await engine.stop()
        return result, worker, engine

    result, worker, engine = asyncio.run(scenario())
    assert result == "ok:40", (
        "the running request is not failed by a release of a request the workers never had"
    )
    assert [r for r in worker.refusals if "poisoned" not in r] == [], "every release was one the worker knew"
    assert engine.scheduler.allocator.num_free == 256 and worker.live == set()
