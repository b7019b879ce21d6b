"""Session fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when
# `triton.language` is first imported, so it is set before any test module can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged SmolLM2-135M-Instruct converted to an HF folder (once; reused via $LORAX_CACHE)."""
    from loraxpy.worker.model_source import convert_default_model

    cache = os.environ.get("LORAX_CACHE")
    cache_dir = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("lorax-cache")
    return convert_default_model(cache_dir)
