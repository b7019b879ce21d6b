"""The router's adapter registry on its own, against a recording stand-in for the workers' adapter RPCs."""

from __future__ import annotations

import asyncio
import posixpath
import random

import grpc
import pytest

from loraxpy.proto.adapter_policy import AdapterIdError, AdapterPolicy, AdapterRef, not_found_message
from loraxpy.router.adapters import AdapterRegistry
from loraxpy.router.errors import NotFoundError, OverloadedError, ValidationError
from loraxpy.router.worker_client import AdapterMerge, WorkerError


class RecordingWorkers:
    """Records adapter RPCs; refuses the adapter ids in `broken` the way a worker does; a hub
    adapter in `readers` may be read only with one of its tokens ("" for no token)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.on_device: set[int] = set()
        self.calls: list[tuple[str, int]] = []
        self.broken = {"corrupt": "adapter weights are unreadable"}
        self.readers = {"org/private": {"token-a"}, "org/public": {"", "token-a", "token-b", "token-x"}}
        self.checks: list[tuple[str, str]] = []

    async def download_adapter(self, adapter_id: str, source: str, api_token: str = "") -> int:
        await asyncio.sleep(0)
        self.checks.append((adapter_id, api_token))
        if api_token not in self.readers.get(adapter_id, ()):
            raise WorkerError(
                "DownloadAdapter failed", grpc.StatusCode.NOT_FOUND, not_found_message(adapter_id)
            )
        return 1

    async def load_adapter(
        self, index: int, adapter_id: str, source: str, api_token: str = "", merge: object = None
    ) -> int:
        await asyncio.sleep(0)
        if adapter_id in self.broken:
            raise WorkerError("LoadAdapter failed", grpc.StatusCode.INVALID_ARGUMENT, self.broken[adapter_id])
        if adapter_id == "gone":
            raise WorkerError("LoadAdapter failed", grpc.StatusCode.NOT_FOUND, not_found_message("gone"))
        if adapter_id == "slow":
            raise WorkerError("LoadAdapter failed", grpc.StatusCode.DEADLINE_EXCEEDED, "took longer than 1 s")
        assert len(self.on_device) < self.slots, "the registry never loads into a full device"
        self.on_device.add(index)
        self.calls.append(("load", index))
        return 1

    async def offload_adapter(self, index: int) -> None:
        self.on_device.remove(index)
        self.calls.append(("offload", index))


def registry(slots: int, policy: AdapterPolicy | None = None) -> tuple[AdapterRegistry, RecordingWorkers]:
    workers = RecordingWorkers(slots)
    return AdapterRegistry(workers, slots, policy=policy), workers  # type: ignore[arg-type]


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


def test_hub_adapters_are_authorized_per_token_and_no_token_owns_an_id() -> None:
    async def run() -> None:
        reg, workers = registry(2)
        # An attacker asking first with some token neither gets it nor locks the owner out.
        with pytest.raises(NotFoundError):
            await reg.acquire("org/private", "hub", "token-x")
        index = await reg.acquire("org/private", "hub", "token-a")
        await reg.release(index)
        await reg.release(await reg.acquire("org/private", "hub", "token-a"))
        assert workers.checks.count(("org/private", "token-a")) == 1  # checked once, then remembered
        # Other tokens, no token and every spelling of the id: the same 404 as an adapter that is not there.
        for adapter_id, token in [
            ("org/private", ""),
            ("org/private", "token-b"),
            ("org/private/", ""),
            ("./org/private", "token-b"),
            ("org/private/.", ""),
            ("org/absent", ""),
        ]:
            with pytest.raises(NotFoundError) as e:
                await reg.acquire(adapter_id, "hub", token)
            assert e.value.message == not_found_message(posixpath.normpath(adapter_id))
        # The owner's spellings all share the one entry.
        for variant in ("org/private/", "./org/private", "org/private/."):
            held = await reg.acquire(variant, "hub", "token-a")
            assert held == index
            await reg.release(held)
        await reg.release(await reg.acquire("org/public", "hub"))
        await reg.release(await reg.acquire("org/public", "hub", "token-b"))
        assert [e.adapter_id for e in reg.loaded()] == ["org/private", "org/public"]
        assert [e.adapter_id for e in reg.public()] == ["org/public"]  # what /v1/models lists

    asyncio.run(run())


def test_every_part_of_a_merge_is_authorized() -> None:
    async def run() -> None:
        reg, _ = registry(2)
        await reg.release(await reg.acquire("org/private", "hub", "token-a"))  # its owner loaded it
        merge = AdapterMerge(("org/public", "org/private/."), (1.0, 1.0))
        for token in ("", "token-b"):
            with pytest.raises(NotFoundError, match="org/private"):
                await reg.acquire("m", "hub", token, merge)
        index = await reg.acquire("m", "hub", "token-a", merge)
        entry = next(e for e in reg.loaded() if e.index == index)
        assert entry.merge is not None and entry.merge.adapter_ids == ("org/public", "org/private")
        assert entry not in reg.public()
        await reg.release(index)

    asyncio.run(run())


def test_the_policy_refuses_sources_and_buckets_before_any_worker_call() -> None:
    async def run() -> None:
        reg, workers = registry(2, AdapterPolicy(frozenset({"local", "s3"}), s3_buckets=("team",)))
        with pytest.raises(ValidationError) as e:
            await reg.acquire("org/public", "hub")
        assert e.value.param == "adapter_source"
        for adapter_id in ("s3://other/x", "s3://team//etc/passwd", "s3://team/../x"):
            with pytest.raises((NotFoundError, ValidationError)):
                await reg.acquire(adapter_id, "s3")
        assert workers.calls == [] and workers.checks == []
        with pytest.raises(OverloadedError, match="longer than"):
            await reg.acquire("slow", "local")

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


@pytest.mark.parametrize(
    ("source", "spellings", "canonical"),
    [
        ("local", ["x", "x/", "./x", "x/.", "a/../x"], "x"),
        ("hub", ["org/x", "org/x/", "./org/x", "org/x/.", "org//x"], "org/x"),
        ("s3", ["s3://bucket/team/x", "bucket/team/x", "s3://bucket/team/x/"], "s3://bucket/team/x"),
    ],
)
def test_every_spelling_of_an_id_has_one_canonical_name(
    source: str, spellings: list[str], canonical: str
) -> None:
    assert {str(AdapterRef.parse(s, source)) for s in spellings} == {canonical}


@pytest.mark.parametrize(
    ("source", "adapter_id"),
    [
        ("hub", "org/x/y"),
        ("hub", "../x"),
        ("hub", "/org/x"),
        ("hub", "org/x--y"),
        ("s3", "s3://bucket//abs/path"),
        ("s3", "s3://bucket/a/../b"),
        ("s3", "s3://bucket"),
        ("s3", "s3://Bad_Bucket/x"),
        ("local", "."),
        ("local", "x\x00y"),
    ],
)
def test_ids_that_name_no_adapter_are_refused(source: str, adapter_id: str) -> None:
    with pytest.raises(AdapterIdError):
        AdapterRef.parse(adapter_id, source)


def test_the_launcher_hands_its_shards_the_routers_policy() -> None:
    from loraxpy.router.config import parse_args
    from loraxpy.worker.config import parse_args as worker_args

    config = parse_args(
        ["--adapter-source", "local", "--allowed-hub-adapters", "acme", "--max-adapter-size-mib", "64"]
    )
    worker = worker_args(["--listen", "unix:///tmp/w.sock", *config.worker_adapter_args()])
    assert worker.adapter_settings.policy() == config.adapter_policy()
    assert config.adapter_policy().sources == {"local"} and worker.adapter_settings.max_adapter_size_mib == 64
    with pytest.raises(ValueError, match="--allowed-s3-buckets"):
        parse_args(["--adapter-source", "s3"])
    assert parse_args(
        ["--adapter-source", "s3", "--allowed-s3-buckets", "team"]
    ).adapter_policy().s3_buckets == ("team",)


class CappedWorkers(RecordingWorkers):
    """Refuses a load past `cap` in flight, as a worker does past --max-concurrent-adapter-loads."""

    def __init__(self, slots: int, cap: int) -> None:
        super().__init__(slots)
        self.cap, self.in_flight, self.most = cap, 0, 0

    async def load_adapter(
        self, index: int, adapter_id: str, source: str, api_token: str = "", merge: object = None
    ) -> int:
        if self.in_flight >= self.cap:
            raise WorkerError("LoadAdapter failed", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many loads")
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            return await super().load_adapter(index, adapter_id, source, api_token, merge)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_a_burst_of_new_adapters_queues_within_the_workers_load_cap(cap: int) -> None:
    async def run() -> CappedWorkers:
        workers = CappedWorkers(slots=16, cap=cap)
        reg = AdapterRegistry(workers, 16, max_concurrent_loads=cap)  # type: ignore[arg-type]

        async def use(name: str) -> None:
            await reg.release(await reg.acquire(name, "local"))

        await asyncio.gather(*(use(f"a{i}") for i in range(16)))
        return workers

    workers = asyncio.run(run())
    assert len([c for c in workers.calls if c[0] == "load"]) == 16, "every adapter loaded, none refused"
    assert workers.most == cap


class IndexedWorkers(RecordingWorkers):
    """Also refuses every id starting with `missing-` as not found (optionally after `gate` opens),
    and records which adapter each index holds, as a worker's slots do."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.held: dict[int, str] = {}
        self.gate = asyncio.Event()
        self.gate.set()

    async def load_adapter(
        self, index: int, adapter_id: str, source: str, api_token: str = "", merge: object = None
    ) -> int:
        if adapter_id.startswith("missing-"):
            await self.gate.wait()
            raise WorkerError("LoadAdapter failed", grpc.StatusCode.NOT_FOUND, not_found_message(adapter_id))
        assert index not in self.on_device, "an index is given again only once the workers dropped it"
        nbytes = await super().load_adapter(index, adapter_id, source, api_token, merge)
        self.held[index] = adapter_id
        return nbytes


