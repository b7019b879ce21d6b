"""The engine and the adapter registry together, against a stand-in worker that keeps request state.

A worker holds a finished request until a later step releases it, and refuses to offload an adapter
that a request it holds still uses. Offloads must therefore wait for the step in flight and release
finished requests first; this drives that race on purpose.
"""

from __future__ import annotations

import asyncio

import grpc

from loraxpy.router.adapters import AdapterRegistry
from loraxpy.router.engine import Engine, GenerateInput, TokenEvent
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from loraxpy.router.worker_client import StepReply, StepResult, WorkerError


class StatefulWorker:
    """Keeps requests from their first step until released, as the real worker does."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.requests: dict[int, int] = {}  # request id -> adapter index
        self.on_device: set[int] = set()
        self.step_seconds = 0.005

    async def step(
        self, out: SchedulerOutput, metadata: tuple[tuple[str, str], ...] = (), masks: object = None
    ) -> StepReply:
        # The step reaches the worker a little later: an offload sent meanwhile may be served first.
        await asyncio.sleep(self.step_seconds)
        for rid in out.finished_ids:
            self.requests.pop(rid, None)
        results = []
        for r in out.scheduled:
            if r.seq.adapter_index and r.seq.adapter_index not in self.on_device:
                raise WorkerError("Step failed", grpc.StatusCode.INVALID_ARGUMENT, "adapter not loaded")
            self.requests[r.seq.id] = r.seq.adapter_index
            done = r.seq.num_computed_tokens + r.num_tokens >= r.seq.num_tokens
            token = (7, -0.5) if done else None
            results.append(StepResult(r.seq.id, r.seq.num_computed_tokens + r.num_tokens, token, (), 0, ()))
        return StepReply(results, self.step_seconds)

    async def load_adapter(
        self, index: int, adapter_id: str, source: str, api_token: str = "", merge: object = None
    ) -> int:
        assert len(self.on_device) < self.slots, "the registry never loads into a full device"
        self.on_device.add(index)
        return 1

    async def offload_adapter(self, index: int) -> None:
        if index in self.requests.values():
            raise WorkerError(
                "OffloadAdapter failed",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"adapter index {index} is used by a running request",
            )
        self.on_device.remove(index)


class _Text:
    def push(self, token_id: int) -> tuple[str, bool]:
        return "x", False

    def flush(self) -> str:
        return ""


def test_offloads_wait_for_the_step_in_flight_and_release_finished_requests() -> None:
    async def run() -> list[str]:
        worker = StatefulWorker(slots=1)
        scheduler = Scheduler(SchedulerConfig(max_step_tokens=64), BlockAllocator(256, 4))
        engine = Engine(worker, scheduler, frozenset())  # type: ignore[arg-type]
        registry = AdapterRegistry(worker, 1, between_steps=engine.between_steps)  # type: ignore[arg-type]
        engine.start()

        async def generate(name: str | None, max_new_tokens: int) -> str:
            index = await registry.acquire(name, "local") if name else 0
            try:
                inp = GenerateInput((1, 2, 3), max_new_tokens, adapter_index=index)
                events = [e async for e in engine.generate(inp, _Text()) if isinstance(e, TokenEvent)]
                return f"{name}:{len(events)}"
            finally:
                if index:
                    await registry.release(index)

        # A long base-model request keeps a step in flight nearly all the time while twenty adapters
        # take turns in one slot, each finishing and being evicted right after.
        background = asyncio.create_task(generate(None, 400))
        done = [await generate(f"a{i % 10}-{i}", 2) for i in range(20)]
        done += await asyncio.gather(*(generate(f"b{i}", 3) for i in range(8)))
        done.append(await background)
        await engine.stop()
        return done

    done = asyncio.run(run())
    assert done[:20] == [f"a{i % 10}-{i}:2" for i in range(20)]
    assert done[20:28] == [f"b{i}:3" for i in range(8)]
    assert done[28] == "None:400"


def test_a_request_for_a_loaded_adapter_never_waits_for_another_adapters_download() -> None:
    async def run() -> None:
        release_download = asyncio.Event()

        class SlowWorker(StatefulWorker):
            async def load_adapter(
                self, index: int, adapter_id: str, source: str, api_token: str = "", merge: object = None
            ) -> int:
                if adapter_id == "slow":
                    await release_download.wait()
                return await super().load_adapter(index, adapter_id, source, api_token)

        worker = SlowWorker(slots=2)
        registry = AdapterRegistry(worker, 2)  # type: ignore[arg-type]
        fast = await registry.acquire("fast", "local")
        await registry.release(fast)
        slow = asyncio.create_task(registry.acquire("slow", "local"))
        await asyncio.sleep(0.01)
        assert not slow.done()
        again = await asyncio.wait_for(registry.acquire("fast", "local"), timeout=1)  # not stuck behind it
        assert again == fast
        await registry.release(again)
        release_download.set()
        await registry.release(await slow)

    asyncio.run(run())


def test_a_client_leaving_mid_load_leaves_registry_and_worker_agreeing() -> None:
    async def run() -> None:
        gate = asyncio.Event()

        class GatedWorker(StatefulWorker):
            async def load_adapter(
                self, index: int, adapter_id: str, source: str, api_token: str = "", merge: object = None
            ) -> int:
                await gate.wait()
                return await super().load_adapter(index, adapter_id, source, api_token)

        worker = GatedWorker(slots=1)
        registry = AdapterRegistry(worker, 1)  # type: ignore[arg-type]
        leaving = asyncio.create_task(registry.acquire("a", "local"))
        await asyncio.sleep(0.01)
        leaving.cancel()
        gate.set()
        await asyncio.sleep(0.01)
        assert {e.index for e in registry.loaded()} == worker.on_device == {1}
        # The slot is accounted for: the next adapter evicts "a" instead of overfilling the device.
        await registry.release(await registry.acquire("b", "local"))
        assert {e.index for e in registry.loaded()} == worker.on_device == {2}

    asyncio.run(run())
