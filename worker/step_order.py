"""Overlapped steps: a Step the router sent before its predecessor answered runs right after it.

The router numbers its steps (`StepRequest.step_id`) and marks one sent ahead with the step it
follows (`after_step_id`). gRPC hands concurrent calls to the server's threads in any order, so a
step sent ahead may reach the model thread first; `StepOrder.turn` holds it until its predecessor
has taken its turn (been handed to the model thread, or refused).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from loraxpy.worker.batch import WorkerInputError

# How long a step sent ahead waits for its predecessor to arrive: both were sent together, so
# only a predecessor lost on the way (or a router gone) takes longer.
ARRIVAL_TIMEOUT_S = 10.0


class StepOrder:
    def __init__(self, timeout_s: float = ARRIVAL_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._last = 0  # the step id that took its turn last (0: unnumbered)

    @contextlib.contextmanager
    def turn(self, step_id: int, after_step_id: int) -> Iterator[None]:
        """Waits until step `after_step_id` (0: none) has had its turn, runs the body (which hands
        the step to the model thread), then lets the step after this one go, whatever the body did."""
        with self._cond:
            if after_step_id and not self._cond.wait_for(
                lambda: self._last == after_step_id, timeout=self.timeout_s
            ):
                raise WorkerInputError(
                    f"step {step_id} follows step {after_step_id}, which did not arrive "
                    f"within {self.timeout_s:g} s"
                )
        try:
            yield
        finally:
            with self._cond:
                self._last = step_id
                self._cond.notify_all()
