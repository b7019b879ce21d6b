"""Healing: the router gets its workers back after losing them, without a restart of its own.

A worker's own failure in a step suspends the engine (router/engine.py): the step's requests fail,
waiting ones stay queued, and /health answers 503. The healer then asks every shard for Health.
All of them there and warmed: it was one bad step, the engine resumes. A shard unreachable, or
answering that it was never warmed (a new process at the old address): the workers are lost.
Requests they held fail now; lorax-launcher restarts its shard group whole (`restart`,
router/shards.py), lorax-router waits, with backoff, for its workers to answer again (a restarted
StatefulSet, a rescheduled pod). Then Warmup and Info run again, the KV block allocator starts
over, the adapters queued requests hold are loaded again into their index (the others count as
offloaded), and the engine resumes. The launcher reports a shard process that exits (`lost`),
and an idle server probes its workers, so a loss is noticed before a request meets it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from loraxpy.router.adapters import AdapterRegistry
from loraxpy.router.engine import Engine
from loraxpy.router.kv_blocks import BlockAllocator
from loraxpy.router.worker_client import WorkerError, WorkerInfo

logger = logging.getLogger(__name__)

PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 10.0
# Waiting for lorax-router's workers: each wait this long, then a log line, then again.
READY_WAIT_S = 10.0


class HealingFailed(RuntimeError):
    """The workers cannot be brought back as they were: the process should exit non-zero."""


Warm = Callable[[], Awaitable[tuple[int, WorkerInfo]]]


class Healer:
    """Watches for lost workers and brings them back; `run` ends only by raising HealingFailed."""

    def __init__(
        self,
        engine: Engine,
        registry: AdapterRegistry | None,
        warm: Warm,
        info: WorkerInfo,
        restart: Callable[[str], Awaitable[None]] | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.engine = engine
        self.client = engine.client
        self.registry = registry
        self.warm = warm  # Warmup and Info on every shard: (KV blocks, what the workers are)
        self.info = info  # what the workers were: they must come back as the same model
        self.restart = restart  # lorax-launcher: a new shard group, ready to answer
        self.probe_interval_s = probe_interval_s
        self.is_healing = False
        self.num_heals = 0
        self._reports: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
        engine.on_worker_failure = lambda e: self._report(e.details, is_lost=False)

    def lost(self, reason: str) -> None:
        """The workers are gone for certain (lorax-launcher saw a shard exit)."""
        self._report(reason, is_lost=True)

    def _report(self, reason: str, is_lost: bool) -> None:
        self.is_healing = True
        self.engine.suspend()
        self._reports.put_nowait((reason, is_lost))

    async def run(self) -> None:
        while True:
            try:
                reason, is_lost = await asyncio.wait_for(self._reports.get(), self.probe_interval_s)
            except TimeoutError:
                if self.engine.num_active or self.is_healing or not await self._workers_lost():
                    continue
                reason, is_lost = "a worker does not answer the health probe", True
                self.is_healing = True
                self.engine.suspend()
            if is_lost or await self._workers_lost():
                await self._heal(reason)
            else:
                logger.info("the workers are all there after a failed step: serving on")
                self.engine.resume()
            while not self._reports.empty():  # reports of the loss just healed
                self._reports.get_nowait()
            self.is_healing = False

    async def _workers_lost(self) -> bool:
        """A shard is unreachable or was never warmed (a new process); a slow answer is not a loss."""
        try:
            return not await self.client.health(timeout=PROBE_TIMEOUT_S)
        except WorkerError as e:
            return e.code is grpc.StatusCode.UNAVAILABLE

    async def _heal(self, reason: str) -> None:
        logger.warning("workers lost (%s): requests they held fail, queued ones wait", reason)
        if self.registry is not None:
            self.registry.workers_up.clear()
        await self.engine.fail_running()
        delay = 0.5
        while True:
            try:
                if self.restart is not None:
                    await self.restart(reason)
                elif await self._come_back():
                    break
                num_blocks, info = await self.warm()
                await self._start_over(num_blocks, info)
                break
            except (WorkerError, TimeoutError) as e:
                reason = str(e) or type(e).__name__
                logger.warning("healing: %s; trying again in %.1f s", reason, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)
        if self.registry is not None:
            self.registry.workers_up.set()
        self.num_heals += 1
        self.engine.resume()
        logger.info("workers back: serving again")

    async def _come_back(self) -> bool:
        """lorax-router: waits until every worker answers; True if they never lost their state
        (a dropped connection), so there is nothing to warm again."""
        waited = 0.0
        while True:
            try:
                await self.client.wait_ready(timeout=READY_WAIT_S)
                return await self.client.health(timeout=PROBE_TIMEOUT_S)
            except TimeoutError:
                waited += READY_WAIT_S
                logger.warning("waiting for the workers at %s (%.0f s so far)", self.client.addresses, waited)

    async def _start_over(self, num_blocks: int, info: WorkerInfo) -> None:
        before = self.info
        same = (info.model_path, info.vocab_size, info.block_size, info.world_size)
        if same != (before.model_path, before.vocab_size, before.block_size, before.world_size):
            raise HealingFailed(
                f"the workers came back as another model ({info.model_path}, {info.world_size} shards; "
                f"was {before.model_path}, {before.world_size}): restart the router"
            )
        caching = self.engine.scheduler.allocator.enable_caching  # the new cache starts empty
        await self.engine.restart(BlockAllocator(num_blocks, info.block_size, enable_caching=caching))
        if self.registry is not None:
            await self.registry.workers_restarted()
