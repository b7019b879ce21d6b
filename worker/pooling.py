"""Embeddings from a decoder: how a prompt's final hidden states pool into one vector, as the
model's sentence-transformers config says (modules.json, 1_Pooling/config.json), else the last
token's state, L2-normalised (Qwen3-Embedding's choice)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

MODES = ("last", "mean")
# sentence-transformers' pooling flags → our mode; other flags (cls, max, weighted) are refused.
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class Pooling:
    mode: str = "last"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"pooling mode must be one of {', '.join(MODES)}, not {self.mode!r}")

    @classmethod
    def from_folder(cls, path: Path) -> Pooling:
        """The folder's sentence-transformers pooling, or the default when it has none."""
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            return cls()
        modules = json.loads(modules_file.read_text())
        types = {m.get("type"): m.get("path", "") for m in modules if isinstance(m, dict)}
        if _ST_POOLING not in types:
            return cls(normalize=_ST_NORMALIZE in types)
        config = json.loads((path / types[_ST_POOLING] / "config.json").read_text())
        chosen = [flag for flag, on in config.items() if flag.startswith("pooling_mode_") and on]
        if len(chosen) != 1 or chosen[0] not in _ST_MODES:
            raise ValueError(
                f"sentence-transformers pooling {chosen} is not served: one of "
                f"{', '.join(_ST_MODES)} (last token or mean) is"
            )
        return cls(mode=_ST_MODES[chosen[0]], normalize=_ST_NORMALIZE in types)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_tokens, hidden] of one whole prompt → [hidden], in fp32."""
        h = hidden.float()
        vector = h[-1] if self.mode == "last" else h.mean(dim=0)
        return torch.nn.functional.normalize(vector, dim=0) if self.normalize else vector
