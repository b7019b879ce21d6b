"""Which threads of a worker run torch's parallel (OpenMP) work: one, the model thread.

libgomp gives every thread that opens a parallel region a team of its own, and once a process
holds more such threads than it has cores it stops letting idle team members spin between regions:
every later region then waits for its members to be woken. A worker that loaded its model on the
main thread and ran its steps on another decoded about 45% slower than one that did both on the
same thread (the default model at batch 16 on this project's 2-core Xeon: 175-187 ms against
125-130 ms per decode step, each in a fresh process). So the model is loaded, warmed up and
stepped on one thread, and the threads that parse adapters beside the steps run torch serially.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def model_thread() -> ThreadPoolExecutor:
    """The single thread every load, warmup, step and slot write of a worker runs on, in order."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


def serial_torch() -> None:
    """Thread initializer: this thread's torch ops use one thread (no OpenMP team of their own).

    Called on side threads only after the model thread has started its own (a thread takes torch's
    count when it first runs a parallel op), so the model thread keeps the worker's cores.
    """
    torch.set_num_threads(1)
