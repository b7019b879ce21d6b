"""Embeddings: how a prompt's final hidden states pool into one vector, as the model's
sentence-transformers config says (modules.json, 1_Pooling/config.json), else a decoder's last
token's state, L2-normalised (Qwen3-Embedding's choice), and an encoder's first ([CLS]) state as it
is (LoRAX's BERT embeddings)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

MODES = ("last", "mean", "cls")
# sentence-transformers' pooling flags → our mode; other flags (max, weighted) are refused.
_ST_MODES = {
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}
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
    def from_folder(cls, path: Path, default: Pooling | None = None) -> Pooling:
        """The folder's sentence-transformers pooling, or `default` (the last token's, normalised)
        when it has none."""
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            return default or cls()
        modules = json.loads(modules_file.read_text())
        types = {m.get("type"): m.get("path", "") for m in modules if isinstance(m, dict)}
        if _ST_POOLING not in types:
            return cls((default or cls()).mode, normalize=_ST_NORMALIZE in types)
        config = json.loads((path / types[_ST_POOLING] / "config.json").read_text())
        chosen = [flag for flag, on in config.items() if flag.startswith("pooling_mode_") and on]
        if len(chosen) != 1 or chosen[0] not in _ST_MODES:
            raise ValueError(
                f"sentence-transformers pooling {chosen} is not served: one of "
                f"{', '.join(_ST_MODES)} (last token, mean or the first token's) is"
            )
        return cls(mode=_ST_MODES[chosen[0]], normalize=_ST_NORMALIZE in types)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_tokens, hidden] of one whole prompt → [hidden], in fp32."""
        h = hidden.float()
        vector = h.mean(dim=0) if self.mode == "mean" else h[0] if self.mode == "cls" else h[-1]
        return torch.nn.functional.normalize(vector, dim=0) if self.normalize else vector
