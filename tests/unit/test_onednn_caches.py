"""A worker caps oneDNN's two kernel caches: a server whose steps keep bringing new row counts
(each a new shape for the packed linears) stops growing once they are full."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from loraxpy.worker.cli import ONEDNN_CACHE_ENTRIES, bound_onednn_caches

CACHES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")

# Packed linears (worker/prepacked.py's op) of eight widths on 75 row counts, then on 75 more: prints
# how much more memory malloc has in use after the second 75 (600 new shapes) than after the first.
GROWTH = """
import ctypes, sys, torch
from loraxpy.worker.cli import bound_onednn_caches
if sys.argv[1] == "bounded":
    bound_onednn_caches()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info
weights = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(o, 64), 16) for o in range(64, 576, 64)]
def run(rows):
    for w in weights:
        torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 64), w, None, "none", [], "")
for rows in range(5, 80):
    run(rows)
before = mallinfo2().uordblks
for rows in range(80, 155):
    run(rows)
print((mallinfo2().uordblks - before) / 2**20)
"""


def test_the_caches_are_capped_unless_the_environment_sizes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHES[0], raising=False)
    monkeypatch.setenv(CACHES[1], "7")
    bound_onednn_caches()
    assert os.environ[CACHES[0]] == ONEDNN_CACHE_ENTRIES
    assert os.environ[CACHES[1]] == "7"


def _growth_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in CACHES} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", GROWTH, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not sys.platform.startswith("linux"),
    reason="oneDNN's packed linears, glibc's mallinfo2",
)
def test_new_row_counts_stop_costing_memory_once_the_capped_caches_are_full() -> None:
    # PyTorch's defaults (1024 entries each) keep every shape, some 100 KiB and more each; capped
    # (512), the first 600 shapes fill both caches and later ones take the place of older ones.
    default, bounded = _growth_mib("default"), _growth_mib("bounded")
    assert default > 20, default
    assert bounded < 3, bounded
