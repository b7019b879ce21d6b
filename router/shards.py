"""lorax-launcher's shard group: its worker processes, started together and restarted together.

A tensor-parallel group cannot lose one member (the others wait in a collective for it), so a
restart stops every shard and starts them all again, at the same addresses. Restarts are bounded:
at most `max_restarts` within `window_s` seconds; one more is a crash loop, and the launcher exits
non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from loraxpy.router.healing import HealingFailed
from loraxpy.router.worker_client import WorkerClient, WorkerError

logger = logging.getLogger("loraxpy.launcher")

STARTUP_TIMEOUT_S = 900.0
# A shard's exit status when it left a group that lost a member (worker/distributed.py; the router
# does not import the worker, which needs torch).
EXIT_GROUP_BROKEN = 3


class ShardGroup:
    def __init__(
        self,
        spawn: Callable[[], list[tuple[subprocess.Popen[bytes], str]]],
        max_restarts: int,
        window_s: float,
    ) -> None:
        self._spawn = spawn  # starts every shard; (process, address) in rank order
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        self._restarts: deque[float] = deque()  # when each restart within the window happened
        self.num_restarts = 0  # every restart of the group since the launch (lorax_shard_restarts_total)

    def start(self) -> None:
        started = self._spawn()
        self.procs = [p for p, _ in started]
        self.addresses = [a for _, a in started]

    def first_dead(self) -> str | None:
        """Names a shard that exited, one that caused the loss before one that left the group after it."""
        dead = [(rank, p.returncode) for rank, p in enumerate(self.procs) if p.poll() is not None]
        dead.sort(key=lambda d: d[1] == EXIT_GROUP_BROKEN)
        return f"shard {dead[0][0]} exited with code {dead[0][1]}" if dead else None

    def stop(self, grace_s: float = 15.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    async def restart(self, reason: str, client: WorkerClient) -> None:
        """Stops every shard and starts them again until all answer; a shard that dies while
        starting costs another restart. Raises HealingFailed past the bound."""
        while True:
            reason = self.first_dead() or reason  # name the shard, whoever noticed the loss
            self._count_restart(reason)
            # Survivors may be stuck in a collective with the lost shard: no grace for them.
            await asyncio.to_thread(self.stop, 0.0)
            for address in self.addresses:  # a killed shard leaves its socket file behind
                if address.startswith("unix://"):
                    Path(address.removeprefix("unix://")).unlink(missing_ok=True)
            self.start()
            died = await self.wait_started(client)
            if died is None:
                return
            reason = f"{died} while starting"

    def _count_restart(self, reason: str) -> None:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            raise HealingFailed(
                f"{reason}; {len(self._restarts)} restart(s) within {self.window_s:g} s already "
                f"(--max-restarts {self.max_restarts}): giving up"
            )
        self._restarts.append(now)
        self.num_restarts += 1
        logger.warning(
            "%s: restarting all %d shard(s) (restart %d of at most %d within %g s)",
            reason,
            len(self.procs),
            len(self._restarts),
            self.max_restarts,
            self.window_s,
        )

    async def wait_started(self, client: WorkerClient, timeout_s: float = STARTUP_TIMEOUT_S) -> str | None:
        """Waits until every new shard answers Health; the reason instead if one exits first.
        (Health, not channel readiness: a channel may not yet have seen its old shard go.)"""
        deadline = time.monotonic() + timeout_s
        while True:
            died = self.first_dead()
            if died is not None:
                return died
            try:
                await client.health(timeout=1.0)
                return None
            except WorkerError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the shards did not answer within {timeout_s:g} s") from None
                await asyncio.sleep(0.25)
