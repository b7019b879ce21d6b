"""GPU tests reuse the unit tests' case builders (test_attention, test_lora_kernels)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
