"""The router's adapter registry on its own, against a recording stand-in for the workers' adapter RPCs."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from loraxpy.router.adapters import AdapterRegistry, AdapterState
from loraxpy.router.errors import NotFoundError, UnauthorizedError, ValidationError
from loraxpy.router.worker_client import WorkerError


class RecordingWorkers:
    """Records adapter RPCs; refuses the adapter ids in `broken` the way a worker does."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.on_device: set[int] = set()
        self.calls: list[tuple[str, int]] = []
        self.broken = {"corrupt": "adapter weights are unreadable", "gone": "adapter 'gone' not found"}

    async def load_adapter(
        self, index: int, adapter_id: str, source: str, api_token: str = "", merge: object = None
    ) -> int:
        await asyncio.sleep(0)
        if adapter_id in self.broken:
            raise WorkerError("LoadAdapter failed", grpc.StatusCode.INVALID_ARGUMENT, self.broken[adapter_id])
        assert len(self.on_device) < self.slots, "the registry never loads into a full device"
        self.on_device.add(index)
        self.calls.append(("load", index))
        return 1

    async def offload_adapter(self, index: int) -> None:
        self.on_device.remove(index)
        self.calls.append(("offload", index))


def registry(slots: int) -> tuple[AdapterRegistry, RecordingWorkers]:
    workers = RecordingWorkers(slots)
    return AdapterRegistry(workers, slots), workers  # type: ignore[arg-type]


def test_idle_adapters_are_offloaded_least_recently_used_first() -> None:
    async def run() -> list[tuple[str, int]]:
        reg, workers = registry(2)
        for name in ("a", "b", "a", "c"):
            await reg.release(await reg.acquire(name, "local"))
        return workers.calls

    # a, b loaded; a used again; c evicts b (least recently used), not a.
    assert asyncio.run(run()) == [("load", 1), ("load", 2), ("offload", 2), ("load", 3)]


def test_an_adapter_in_use_is_never_offloaded_and_waiters_are_served_in_order() -> None:
    async def run() -> tuple[list[str], list[tuple[str, int]]]:
        reg, workers = registry(1)
        order: list[str] = []
        held = await reg.acquire("a", "local")

        async def wants(name: str) -> None:
            index = await reg.acquire(name, "local")
            order.append(name)
            await reg.release(index)

        waiters = [asyncio.create_task(wants(n)) for n in ("b", "c")]
        await asyncio.sleep(0.05)
        assert order == [] and workers.on_device == {held}  # both wait while "a" is in use
        await reg.release(held)
        await asyncio.gather(*waiters)
        return order, workers.calls

    order, calls = asyncio.run(run())
    assert order == ["b", "c"]
    assert calls == [("load", 1), ("offload", 1), ("load", 2), ("offload", 2), ("load", 3)]


def test_a_failed_load_fails_only_its_request_with_the_workers_message() -> None:
    async def run() -> None:
        reg, _ = registry(2)
        with pytest.raises(ValidationError, match="unreadable"):
            await reg.acquire("corrupt", "local")
        with pytest.raises(NotFoundError, match="not found"):
            await reg.acquire("gone", "local")
        index = await reg.acquire("fine", "local")
        assert [e.adapter_id for e in reg.loaded()] == ["fine"]
        assert ("corrupt", "local") not in reg.entries  # a failed first load leaves no entry behind
        await reg.release(index)

    asyncio.run(run())


def test_a_private_adapter_needs_the_token_it_was_loaded_with() -> None:
    async def run() -> None:
        reg, _ = registry(2)
        await reg.release(await reg.acquire("org/private", "hub", "token-a"))
        await reg.release(await reg.acquire("org/private", "hub", "token-a"))
        for other in ("", "token-b"):
            with pytest.raises(UnauthorizedError, match="private"):
                await reg.acquire("org/private", "hub", other)
        await reg.release(await reg.acquire("org/public", "hub"))
        await reg.release(await reg.acquire("org/public", "hub", "any-token"))
        assert reg.entries[("org/private", "hub")].state is AdapterState.READY

    asyncio.run(run())


def test_a_busy_adapter_yields_its_slot_after_the_cycle_time() -> None:
    """Two clients keep adapter "hot" busy without a gap; "cold" still gets the only slot, and back."""

    async def run(cycle_time_s: float | None) -> list[str]:
        workers = RecordingWorkers(1)
        reg = AdapterRegistry(workers, 1, cycle_time_s=cycle_time_s)  # type: ignore[arg-type]
        served: list[str] = []
        stop = asyncio.Event()

        async def hot_client() -> None:
            while not stop.is_set():
                index = await reg.acquire("hot", "local")
                served.append("hot")
                await asyncio.sleep(0.004)
                await reg.release(index)

        async def cold_request() -> None:
            await reg.release(await reg.acquire("cold", "local"))

        hot = [asyncio.create_task(hot_client()) for _ in range(2)]
        await asyncio.sleep(0.03)
        try:
            await asyncio.wait_for(cold_request(), timeout=1.0)
            served.append("cold")
            await asyncio.sleep(0.03)
        finally:
            stop.set()
            await asyncio.gather(*hot, return_exceptions=True)
        return served

    served = asyncio.run(run(cycle_time_s=0.02))
    cold = served.index("cold")
    assert "hot" in served[:cold] and "hot" in served[cold:]  # hot was served before and after
    with pytest.raises(TimeoutError):  # without a cycle time, "hot" never lets go of the slot
        asyncio.run(run(cycle_time_s=None))
