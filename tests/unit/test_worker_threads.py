"""A worker's torch work runs its OpenMP teams on one thread only (worker/threads.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_only_the_model_thread_runs_torch_in_parallel() -> None:
    # A fresh interpreter: torch's thread count is fixed per thread at its first parallel op.
    script = textwrap.dedent(
        """
        import torch
        from loraxpy.worker import threads
        from loraxpy.worker.adapter_loads import AdapterLoads

        torch.set_num_threads(2)
        model = threads.model_thread()
        on_model = model.submit(lambda: (torch.ones(1 << 16) * 2).sum() and torch.get_num_threads()).result()
        loads = AdapterLoads(max_concurrent=2)
        on_load = loads.run(lambda: (torch.ones(1 << 16) * 2).sum() and torch.get_num_threads())
        again = model.submit(torch.get_num_threads).result()
        print(on_model, on_load, again)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    # the model thread keeps the worker's threads; adapter parses beside it run serially
    assert out.stdout.split() == ["2", "1", "2"], out.stderr
