"""Classification on the router: LoRAX's /classify and /classify_batch bodies, their validation
into token ids (with each token's character span), and the answer from the logits the workers
compute (an encoder's classification head, prefill only, like an embedding).

A token classifier (NER) answers as HF transformers' `pipeline("token-classification",
aggregation_strategy="simple")`, which is what LoRAX's aggregation follows: each non-special token
takes its most likely label (softmax score), adjacent tokens of one entity join a group unless a
token starts a new one (`B-`), a group's score is its tokens' mean, its word the tokens joined as
the tokenizer's decoder joins them, and groups labelled `O` are left out. A sequence classifier
answers one entity spanning the whole input: its most likely label and score (softmax; sigmoid for a
single label, as HF's text-classification pipeline)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from loraxpy.proto.model_task import TOKEN_CLASSIFICATION, ModelTask
from loraxpy.router.embeddings import ValidEmbeddings, within
from loraxpy.router.errors import ValidationError
from loraxpy.router.text import Tokenizer
from loraxpy.router.validation import MAX_CHARS_PER_TOKEN, Limits, adapter_for


class ClassifyParameters(BaseModel):
    """Not in LoRAX's body (which classifies with the base model only): an adapter, as on /embed."""

    model_config = ConfigDict(extra="ignore", strict=True)

    adapter_id: str | None = None
    adapter_source: str | None = None
    api_token: str | None = None


class ClassifyRequest(BaseModel):
    """LoRAX's /classify body."""

    model_config = ConfigDict(extra="ignore", strict=True)  # LoRAX ignores unknown fields

    inputs: str
    parameters: ClassifyParameters | None = None


class BatchClassifyRequest(BaseModel):
    """LoRAX's /classify_batch body."""

    model_config = ConfigDict(extra="ignore", strict=True)

    inputs: list[str]
    parameters: ClassifyParameters | None = None


@dataclass(frozen=True)
class Spans:
    """One input's tokens: ids, character spans and which are special (added by the tokenizer)."""

    text: str
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    special: tuple[int, ...]


@dataclass(frozen=True)
class ValidClassification:
    spans: tuple[Spans, ...]
    embeddings: ValidEmbeddings  # the same prefill-only requests as embeddings, run by the engine


def validate_classify(
    inputs: list[str],
    parameters: ClassifyParameters | None,
    limits: Limits,
    tokenizer: Tokenizer,
    max_tokens: int,
) -> ValidClassification:
    p = parameters or ClassifyParameters()
    adapter_id, source = adapter_for(p.adapter_id, p.adapter_source, limits)
    if not inputs:
        raise ValidationError("`inputs` cannot be empty", param="inputs")
    if len(inputs) > limits.max_concurrent_requests:
        raise ValidationError(
            f"`inputs` may hold at most {limits.max_concurrent_requests} inputs", param="inputs"
        )
    spans = []
    for text in inputs:
        if not text:
            raise ValidationError("`inputs` cannot be empty", param="inputs")
        if len(text) > max_tokens * MAX_CHARS_PER_TOKEN:
            raise ValidationError(f"`inputs` must have at most {max_tokens} tokens", param="inputs")
        ids, offsets, special = tokenizer.encode_spans(text)
        within(tuple(ids), "inputs", max_tokens)
        spans.append(Spans(text, tuple(ids), tuple(offsets), tuple(special)))
    valid = ValidEmbeddings(tuple(s.ids for s in spans), adapter_id, source, p.api_token or "")
    return ValidClassification(tuple(spans), valid)


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _tag(label: str) -> tuple[str, str]:
    """(B or I, entity) of an IOB label; a label without a prefix continues (I), as HF's get_tag."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def classify_answer(
    spans: Spans, logits: tuple[float, ...], task: ModelTask, tokenizer: Tokenizer
) -> list[dict[str, Any]]:
    """LoRAX's entities for one input, from the workers' logits ([tokens × labels] for a token
    classifier, [labels] for a sequence classifier)."""
    labels = task.labels
    if task.task != TOKEN_CLASSIFICATION:
        if len(labels) == 1:
            score, best = 1 / (1 + math.exp(-logits[0])), 0
        else:
            scores = _softmax(list(logits))
            best = max(range(len(scores)), key=scores.__getitem__)
            score = scores[best]
        return [
            {
                "entity_group": labels[best],
                "score": score,
                "word": spans.text,
                "start": 0,
                "end": len(spans.text),
            }
        ]
    n = len(labels)
    if len(logits) != n * len(spans.ids):
        raise RuntimeError(f"the workers sent {len(logits)} logits for {len(spans.ids)} tokens × {n} labels")
    tokens = []  # (label, score, token text, start, end) of each non-special token
    for i, token_id in enumerate(spans.ids):
        if spans.special[i]:
            continue
        scores = _softmax(list(logits[i * n : (i + 1) * n]))
        best = max(range(n), key=scores.__getitem__)  # the first of equals, as numpy's argmax
        start, end = spans.offsets[i]
        word = spans.text[start:end] if token_id == tokenizer.unk_id else tokenizer.id_to_token(token_id)
        tokens.append((labels[best], scores[best], word, start, end))
    groups: list[list[tuple[str, float, str, int, int]]] = []
    for token in tokens:
        bi, tag = _tag(token[0])
        if groups and bi != "B" and _tag(groups[-1][-1][0])[1] == tag:
            groups[-1].append(token)
        else:
            groups.append([token])
    entities = []
    for group in groups:
        entity = group[0][0].split("-", 1)[-1]  # as HF's group_sub_entities names a group
        if entity == "O":
            continue
        entities.append(
            {
                "entity_group": entity,
                "score": sum(t[1] for t in group) / len(group),
                "word": tokenizer.tokens_to_string([t[2] for t in group]),
                "start": group[0][3],
                "end": group[-1][4],
            }
        )
    return entities
