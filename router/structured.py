"""Which grammar a request's structured-output fields ask for, compiled before the request is queued.

LoRAX: `parameters.response_format` = `{"type": "json_object", "schema": {...}}` (no schema: any
JSON object) or `{"type": "text"}`. OpenAI: `response_format` = `text`, `json_object`, or
`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`; and vLLM's extras,
`structured_outputs` = `{"json" | "regex" | "choice" | "grammar": ...}` and the older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. A request names at most one.
"""

from __future__ import annotations

import json
from typing import Any

from loraxpy.router.errors import ValidationError
from loraxpy.router.grammar import CompiledGrammar, GrammarCompiler, GrammarError, GrammarSpec
from loraxpy.router.schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


def compile_spec(
    spec: GrammarSpec | None, param: str, grammars: GrammarCompiler | None
) -> CompiledGrammar | None:
    """The compiled grammar, or a ValidationError naming `param` with the grammar engine's message."""
    if spec is None:
        return None
    if grammars is None:
        raise ValidationError(f"`{param}` is not supported by this server", param=param)
    try:
        return grammars.compile(spec)
    except GrammarError as e:
        raise ValidationError(f"`{param}`: {e}", param=param) from None


def lorax_spec(fmt: ResponseFormat | None) -> GrammarSpec | None:
    """LoRAX's `response_format` (as lorax-client sends it)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type != "json_object":
        raise ValidationError(
            "`response_format.type` must be `json_object` or `text`", param="response_format"
        )
    return GrammarSpec("json_schema", _schema(fmt.schema_, "response_format.schema"))


def _schema(schema: Any, param: str) -> dict[str, Any]:
    if schema is None:
        return ANY_JSON_OBJECT
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValidationError(f"`{param}` is not valid JSON: {e.msg}", param=param) from None
    if not isinstance(schema, dict):
        raise ValidationError(f"`{param}` must be a JSON schema (an object)", param=param)
    return schema


def _openai_response_format(fmt: ResponseFormat) -> GrammarSpec | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_schema", ANY_JSON_OBJECT)
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ValidationError(
                "`response_format.json_schema` is required with type `json_schema`", param="response_format"
            )
        return GrammarSpec(
            "json_schema", _schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
        )
    raise ValidationError(
        "`response_format.type` must be one of text, json_object, json_schema", param="response_format"
    )


def openai_spec(req: CompletionRequest | ChatCompletionRequest) -> tuple[GrammarSpec | None, str]:
    """The grammar an OpenAI request asks for and the field that asked; at most one field may."""
    found: list[tuple[GrammarSpec, str]] = []
    if req.response_format is not None:
        spec = _openai_response_format(req.response_format)
        if spec is not None:
            found.append((spec, "response_format"))
    so = req.structured_outputs
    candidates: list[tuple[str, str, Any]] = [
        ("guided_json", "json_schema", req.guided_json),
        ("guided_regex", "regex", req.guided_regex),
        ("guided_choice", "choice", req.guided_choice),
        ("guided_grammar", "lark", req.guided_grammar),
    ]
    if so is not None:
        candidates += [
            ("structured_outputs.json", "json_schema", so.json_),
            ("structured_outputs.regex", "regex", so.regex),
            ("structured_outputs.choice", "choice", so.choice),
            ("structured_outputs.grammar", "lark", so.grammar),
        ]
    for param, kind, value in candidates:
        if value is None:
            continue
        if kind == "json_schema":
            value = _schema(value, param)
        if kind == "choice" and (not value or not all(value)):
            raise ValidationError(f"`{param}` must list at least one non-empty choice", param=param)
        found.append((GrammarSpec(kind, value), param))  # type: ignore[arg-type]
    if len(found) > 1:
        names = ", ".join(f"`{p}`" for _, p in found)
        raise ValidationError(f"set at most one of {names}", param=found[1][1])
    return (found[0][0], found[0][1]) if found else (None, "")
