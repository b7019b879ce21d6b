"""On CPU workers the router hands out a step's tokens before it sends the next step, so its HTTP
work never runs beside the workers' threads; on GPU workers the two overlap."""

from __future__ import annotations

import asyncio

import pytest

from loraxpy.router.engine import Engine, GenerateInput, TokenEvent
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from loraxpy.router.worker_client import StepReply, StepResult


class RecordingWorker:
    """Samples token 7 for every request that caught up; records what consumers had seen at each call."""

    def __init__(self, received: list[int]) -> None:
        self.received = received
        self.sampled = 0
        self.lag_at_step: list[int] = []

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        self.lag_at_step.append(self.sampled - len(self.received))
        await asyncio.sleep(0.001)
        results = []
        for r in out.scheduled:
            done = r.seq.num_computed_tokens >= r.seq.num_tokens
            self.sampled += done
            results.append(
                StepResult(r.seq.id, r.seq.num_computed_tokens, (7, -0.5) if done else None, (), 0, ())
            )
        return StepReply(results, 0.001)


class Text:
    def push(self, token_id: int) -> tuple[str, bool]:
        return "x", False

    def flush(self) -> str:
        return ""


def lags(host_bound: bool) -> list[int]:
    async def scenario() -> list[int]:
        received: list[int] = []
        worker = RecordingWorker(received)
        scheduler = Scheduler(SchedulerConfig(max_step_tokens=64), BlockAllocator(256, 4))
        engine = Engine(worker, scheduler, frozenset(), host_bound=host_bound)  # type: ignore[arg-type]
        engine.start()

        async def consume() -> None:
            async for event in engine.generate(GenerateInput((1, 2, 3), 8), Text()):
                if isinstance(event, TokenEvent):
                    received.append(event.token_id)

        await asyncio.gather(*(consume() for _ in range(4)))
        await engine.stop()
        return worker.lag_at_step

    return asyncio.run(scenario())


@pytest.mark.parametrize("host_bound", [True, False])
def test_cpu_workers_get_the_next_step_only_after_consumers_have_their_tokens(host_bound: bool) -> None:
    lag = lags(host_bound)
    if host_bound:
        assert set(lag) == {0}, f"consumers were behind when a step was sent: {lag}"
    else:  # a GPU's step overlaps the handlers: they catch up while the next step runs
        assert max(lag) > 0


@pytest.mark.parametrize(("cores", "shards", "threads"), [(2, 1, 2), (2, 3, 1), (16, 4, 4), (6, 4, 1)])
def test_shards_split_the_hosts_cores_instead_of_each_taking_all(
    monkeypatch: pytest.MonkeyPatch, cores: int, shards: int, threads: int
) -> None:
    from loraxpy.router import launcher

    monkeypatch.setattr(launcher.os, "sched_getaffinity", lambda _pid: set(range(cores)))
    assert launcher.threads_per_shard(shards) == threads