def test_a_flood_of_distinct_missing_adapters_leaves_nothing_and_indices_are_reused() -> None:
    async def run() -> None:
        workers = IndexedWorkers(slots=2)
        reg = AdapterRegistry(workers, 2)  # type: ignore[arg-type]
        held = await reg.acquire("a", "local")

        async def missing(i: int) -> None:
            with pytest.raises(NotFoundError):
                await reg.acquire(f"missing-{i}", "local")

        for start in range(0, 10_000, 50):  # 50 at once: each holds an entry and an index meanwhile
            await asyncio.gather(*(missing(i) for i in range(start, start + 50)))
        assert list(reg.entries) == [("a", "local")]
        assert await reg.acquire("b", "local") == 2  # the smallest free index, not the 10,002nd
        await reg.release(held)

    asyncio.run(run())


def test_distinct_merges_leave_the_registry_with_the_device_and_their_indices_are_reused() -> None:
    """Every merge a request names is an entry of its own (its parts, weights and options): 500
    distinct ones over 2 slots leave at most the 2 on the device, and the indices stay within the
    slots plus the newcomer's (it takes one before the adapter it replaces has left)."""

    async def run() -> None:
        workers = IndexedWorkers(slots=2)
        reg = AdapterRegistry(workers, 2)  # type: ignore[arg-type]
        seen: set[int] = set()
        for i in range(500):
            merge = AdapterMerge(("a", "b"), (1.0, i / 500))
            index = await reg.acquire(merge.key, "local", merge=merge)
            assert workers.held[index].endswith(f"*{i / 500!r}]")  # this merge's weights, on its index
            seen.add(index)
            await reg.release(index)
            assert len(reg.entries) <= 2
        assert seen == {1, 2, 3}
        assert len([c for c in workers.calls if c[0] == "load"]) == 500

    asyncio.run(run())


