"""The OpenAPI 3.1 document served at /openapi.json, generated from the pydantic request models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from loraxpy.router import swagger
from loraxpy.router.classification import BatchClassifyRequest, ClassifyRequest
from loraxpy.router.embeddings import EmbeddingRequest, EmbedRequest
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

VECTOR: dict[str, Any] = {"type": "array", "items": {"type": "number"}}
EMBED: dict[str, Any] = {"type": "object", "required": ["embeddings"], "properties": {"embeddings": VECTOR}}
EMBEDDINGS: dict[str, Any] = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {"embedding": {"anyOf": [VECTOR, {"type": "string"}]}},
            },
        },
        "usage": {"type": "object"},
    },
}
ENTITY: dict[str, Any] = {
    "type": "object",
    "required": ["entity_group", "score", "word", "start", "end"],
    "properties": {
        "entity_group": {"type": "string"},
        "score": {"type": "number"},
        "word": {"type": "string"},
        "start": {"type": "integer"},
        "end": {"type": "integer"},
    },
}
ENTITIES: dict[str, Any] = {"type": "array", "items": ENTITY}
PROBE = ("LoraxError", (503,), _json(OBJECT))
INVOKED = {"anyOf": [{"type": "array", "items": GENERATED}, COMPLETION, EMBEDDINGS, EMBED, ENTITIES]}

# (method, path) → (summary, request body schema: a model, a list of models any of which, or None,
# error schema name, error statuses, 200 content)
Body = type[BaseModel] | tuple[type[BaseModel], ...] | None
ROUTES: dict[tuple[str, str], tuple[str, Body, str, tuple[int, ...], dict[str, Any]]] = {
    ("post", "/"): (
        "Generate (list-wrapped response, or SSE when `stream` is true)",
        GenerateRequest,
        "LoraxError",
        LORAX_GENERATION,
        {**_json({"type": "array", "items": GENERATED}), **SSE},
    ),
    ("post", "/generate"): (
        "Generate text",
        GenerateRequest,
        "LoraxError",
        LORAX_GENERATION,
        _json(GENERATED),
    ),
    ("post", "/generate_stream"): (
        "Generate text as server-sent events",
        GenerateRequest,
        "LoraxError",
        LORAX_GENERATION,
        SSE,
    ),
    ("post", "/tokenize"): ("Tokenize text", TokenizeRequest, "LoraxError", (*_BODY, 422), _json(TOKENS)),
    ("get", "/health"): (
        "200 when the workers are ready, 503 when not",
        None,
        "LoraxError",
        (503,),
        _json(OBJECT),
    ),
    ("get", "/info"): ("Model and server limits", None, "LoraxError", (401,), _json(OBJECT)),
    ("get", "/metrics"): ("Prometheus metrics", None, "LoraxError", (401,), {"text/plain": {}}),
    ("get", "/openapi.json"): ("This document", None, "LoraxError", (401,), _json(OBJECT)),
    ("get", "/v1/models"): ("Models served (OpenAI)", None, "OpenAIError", (401,), _json(MODEL_LIST)),
    ("post", "/v1/completions"): (
        "Completions (OpenAI; SSE when `stream` is true)",
        CompletionRequest,
        "OpenAIError",
        OPENAI_GENERATION,
        {**_json(COMPLETION), **SSE},
    ),
    ("post", "/v1/chat/completions"): (
        "Chat completions (OpenAI; SSE when `stream` is true)",
        ChatCompletionRequest,
        "OpenAIError",
        OPENAI_GENERATION,
        {**_json(COMPLETION), **SSE},
    ),
    ("post", "/embed"): (
        "Embed one input (LoRAX): the prompt's final hidden states pooled as the model's config says",
        EmbedRequest,
        "LoraxError",
        LORAX_GENERATION,
        _json(EMBED),
    ),
    ("post", "/v1/embeddings"): (
        "Embeddings (OpenAI): strings or token ids; `model` names the adapter",
        EmbeddingRequest,
        "OpenAIError",
        OPENAI_GENERATION,
        _json(EMBEDDINGS),
    ),
    ("post", "/classify"): (
        "Classify one input (LoRAX): a token classifier's entity groups, or a sequence classifier's "
        "label as one entity over the input",
        ClassifyRequest,
        "LoraxError",
        LORAX_GENERATION,
        _json(ENTITIES),
    ),
    ("post", "/classify_batch"): (
        "Classify several inputs (LoRAX): one list of entities per input",
        BatchClassifyRequest,
        "LoraxError",
        LORAX_GENERATION,
        _json({"type": "array", "items": ENTITIES}),
    ),
    ("get", "/"): ("Health probe (LoRAX's GET /)", None, *PROBE),
    ("get", "/ping"): ("Health probe (SageMaker)", None, *PROBE),
    ("get", "/startup"): ("Startup probe: 200 once the workers are warmed up", None, *PROBE),
    ("post", "/invocations"): (
        "SageMaker: a body with `messages` runs /v1/chat/completions, one with `prompt` "
        "/v1/completions, one with `input` /v1/embeddings (errors in OpenAI's shape), any other / "
        "(LoRAX's), or on an encoder /embed or /classify",
        (GenerateRequest, ChatCompletionRequest, CompletionRequest, EmbeddingRequest),
        "LoraxOrOpenAIError",
        tuple(sorted({*LORAX_GENERATION, *OPENAI_GENERATION})),
        {**_json(INVOKED), **SSE},
    ),
    ("get", swagger.DOCUMENT_PATH): ("This document (LoRAX's path)", None, "LoraxError", (), _json(OBJECT)),
    ("get", swagger.PAGE_PATH): ("Swagger UI over this document", None, "LoraxError", (), {"text/html": {}}),
    ("get", swagger.ASSETS_PATH): (
        "Swagger UI's files",
        None,
        "LoraxError",
        (404,),
        {t: {} for t in swagger.ASSET_TYPES},
    ),
}

# Routes that need no API key: probes, and the Swagger UI with its document (a browser loading
# the page cannot send the key).
PUBLIC_ROUTES = frozenset(
    {
        ("get", "/health"),
        ("get", "/"),
        ("get", "/ping"),
        ("get", "/startup"),
        ("get", swagger.DOCUMENT_PATH),
        ("get", swagger.PAGE_PATH),
        ("get", swagger.ASSETS_PATH),
    }
)


def _models(body: Body) -> tuple[type[BaseModel], ...]:
    return () if body is None else body if isinstance(body, tuple) else (body,)


def _operation(
    summary: str,
    refs: dict[Any, Any],
    body: Body,
    error: str,
    statuses: tuple[int, ...],
    content: dict[str, Any],
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK", "content": content}}}
    schemas = [refs[(m, "validation")] for m in _models(body)]
    if schemas:
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    for status in statuses:
        op["responses"][str(status)] = {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}},
        }
    return op


def openapi_document(version: str) -> dict[str, Any]:
    models = [m for _, body, _, _, _ in ROUTES.values() for m in _models(body)]
    refs, defs = models_json_schema(
        [(m, "validation") for m in dict.fromkeys(models)], ref_template="#/components/schemas/{model}"
    )
    schemas = {
        **defs.get("$defs", {}),
        "LoraxError": LORAX_ERROR,
        "OpenAIError": OPENAI_ERROR,
        "LoraxOrOpenAIError": {
            "anyOf": [
                {"$ref": "#/components/schemas/LoraxError"},
                {"$ref": "#/components/schemas/OpenAIError"},
            ]
        },
    }
    paths: dict[str, Any] = {}
    for (method, path), (summary, body, error, statuses, content) in ROUTES.items():
        op = _operation(summary, refs, body, error, statuses, content)
        if (method, path) in PUBLIC_ROUTES:
            op["security"] = [{}]
        if path == swagger.ASSETS_PATH:
            name = {"type": "string", "enum": list(swagger.ASSETS)}
            op["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": name}]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "loraxpy", "version": version, "description": "LoRAX-compatible and OpenAI API"},
        "paths": paths,
        # --api-key, when the server has one: every route but the public ones asks for it.
        "security": [{}, {"bearer": []}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
