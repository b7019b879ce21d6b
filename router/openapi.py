"""The OpenAPI 3.1 document served at /openapi.json, generated from the pydantic request models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from loraxpy.router.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, TokenizeRequest

LORAX_ERROR = {
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
}
OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

# path → (method, summary, request model or None, error schema name, error statuses)
ROUTES: dict[str, tuple[str, str, type[BaseModel] | None, str, tuple[int, ...]]] = {
    "/": (
        "post",
        "Generate (list-wrapped response, or SSE when `stream` is true)",
        GenerateRequest,
        "LoraxError",
        (422, 424, 429, 500),
    ),
    "/generate": ("post", "Generate text", GenerateRequest, "LoraxError", (422, 424, 429, 500)),
    "/generate_stream": (
        "post",
        "Generate text as server-sent events",
        GenerateRequest,
        "LoraxError",
        (422, 424, 429),
    ),
    "/tokenize": ("post", "Tokenize text", TokenizeRequest, "LoraxError", (422,)),
    "/health": ("get", "200 when the workers are ready", None, "LoraxError", (424,)),
    "/info": ("get", "Model and server limits", None, "LoraxError", ()),
    "/metrics": ("get", "Prometheus metrics", None, "LoraxError", ()),
    "/v1/models": ("get", "Models served (OpenAI)", None, "OpenAIError", ()),
    "/v1/completions": (
        "post",
        "Completions (OpenAI)",
        CompletionRequest,
        "OpenAIError",
        (400, 401, 429, 500),
    ),
    "/v1/chat/completions": (
        "post",
        "Chat completions (OpenAI)",
        ChatCompletionRequest,
        "OpenAIError",
        (400, 401, 429, 500),
    ),
}


def openapi_document(version: str) -> dict[str, Any]:
    models = [m for _, _, m, _, _ in ROUTES.values() if m is not None]
    refs, defs = models_json_schema(
        [(m, "validation") for m in dict.fromkeys(models)], ref_template="#/components/schemas/{model}"
    )
    schemas = {**defs.get("$defs", {}), "LoraxError": LORAX_ERROR, "OpenAIError": OPENAI_ERROR}
    paths: dict[str, Any] = {}
    for path, (method, summary, model, error, statuses) in ROUTES.items():
        op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
        if model is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(model, "validation")]}},
            }
        for status in statuses:
            op["responses"][str(status)] = {
                "description": "error",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}},
            }
        paths[path] = {method: op}
    return {
        "openapi": "3.1.0",
        "info": {"title": "loraxpy", "version": version, "description": "LoRAX-compatible and OpenAI API"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
