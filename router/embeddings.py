"""Embedding requests on the router: LoRAX's /embed and OpenAI's /v1/embeddings bodies, their
validation into token ids and an adapter, and their responses. The engine computes them
(`Engine.embed`: prefill only, pooled on the workers)."""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraxpy.router.errors import ValidationError
from loraxpy.router.text import Tokenizer
from loraxpy.router.validation import MAX_CHARS_PER_TOKEN, Limits, adapter_for


class EmbedParameters(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # LoRAX ignores unknown fields

    adapter_id: str | None = None
    adapter_source: str | None = None
    api_token: str | None = None
    merged_adapters: dict[str, Any] | None = None  # LoRAX's; refused here


class EmbedRequest(BaseModel):
    """LoRAX's /embed body."""

    model_config = ConfigDict(extra="ignore", strict=True)

    inputs: str
    parameters: EmbedParameters | None = None  # null too, as lorax-client sends it


class EmbeddingRequest(BaseModel):
    """OpenAI's /v1/embeddings body; `model` names the adapter (the base model's id: none)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a field not honoured is refused by name

    input: str | list[str] | list[int] | list[list[int]]
    model: str = ""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = Field(default=None, max_length=256)  # on the request's trace span (enduser.id)
    adapter_source: str | None = None
    api_token: str | None = None


@dataclass(frozen=True)
class ValidEmbeddings:
    inputs: tuple[tuple[int, ...], ...]  # token ids of each input, in order
    adapter_id: str | None
    adapter_source: str
    api_token: str = field(default="", repr=False)


def validate_embed(
    req: EmbedRequest, limits: Limits, tokenizer: Tokenizer, max_tokens: int
) -> ValidEmbeddings:
    p = req.parameters or EmbedParameters()
    if p.merged_adapters is not None:
        raise ValidationError("`merged_adapters` is not served for embeddings", param="merged_adapters")
    adapter_id, source = adapter_for(p.adapter_id, p.adapter_source, limits)
    ids = _encode(req.inputs, "inputs", tokenizer, max_tokens)
    return ValidEmbeddings((ids,), adapter_id, source, p.api_token or "")


def validate_embeddings(
    req: EmbeddingRequest, limits: Limits, tokenizer: Tokenizer, max_tokens: int
) -> ValidEmbeddings:
    """`dimensions` is checked against the vectors' size once they are computed (the server's)."""
    adapter_id, source = adapter_for(req.model, req.adapter_source, limits)
    inputs: list[Any] = [req.input] if isinstance(req.input, str) else list(req.input)
    if inputs and isinstance(inputs[0], int):  # one list of token ids
        inputs = [inputs]
    if not inputs:
        raise ValidationError("`input` cannot be empty", param="input")
    if len(inputs) > limits.max_concurrent_requests:
        raise ValidationError(
            f"`input` may hold at most {limits.max_concurrent_requests} inputs", param="input"
        )
    ids = tuple(
        _encode(x, "input", tokenizer, max_tokens) if isinstance(x, str) else _ids(x, limits, max_tokens)
        for x in inputs
    )
    return ValidEmbeddings(ids, adapter_id, source, req.api_token or "")


def _encode(text: str, param: str, tokenizer: Tokenizer, max_tokens: int) -> tuple[int, ...]:
    if not text:
        raise ValidationError(f"`{param}` cannot be empty", param=param)
    if len(text) > max_tokens * MAX_CHARS_PER_TOKEN:
        raise ValidationError(f"`{param}` must have at most {max_tokens} tokens", param=param)
    return within(tuple(tokenizer.encode(text)), param, max_tokens)


def _ids(ids: list[int], limits: Limits, max_tokens: int) -> tuple[int, ...]:
    if not ids:
        raise ValidationError("`input` cannot hold an empty list of token ids", param="input")
    vocab = limits.vocab_size
    if any(t < 0 or (vocab and t >= vocab) for t in ids):
        raise ValidationError(f"`input`: token ids must be in [0, {vocab})", param="input")
    return within(tuple(ids), "input", max_tokens)


def within(ids: tuple[int, ...], param: str, max_tokens: int) -> tuple[int, ...]:
    if len(ids) > max_tokens:
        raise ValidationError(
            f"`{param}` must have at most {max_tokens} tokens (one step computes a whole input). "
            f"Given: {len(ids)}",
            param=param,
        )
    return ids


def openai_body(
    vectors: list[tuple[float, ...]], valid: ValidEmbeddings, model: str, encoding_format: str
) -> dict[str, Any]:
    def encoded(v: tuple[float, ...]) -> list[float] | str:
        if encoding_format == "base64":  # little-endian float32, as OpenAI sends it
            return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        return list(v)

    data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
    num_tokens = sum(len(ids) for ids in valid.inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
    }
