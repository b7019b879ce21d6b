"""Adapter fetches and parses run on threads of their own, never on the gRPC threads Step needs.

At most `max_concurrent` run at once and as many more may wait; past that a load is refused at
once (AdapterBusyError). The RPC waiting for a load gives up after `timeout_s`
(AdapterTimeoutError); a load stuck past it (a hung download) keeps its thread, so the cap is also
what bounds the damage: the worker's other RPCs never wait for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from loraxpy.worker.adapters import AdapterBusyError, AdapterTimeoutError
from loraxpy.worker.threads import serial_torch

T = TypeVar("T")


class AdapterLoads:
    def __init__(self, max_concurrent: int = 2, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        # Parses run torch serially: a team of their own would slow every step (worker/threads.py).
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrent, thread_name_prefix="adapter-load", initializer=serial_torch
        )
        self._admitted = threading.BoundedSemaphore(2 * max_concurrent)  # running + waiting

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._admitted.acquire(blocking=False):
            raise AdapterBusyError("too many adapter loads are in flight on this worker; retry shortly")
        try:
            future: Future[T] = self._executor.submit(fn, *args)
        except BaseException:
            self._admitted.release()
            raise
        future.add_done_callback(lambda _: self._admitted.release())
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            future.cancel()  # if it has not started yet; a running load finishes on its own
            raise AdapterTimeoutError(
                f"loading the adapter took longer than {self.timeout_s:g} s (--adapter-load-timeout-s)"
            ) from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
