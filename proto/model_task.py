"""What a served model does, read from its config.json: router and workers both import this (no
torch), so the router refuses what the workers cannot compute and reads their outputs the same way.

Decoders (the Llama family) generate, and embed by pooling their hidden states. Encoders of the BERT
family (BERT, DistilBERT, XLM-RoBERTa) never generate: a checkpoint with a token- or
sequence-classification head classifies (its `id2label` names the classes), any other embeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENCODER_MODEL_TYPES = ("bert", "distilbert", "xlm-roberta")
TOKEN_CLASSIFICATION = "token-classification"
SEQUENCE_CLASSIFICATION = "sequence-classification"
EMBEDDING = "embedding"
GENERATION = "text-generation"


@dataclass(frozen=True)
class ModelTask:
    task: str  # GENERATION (a decoder; it embeds too), EMBEDDING, or one of the classifications
    labels: tuple[str, ...] = ()  # a classifier's class names, by class index

    @property
    def generates(self) -> bool:
        return self.task == GENERATION

    @property
    def embeds(self) -> bool:
        return self.task in (GENERATION, EMBEDDING)

    @property
    def classifies(self) -> bool:
        return self.task in (TOKEN_CLASSIFICATION, SEQUENCE_CLASSIFICATION)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelTask:
        if cfg.get("model_type") not in ENCODER_MODEL_TYPES:
            return cls(GENERATION)
        architectures = cfg.get("architectures") or []
        arch = str(architectures[0]) if isinstance(architectures, list) and architectures else ""
        for suffix, task in (
            ("ForTokenClassification", TOKEN_CLASSIFICATION),
            ("ForSequenceClassification", SEQUENCE_CLASSIFICATION),
        ):
            if arch.endswith(suffix):
                return cls(task, _labels(cfg))
        return cls(EMBEDDING)

    @classmethod
    def from_folder(cls, path: Path) -> ModelTask:
        return cls.from_config(json.loads((path / "config.json").read_text()))


def _labels(cfg: dict[str, Any]) -> tuple[str, ...]:
    """Class names by index from `id2label` (keys are strings in config.json); LABEL_i where absent."""
    id2label = cfg.get("id2label") or {}
    num_labels = int(cfg.get("num_labels") or len(id2label) or 2)
    if not isinstance(id2label, dict):
        raise ValueError("config.json's id2label must be an object")
    names = {int(k): str(v) for k, v in id2label.items()}
    num_labels = max(num_labels, len(names))
    return tuple(names.get(i, f"LABEL_{i}") for i in range(num_labels))
