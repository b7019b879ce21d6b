"""The OpenAPI 3.1 document served at /openapi.json, generated from the pydantic request models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from loraxpy.router.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, TokenizeRequest

LORAX_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
}
OPENAI_ERROR: dict[str, Any] = {
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

# The 200 bodies, as far as a client may rely on them (fields LoRAX and OpenAI always send).
OBJECT: dict[str, Any] = {"type": "object"}
GENERATED: dict[str, Any] = {
    "type": "object",
    "required": ["generated_text"],
    "properties": {"generated_text": {"type": "string"}, "details": {"type": ["object", "null"]}},
}
TOKENS: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["id", "text"],
        "properties": {"id": {"type": "integer"}, "text": {"type": "string"}},
    },
}
MODEL_LIST: dict[str, Any] = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
        },
    },
}
COMPLETION: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {"choices": {"type": "array", "items": {"type": "object"}}, "usage": {"type": "object"}},
}
SSE: dict[str, Any] = {"text/event-stream": {}}  # `data:` lines of JSON; errors as LoraxError/OpenAIError


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


# Statuses each kind of route answers with an error body (router/errors.py): 401 without the API
# key (when one is set), 408 and 413 for a body sent too slowly or too large, 404 for an adapter that
# does not exist, 422 (LoRAX) or 400 (OpenAI) for an invalid request, 429 past
# --max-concurrent-requests, 503 past --max-queue-time-s or while draining or healing, 424 (LoRAX)
# or 500 (OpenAI) when generation fails, 500 for anything unexpected.
_BODY = (401, 408, 413)
LORAX_GENERATION = (*_BODY, 404, 422, 424, 429, 500, 503)
OPENAI_GENERATION = (*_BODY, 400, 404, 429, 500, 503)

# path → (method, summary, request model or None, error schema name, error statuses, 200 content)
ROUTES: dict[str, tuple[str, str, type[BaseModel] | None, str, tuple[int, ...], dict[str, Any]]] = {
    "/": (
        "post",
        "Generate (list-wrapped response, or SSE when `stream` is true)",
        GenerateRequest,
        "LoraxError",
        LORAX_GENERATION,
        {**_json({"type": "array", "items": GENERATED}), **SSE},
    ),
    "/generate": ("post", "Generate text", GenerateRequest, "LoraxError", LORAX_GENERATION, _json(GENERATED)),
    "/generate_stream": (
        "post",
        "Generate text as server-sent events",
        GenerateRequest,
        "LoraxError",
        LORAX_GENERATION,
        SSE,
    ),
    "/tokenize": ("post", "Tokenize text", TokenizeRequest, "LoraxError", (*_BODY, 422), _json(TOKENS)),
    "/health": (
        "get",
        "200 when the workers are ready, 503 when not",
        None,
        "LoraxError",
        (503,),
        _json(OBJECT),
    ),
    "/info": ("get", "Model and server limits", None, "LoraxError", (401,), _json(OBJECT)),
    "/metrics": ("get", "Prometheus metrics", None, "LoraxError", (401,), {"text/plain": {}}),
    "/openapi.json": ("get", "This document", None, "LoraxError", (401,), _json(OBJECT)),
    "/v1/models": ("get", "Models served (OpenAI)", None, "OpenAIError", (401,), _json(MODEL_LIST)),
    "/v1/completions": (
        "post",
        "Completions (OpenAI; SSE when `stream` is true)",
        CompletionRequest,
        "OpenAIError",
        OPENAI_GENERATION,
        {**_json(COMPLETION), **SSE},
    ),
    "/v1/chat/completions": (
        "post",
        "Chat completions (OpenAI; SSE when `stream` is true)",
        ChatCompletionRequest,
        "OpenAIError",
        OPENAI_GENERATION,
        {**_json(COMPLETION), **SSE},
    ),
}


def openapi_document(version: str) -> dict[str, Any]:
    models = [m for _, _, m, _, _, _ in ROUTES.values() if m is not None]
    refs, defs = models_json_schema(
        [(m, "validation") for m in dict.fromkeys(models)], ref_template="#/components/schemas/{model}"
    )
    schemas = {**defs.get("$defs", {}), "LoraxError": LORAX_ERROR, "OpenAIError": OPENAI_ERROR}
    paths: dict[str, Any] = {}
    for path, (method, summary, model, error, statuses, content) in ROUTES.items():
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": content}},
        }
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
        if path == "/health":  # probes stay unauthenticated
            op["security"] = [{}]
        paths[path] = {method: op}
    return {
        "openapi": "3.1.0",
        "info": {"title": "loraxpy", "version": version, "description": "LoRAX-compatible and OpenAI API"},
        "paths": paths,
        # --api-key, when the server has one: every route but /health asks for it.
        "security": [{}, {"bearer": []}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
