"""The engine's queue deadline: a request still waiting for its first step at its deadline fails
with QueueTimeout and leaves the queue; one already in a step runs to its end, however late."""

from __future__ import annotations

import asyncio

from loraxpy.router.engine import Engine, GenerateInput, QueueTimeout, TokenEvent
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from loraxpy.router.worker_client import StepReply, StepResult


class SlowWorker:
    """Answers every scheduled request with token 7 after `step_s`."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        await asyncio.sleep(self.step_s)
        results = [
            StepResult(r.seq.id, r.seq.num_computed_tokens, (7, -0.1), (), 0, ()) for r in out.scheduled
        ]
        return StepReply(results, worker_seconds=0.0)


class Plain:
    def push(self, token_id: int) -> tuple[str, bool]:
        return "x", False

    def flush(self) -> str:
        return ""


async def tokens(engine: Engine, inp: GenerateInput, deadline: float | None) -> list[TokenEvent]:
    return [
        e async for e in engine.generate(inp, Plain(), queue_deadline=deadline) if isinstance(e, TokenEvent)
    ]


def test_a_request_not_in_a_step_by_its_deadline_fails_and_one_in_a_step_runs_to_its_end() -> None:
    async def run() -> None:
        # One request at a time: the second waits for the first's 10 steps of 50 ms.
        scheduler = Scheduler(SchedulerConfig(max_num_seqs=1), BlockAllocator(64, 4))
        engine = Engine(SlowWorker(0.05), scheduler, frozenset())  # type: ignore[arg-type]
        engine.start()
        loop = asyncio.get_running_loop()
        inp = GenerateInput(input_ids=(1, 2, 3), max_new_tokens=10)
        first = asyncio.ensure_future(tokens(engine, inp, loop.time() + 0.05))  # in a step at once
        await asyncio.sleep(0)
        started = loop.time()
        try:
            await tokens(engine, inp, loop.time() + 0.15)
            raise AssertionError("the waiting request should have timed out")
        except QueueTimeout:
            assert 0.15 <= loop.time() - started < 0.4
        assert scheduler.num_waiting == 0  # it left the queue
        assert len(await first) == 10  # past its own deadline, but it was in a step: it ran on
        assert len(await tokens(engine, inp, loop.time() + 1.0)) == 10  # the queue serves on
        await engine.stop()

    asyncio.run(run())
