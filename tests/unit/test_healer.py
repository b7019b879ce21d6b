"""The healer's decisions, step by step, against a stand-in worker that can die and come back empty
(the real processes are killed in tests/integration/test_healing.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from test_engine_failures import StrictWorker, make_engine, run

from loraxpy.router.adapters import _adapter_error
from loraxpy.router.engine import Engine
from loraxpy.router.healing import Healer
from loraxpy.router.scheduler import SchedulerOutput
from loraxpy.router.worker_client import StepReply, WorkerError, WorkerInfo

INFO = WorkerInfo("m", "/m", "llama", "float32", "cpu", 1, 10, 100, 4, (), "sdpa")


class RestartingWorker(StrictWorker):
    """Validates steps like the real worker; `die` loses it, `come_back` starts a new, unwarmed one."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses = ["stand-in"]
        self.is_up, self.is_warm, self.num_warmups = True, True, 0

    def die(self) -> None:
        self.is_up = False

    def come_back(self) -> None:
        self.live.clear()
        self.blocks.clear()
        self.is_up, self.is_warm = True, False

    def _check_up(self) -> None:
        if not self.is_up:
            raise WorkerError("worker Step failed: Socket closed", grpc.StatusCode.UNAVAILABLE)

    async def health(self, timeout: float = 5.0) -> bool:
        self._check_up()
        return self.is_warm

    async def wait_ready(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not self.is_up:
                await asyncio.sleep(0.01)

    async def warm(self) -> tuple[int, WorkerInfo]:
        self._check_up()
        self.is_warm, self.num_warmups = True, self.num_warmups + 1
        return 256, INFO

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        self._check_up()
        if not self.is_warm:
            raise WorkerError("Warmup must run before the first Step", grpc.StatusCode.FAILED_PRECONDITION)
        return await super().step(out, metadata, masks)


async def started(worker: RestartingWorker) -> tuple[Engine, Healer, asyncio.Task[Any]]:
    engine = make_engine(worker)
    healer = Healer(engine, None, worker.warm, INFO, probe_interval_s=0.05)
    engine.start()
    return engine, healer, asyncio.create_task(healer.run())


def test_a_failed_step_with_every_worker_there_fails_only_its_requests_and_nothing_is_warmed_again() -> None:
    async def scenario() -> tuple[list[str], RestartingWorker, Healer, bool]:
        worker = RestartingWorker()
        engine, healer, task = await started(worker)
        worker.crash_next = True
        results = [await run(engine, 5)]
        results += await asyncio.gather(run(engine, 5), run(engine, 3))
        await engine.stop()
        task.cancel()
        return results, worker, healer, engine.is_suspended

    results, worker, healer, suspended = asyncio.run(scenario())
    assert results[0].startswith("error:") and results[1:] == ["ok:5", "ok:3"]
    assert worker.num_warmups == 0 and healer.num_heals == 0 and not suspended
    assert worker.refusals == [], "the failed step's requests were released on the worker"


def test_lost_workers_fail_running_requests_while_queued_ones_wait_for_them_to_come_back() -> None:
    async def scenario() -> dict[str, Any]:
        worker = RestartingWorker()
        engine, healer, task = await started(worker)
        running = asyncio.create_task(run(engine, 200))
        await asyncio.sleep(0.05)
        worker.die()
        lost = await running
        queued = asyncio.create_task(run(engine, 7))
        await asyncio.sleep(0.3)
        waiting = not queued.done() and engine.is_suspended and healer.is_healing
        worker.come_back()
        result = {"lost": lost, "waiting": waiting, "queued": await queued, "after": await run(engine, 4)}
        result.update(heals=healer.num_heals, warmups=worker.num_warmups, refusals=worker.refusals)
        await engine.stop()
        task.cancel()
        return result

    r = asyncio.run(scenario())
    assert r["lost"].startswith("error:")
    assert r["waiting"], "a queued request waits, and the engine sends nothing, while the workers are away"
    assert (r["queued"], r["after"]) == ("ok:7", "ok:4")
    assert (r["heals"], r["warmups"]) == (1, 1)
    assert r["refusals"] == [], "nothing of the lost workers' requests is released on the new ones"


def test_an_idle_server_notices_a_worker_that_came_back_empty() -> None:
    async def scenario() -> tuple[bool, str, int]:
        worker = RestartingWorker()
        engine, _, task = await started(worker)
        assert await run(engine, 3) == "ok:3"
        await asyncio.sleep(0.05)
        worker.die()
        worker.come_back()  # restarted between two requests: nothing failed yet
        for _ in range(100):
            if worker.num_warmups:
                break
            await asyncio.sleep(0.02)
        after = await run(engine, 5)
        await engine.stop()
        task.cancel()
        return engine.is_suspended, after, worker.num_warmups

    suspended, after, warmups = asyncio.run(scenario())
    assert (warmups, after, suspended) == (1, "ok:5", False)


def test_an_adapter_load_cut_off_by_lost_workers_is_a_503_to_retry_not_the_clients_fault() -> None:
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION):
        err = _adapter_error("qv", WorkerError("worker LoadAdapter failed: Socket closed", code))
        assert (err.status, err.openai_status) == (503, 503)
        assert "Socket closed" not in str(err)


def test_workers_that_only_dropped_their_connections_are_not_warmed_again() -> None:
    async def scenario() -> dict[str, Any]:
        worker = RestartingWorker()
        engine, healer, task = await started(worker)
        running = asyncio.create_task(run(engine, 200))
        await asyncio.sleep(0.05)
        worker.die()
        lost = await running
        await asyncio.sleep(0.1)
        worker.is_up = True  # the same process, still warmed, answers again
        after = await run(engine, 6)
        result = {"lost": lost, "after": after, "heals": healer.num_heals, "warmups": worker.num_warmups}
        result["refusals"] = worker.refusals
        await engine.stop()
        task.cancel()
        return result

    r = asyncio.run(scenario())
    assert r["lost"].startswith("error:") and r["after"] == "ok:6"
    assert (r["heals"], r["warmups"]) == (1, 0), "its KV cache and adapters are still there"
    assert r["refusals"] == [], "the failed requests are released on the worker that still holds them"