def test_adapters_leave_the_registry_with_the_device_and_no_request_runs_on_another_ones_index() -> None:
    """60 adapters over 3 slots, 20 requests at a time: every request finds its own adapter under its
    index on the workers, the registry keeps at most the adapters on the device or wanted, and the
    indices stay within that many."""

    async def run() -> None:
        workers = IndexedWorkers(slots=3)
        reg = AdapterRegistry(workers, 3)  # type: ignore[arg-type]
        rng = random.Random(7)
        seen: set[int] = set()

        async def request(name: str) -> None:
            index = await reg.acquire(name, "local")
            seen.add(index)
            for _ in range(rng.randrange(3)):
                assert workers.held[index] == name and index in workers.on_device
                await asyncio.sleep(0)
            await reg.release(index)

        for _ in range(20):
            await asyncio.gather(*(request(f"a{rng.randrange(60)}") for _ in range(20)))
            assert len(reg.entries) <= 3
        assert len([c for c in workers.calls if c[0] == "load"]) > 100  # adapters really cycled
        assert max(seen) <= 3 + 20

    asyncio.run(run())


def test_a_request_that_leaves_while_its_adapter_fails_to_load_leaves_nothing_behind() -> None:
    async def run() -> None:
        workers = IndexedWorkers(slots=1)
        reg = AdapterRegistry(workers, 1)  # type: ignore[arg-type]
        workers.gate.clear()
        task = asyncio.ensure_future(reg.acquire("missing-x", "local"))
        await asyncio.sleep(0.01)
        task.cancel()  # the client left; the load runs on and fails
        await asyncio.gather(task, return_exceptions=True)
        workers.gate.set()
        await asyncio.sleep(0.01)
        assert reg.entries == {}
        assert await reg.acquire("a", "local") == 1

    asyncio.run(run())


def test_an_adapter_whose_reload_failed_after_a_worker_restart_leaves_with_its_last_request() -> None:
    async def run() -> None:
        workers = IndexedWorkers(slots=2)
        reg = AdapterRegistry(workers, 2)  # type: ignore[arg-type]
        index = await reg.acquire("a", "local")
        workers.on_device.clear()  # the workers restarted empty, and "a" can no longer be read
        workers.broken["a"] = "adapter weights are unreadable"
        await reg.workers_restarted()
        await reg.release(index)
        assert reg.entries == {}
        assert await reg.acquire("b", "local") == index

    asyncio.run(run())
