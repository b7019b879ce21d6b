"""The HTTP server (aiohttp): LoRAX's REST routes and OpenAI's, over one engine.

Handlers parse and validate, run the request through the engine, and render the result. Errors are
rendered in one place per API family (LoRAX body on LoRAX routes, OpenAI body on /v1 routes),
including aiohttp's own 4xx and anything unexpected (a generic 500; the exception goes to the
log), because clients call `.json()` on every error.

No request may hold the event loop: tokenizing and chat templates run in the default executor,
bodies must arrive within a deadline, and one HTTP request reserves as many of
--max-concurrent-requests as the generations it runs (prompts × n) before any starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydantic
from aiohttp import web

from loraxpy.proto.model_task import GENERATION, ModelTask
from loraxpy.router import responses as R
from loraxpy.router import swagger
from loraxpy.router.adapters import AdapterRegistry
from loraxpy.router.classification import (
    BatchClassifyRequest,
    ClassifyParameters,
    ClassifyRequest,
    classify_answer,
    validate_classify,
)
from loraxpy.router.cors import allow_origins
from loraxpy.router.embeddings import (
    EmbeddingRequest,
    EmbedRequest,
    ValidEmbeddings,
    openai_body,
    validate_embed,
    validate_embeddings,
)
from loraxpy.router.engine import Engine, EngineError, QueueTimeout, RequestOutput, TokenEvent
from loraxpy.router.errors import (
    BadRequestError,
    BodyTimeoutError,
    GenerationError,
    InternalError,
    NotFoundError,
    OverloadedError,
    QueueTimeoutError,
    RouterError,
    ShuttingDownError,
    UnauthorizedError,
    UnavailableError,
    ValidationError,
    lorax_error_body,
    openai_error_body,
)
from loraxpy.router.metrics import Metrics
from loraxpy.router.openapi import PUBLIC_ROUTES, openapi_document
from loraxpy.router.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, TokenizeRequest
from loraxpy.router.text import TemplateError, Tokenizer
from loraxpy.router.tools import ToolCallStream
from loraxpy.router.tracing import Tracer
from loraxpy.router.validation import (
    Limits,
    ValidRequest,
    chat_adapter,
    choices,
    validate_chat,
    validate_completion,
    validate_generate,
    validate_tokenize,
)

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Tokenizer
    limits: Limits
    metrics: Metrics
    model_id: str
    info: dict[str, Any]
    max_concurrent_requests: int = 128
    api_key: str | None = None
    tracer: Tracer = field(default_factory=lambda: Tracer(None))
    adapters: AdapterRegistry | None = None
    is_draining: bool = False  # after SIGTERM: new requests get 503, running ones finish
    max_queue_time_s: float = 0.0  # longest wait for an adapter slot or the first step (0: no limit)
    body_read_timeout_s: float = 30.0
    num_admitted: int = 0  # generations reserved by running HTTP requests
    task: ModelTask = field(default_factory=lambda: ModelTask(GENERATION))  # what the model computes


STATE = web.AppKey("state", ServerState)


# /invocations renders errors as the API its body was routed to: LoRAX's, or OpenAI's here.
INVOKED_OPENAI = "invoked_openai"


def _is_openai(request: web.Request) -> bool:
    return request.path.startswith("/v1/") or bool(request.get(INVOKED_OPENAI))


def _error_response(request: web.Request, err: RouterError) -> web.Response:
    if _is_openai(request) and err.param == "adapter_id":
        err = _naming_the_base_model(err, request.app[STATE].model_id)
    status, body = openai_error_body(err) if _is_openai(request) else lorax_error_body(err)
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return web.json_response(body, status=status, headers=headers)


def _naming_the_base_model(err: RouterError, model_id: str) -> RouterError:
    """An adapter error on /v1 routes comes from `model`: it says which name is the base model."""
    named = copy.copy(err)
    named.param = "model"
    named.message = (
        f"{err.message} (`model` names an adapter; the base model is {model_id!r}, see /v1/models)"
    )
    return named


# When the request arrived and which route serves it, for the request's trace span.
RECEIVED_NS: contextvars.ContextVar[int] = contextvars.ContextVar("received_ns")
ROUTE: contextvars.ContextVar[str] = contextvars.ContextVar("route")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    RECEIVED_NS.set(time.time_ns())
    ROUTE.set(f"{request.method} {request.path}")
    try:
        return await handler(request)
    except RouterError as e:
        return _error_response(request, e)
    except web.HTTPException as e:  # aiohttp's own 404/405/413…, rendered as JSON
        if e.status < 400:
            raise
        err = NotFoundError(e.reason) if e.status == 404 else BadRequestError(e.reason)
        err.status = err.openai_status = e.status
        return _error_response(request, err)
    except Exception:  # a bug: the client learns nothing about it but that it happened
        logger.exception("%s %s failed", request.method, request.path)
        return _error_response(request, InternalError())


def _is_public(request: web.Request) -> bool:
    """Probes, the API's description and CORS preflights (browsers send them without credentials)."""
    if request.method == "OPTIONS":
        return True
    resource = request.match_info.route.resource
    return resource is not None and (request.method.lower(), resource.canonical) in PUBLIC_ROUTES


def auth_middleware(api_key: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api_key and not _is_public(request):
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            # Header bytes that are not UTF-8 arrive as surrogates: compare them as the bytes they were.
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), api_key.encode()):
                raise UnauthorizedError("missing or wrong API key: send `Authorization: Bearer <key>`")
        return await handler(request)

    return check


async def _read_body(request: web.Request) -> bytes:
    """The whole body, or a 408 if the client sends it slower than the deadline allows."""
    timeout_s = request.app[STATE].body_read_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeoutError(f"request body not received within {timeout_s:g} s") from None


async def _parse(request: web.Request, model: type[pydantic.BaseModel]) -> Any:
    raw = await _read_body(request)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRequestError(f"request body is not valid JSON: {e.msg} at position {e.pos}") from None
    except UnicodeDecodeError:
        raise BadRequestError("request body is not UTF-8") from None
    except RecursionError:
        raise BadRequestError("request body is not valid JSON: nested too deeply") from None
    except ValueError:  # e.g. an integer with more digits than Python converts
        raise BadRequestError("request body is not valid JSON: a value is out of range") from None
    if not isinstance(data, dict):
        raise BadRequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequestError(f"`{field}`: {first['msg']}", param=field) from None


class Api:
    def __init__(self, state: ServerState) -> None:
        self.s = state

    # ---- running one generation ---------------------------------------------------------------

    @contextlib.contextmanager
    def _admitted(self, count: int) -> Iterator[None]:
        """Reserves `count` generations of --max-concurrent-requests for one HTTP request, all or none."""
        if self.s.is_draining:
            raise ShuttingDownError("the server is shutting down; retry on another replica")
        if self.s.num_admitted + count > self.s.max_concurrent_requests:
            self.s.metrics.request_failure.labels("overloaded").inc()
            raise OverloadedError("Model is overloaded")
        self.s.num_admitted += count
        try:
            yield
        finally:
            self.s.num_admitted -= count

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs tokenizer work (a 4 MiB body takes seconds) beside the event loop, not on it."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _events(self, valid: ValidRequest, gen: R.Generation) -> AsyncGenerator[TokenEvent]:
        """The request's tokens, recorded in `gen`; holds its adapter's device slot while it runs."""
        index, identity = 0, None
        queued_until = self._queue_deadline()
        if valid.adapter_id is not None:
            if self.s.adapters is None:
                raise ValidationError("this server was started without adapters", param="adapter_id")
            args = (valid.adapter_id, valid.adapter_source, valid.api_token, valid.merge)
            identity = self.s.adapters.prefix_identity(*args)  # refuses what `acquire` would, first
            index = await self._within_queue_time(self.s.adapters.acquire(*args), queued_until)
        span: Any = None
        output: RequestOutput | None = None
        error: str | None = None
        try:
            inp = dataclasses.replace(valid.engine, adapter_index=index, prefix_identity=identity)
            stream = self.s.tokenizer.stream(list(inp.input_ids), valid.stop, include_stop=valid.include_stop)
            self.s.metrics.request_count.inc()
            received = RECEIVED_NS.get(None) or time.time_ns()
            span = self.s.tracer.start_request(f"{ROUTE.get('')} request", received)
            self.s.tracer.child(span, "validation", received, time.time_ns())
            async with self.s.engine.generate(inp, stream, span, queued_until) as request:
                output = request.output
                gen.prompt_logprobs = output.prompt_logprobs  # filled in by the request's first step
                async for event in request:
                    if gen.first_token_at is None:
                        gen.first_token_at = time.monotonic()
                        if output.scheduled_ns is not None:
                            gen.queue_s = (output.scheduled_ns - output.queued_ns) / 1e9
                    gen.events.append(event)
                    yield event
        except QueueTimeout:
            error = "queue timeout"
            raise self._queue_timeout() from None
        except EngineError as e:
            self.s.metrics.request_failure.labels("generation").inc()
            error = str(e)
            raise GenerationError(str(e)) from e
        finally:
            self._end_trace(span, output, gen, error, valid.end_user)
            if index:
                await self.s.adapters.release(index)  # type: ignore[union-attr]
        self.s.metrics.observe_success(gen)

    def _queue_deadline(self) -> float | None:
        limit = self.s.max_queue_time_s
        return asyncio.get_running_loop().time() + limit if limit else None

    def _queue_timeout(self) -> QueueTimeoutError:
        self.s.metrics.request_failure.labels("queue_timeout").inc()
        limit = self.s.max_queue_time_s
        return QueueTimeoutError(f"the server is overloaded: the request waited {limit:g} s in the queue")

    async def _within_queue_time(self, wait: Awaitable[T], deadline: float | None) -> T:
        """Awaits a wait in a queue (for an adapter's slot); past the deadline the request gets 503."""
        if deadline is None:
            return await wait
        try:
            async with asyncio.timeout_at(deadline):
                return await wait
        except TimeoutError:
            raise self._queue_timeout() from None

    def _end_trace(
        self,
        span: Any,
        output: RequestOutput | None,
        gen: R.Generation,
        error: str | None,
        end_user: str | None = None,
    ) -> None:
        tracer = self.s.tracer
        if span is None:
            return
        if output is not None and output.scheduled_ns is not None:
            tracer.child(span, "queue", output.queued_ns, output.scheduled_ns)
            tracer.child(
                span, "inference", output.scheduled_ns, time.time_ns(), generated_tokens=len(gen.events)
            )
        tracer.end(
            span,
            prompt_tokens=gen.num_prompt_tokens,
            generated_tokens=len(gen.events),
            finish_reason=gen.finish_reason.value if gen.events else None,
            error=error,
            **{"enduser.id": end_user},  # OpenAI's `user`, as OpenTelemetry names it
        )

    async def _run(self, valid: ValidRequest) -> R.Generation:
        gen = R.Generation(valid)
        async for _ in self._events(valid, gen):
            pass
        return gen

    # ---- LoRAX routes ---------------------------------------------------------------------------

    def _serves(self, what: str) -> None:
        """Refuses a request the model cannot compute: generation, embeddings or classification."""
        task = self.s.task
        if {"generation": task.generates, "embeddings": task.embeds, "classification": task.classifies}[what]:
            return
        routes = "/embed and /v1/embeddings" if task.embeds else "/classify and /classify_batch"
        if task.generates:
            routes = "the generation routes, " + routes
        raise ValidationError(
            f"this model serves no {what}: it is a {task.task} model (its routes: {routes})"
        )

    async def root(self, request: web.Request) -> web.StreamResponse:
        self._serves("generation")
        req = await _parse(request, GenerateRequest)
        if req.stream:
            return await self._sse_lorax(request, req)
        return web.json_response([R.generate_body(self.s.tokenizer, await self._generate(req))])

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self._serves("generation")
        req = await _parse(request, GenerateRequest)
        return web.json_response(R.generate_body(self.s.tokenizer, await self._generate(req)))

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        self._serves("generation")
        return await self._sse_lorax(request, await _parse(request, GenerateRequest))

    async def _generate(self, req: GenerateRequest) -> R.Generation:
        valid = await self._off_loop(
            validate_generate, req, self.s.limits, self.s.tokenizer, self.s.engine.grammars
        )
        with self._admitted(1):
            return await self._run(valid)

    async def _sse_lorax(self, request: web.Request, req: GenerateRequest) -> web.StreamResponse:
        valid = await self._off_loop(
            validate_generate, req, self.s.limits, self.s.tokenizer, self.s.engine.grammars
        )
        with self._admitted(1):
            return await self._stream_lorax(request, valid)

    async def _stream_lorax(self, request: web.Request, valid: ValidRequest) -> web.StreamResponse:
        response: web.StreamResponse | None = None  # opened at the first token: earlier errors get a status
        gen = R.Generation(valid)
        try:
            async with contextlib.aclosing(self._events(valid, gen)) as events:
                async for event in events:
                    response = response or await _open_sse(request)
                    await _send(response, R.stream_event_body(self.s.tokenizer, gen, event))
        except RouterError as e:
            if response is None:
                raise
            await _send(response, lorax_error_body(e)[1])  # after the headers: in the stream
        return response or await _open_sse(request)

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        req = await _parse(request, TokenizeRequest)
        ids = await self._off_loop(validate_tokenize, req, self.s.limits, self.s.tokenizer)
        return web.json_response(
            [{"id": t, "text": self.s.tokenizer.decode([t], skip_special_tokens=False)} for t in ids]
        )

    async def health(self, request: web.Request) -> web.StreamResponse:
        if self.s.is_draining:  # load balancers stop sending requests here
            raise ShuttingDownError("the server is shutting down")
        if not self.s.engine.is_running:
            raise UnavailableError("the engine loop is not running")
        if self.s.engine.is_suspended:  # router/healing.py: requests wait meanwhile
            raise UnavailableError("the workers are being restarted; requests wait until they are back")
        if not self.s.engine.is_healthy:
            raise UnavailableError("a worker failed the last step; the server is unhealthy")
        try:
            healthy = await self.s.engine.client.health(timeout=5.0)
        except Exception:  # any failure to reach a shard makes the server unhealthy
            logger.exception("worker health check failed")
            raise UnavailableError("worker health check failed") from None
        if not healthy:
            raise UnavailableError("workers are not ready")
        return web.json_response({})

    async def embed(self, request: web.Request) -> web.StreamResponse:
        self._serves("embeddings")
        req = await _parse(request, EmbedRequest)
        valid = await self._off_loop(
            validate_embed, req, self.s.limits, self.s.tokenizer, self._max_embedding_tokens()
        )
        return web.json_response({"embeddings": list((await self._embed(valid))[0])})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        self._serves("embeddings")
        req = await _parse(request, EmbeddingRequest)
        valid = await self._off_loop(
            validate_embeddings, req, self.s.limits, self.s.tokenizer, self._max_embedding_tokens()
        )
        vectors = await self._embed(valid, end_user=req.user)
        if req.dimensions is not None and req.dimensions != len(vectors[0]):
            raise ValidationError(
                f"`dimensions` must be this model's {len(vectors[0])}: it is not trained to be truncated",
                param="dimensions",
            )
        body = openai_body(vectors, valid, req.model or self.s.model_id, req.encoding_format)
        return web.json_response(body)

    async def classify(self, request: web.Request) -> web.StreamResponse:
        req = await _parse(request, ClassifyRequest)
        return web.json_response((await self._classify([req.inputs], req.parameters))[0])

    async def classify_batch(self, request: web.Request) -> web.StreamResponse:
        req = await _parse(request, BatchClassifyRequest)
        return web.json_response(await self._classify(req.inputs, req.parameters))

    async def _classify(
        self, inputs: list[str], parameters: ClassifyParameters | None
    ) -> list[list[dict[str, Any]]]:
        """Each input's entities: its tokens' logits from the workers (computed as embeddings are)."""
        self._serves("classification")
        valid = await self._off_loop(
            validate_classify,
            inputs,
            parameters,
            self.s.limits,
            self.s.tokenizer,
            self._max_embedding_tokens(),
        )
        logits = await self._embed(valid.embeddings)
        return [
            classify_answer(spans, row, self.s.task, self.s.tokenizer)
            for spans, row in zip(valid.spans, logits, strict=True)
        ]

    def _max_embedding_tokens(self) -> int:
        """An embedding's whole input is computed in one step."""
        return min(self.s.limits.max_input_length, self.s.engine.scheduler.config.max_step_tokens)

    async def _embed(self, valid: ValidEmbeddings, end_user: str | None = None) -> list[tuple[float, ...]]:
        """Every input's vector, all under the request's adapter, which they hold until the last ends.

        The request's trace span carries its prompt tokens, its outcome and OpenAI's `user`."""
        tracer = self.s.tracer
        span = tracer.start_request(f"{ROUTE.get('')} request", RECEIVED_NS.get(None) or time.time_ns())
        error: str | None = None
        try:
            return await self._embed_all(valid)
        except Exception as e:
            error = type(e).__name__
            raise
        finally:
            tracer.end(
                span,
                prompt_tokens=sum(len(ids) for ids in valid.inputs),
                error=error,
                **{"enduser.id": end_user},  # OpenAI's `user`, as OpenTelemetry names it
            )

    async def _embed_all(self, valid: ValidEmbeddings) -> list[tuple[float, ...]]:
        with self._admitted(len(valid.inputs)):
            deadline = self._queue_deadline()
            index = 0
            if valid.adapter_id is not None:
                if self.s.adapters is None:
                    raise ValidationError("this server was started without adapters", param="adapter_id")
                acquire = self.s.adapters.acquire(valid.adapter_id, valid.adapter_source, valid.api_token)
                index = await self._within_queue_time(acquire, deadline)
            tasks = [asyncio.ensure_future(self.s.engine.embed(ids, index, deadline)) for ids in valid.inputs]
            try:
                return list(await asyncio.gather(*tasks))
            except QueueTimeout:
                raise self._queue_timeout() from None
            except EngineError as e:
                self.s.metrics.request_failure.labels("generation").inc()
                raise GenerationError(str(e)) from e
            finally:
                for t in tasks:
                    t.cancel()
                if index:
                    await self.s.adapters.release(index)  # type: ignore[union-attr]

    async def invocations(self, request: web.Request) -> web.StreamResponse:
        """SageMaker's one route: a body with `messages` is a chat completion, one with `prompt` a
        completion, one with `input` an embedding (all OpenAI's), anything else LoRAX's `/`
        (generate, list-wrapped), or on an encoder its /embed or /classify."""
        try:
            data = json.loads(await _read_body(request))
        except (ValueError, RecursionError):  # not JSON: `/` refuses it with its own message
            data = None
        openai_routes = {
            "messages": self.chat_completions,
            "prompt": self.completions,
            "input": self.embeddings,
        }
        for key, route in openai_routes.items():
            if isinstance(data, dict) and key in data:
                request[INVOKED_OPENAI] = True
                return await route(request)
        if not self.s.task.generates:  # an encoder: LoRAX's body is its /embed's or /classify's
            return await (self.embed if self.s.task.embeds else self.classify)(request)
        return await self.root(request)

    async def info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.s.info)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(openapi_document(str(self.s.info.get("version", ""))))

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body, content_type = self.s.metrics.render(self.s.engine, self.s.adapters)
        return web.Response(body=body, headers={"Content-Type": content_type})

    # ---- OpenAI routes --------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.StreamResponse:
        models = [{"id": self.s.model_id, "object": "model", "created": 0, "owned_by": "loraxpy"}]
        # Only what a caller without any token may use: private hub adapters and merges stay unlisted.
        for entry in self.s.adapters.public() if self.s.adapters else []:
            models.append(
                {
                    "id": entry.adapter_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "loraxpy",
                    "parent": self.s.model_id,
                }
            )
        return web.json_response({"object": "list", "data": models})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._serves("generation")
        req = await _parse(request, CompletionRequest)
        valid = await self._off_loop(
            validate_completion, req, self.s.limits, self.s.tokenizer, self.s.engine.grammars
        )
        valid = [c for v in valid for c in choices(v, req.n)]
        want_logprobs = req.logprobs is not None
        if req.stream:
            return await self._sse_openai(request, valid, req, chat=False, want_logprobs=want_logprobs)
        with self._admitted(len(valid)):
            gens = await self._run_many(valid)
        return web.json_response(
            R.completion_body(self.s.tokenizer, req.model or self.s.model_id, gens, want_logprobs)
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._serves("generation")
        req = await _parse(request, ChatCompletionRequest)
        tokenizer = await self._chat_tokenizer(req)
        valid = choices(
            await self._off_loop(validate_chat, req, self.s.limits, tokenizer, self.s.engine.grammars),
            req.n,
        )
        if req.stream:
            return await self._sse_openai(request, valid, req, chat=True, want_logprobs=req.logprobs)
        with self._admitted(len(valid)):
            gens = await self._run_many(valid)
        return web.json_response(
            R.chat_body(self.s.tokenizer, req.model or self.s.model_id, gens, req.logprobs)
        )

    async def _chat_tokenizer(self, req: ChatCompletionRequest) -> Tokenizer:
        """The tokenizer with the chat template of the adapter `model` names, if it ships one."""
        adapter_id, source = chat_adapter(req, self.s.limits)
        if adapter_id is None or self.s.adapters is None:  # no adapters: validation refuses it
            return self.s.tokenizer
        fetch = self.s.adapters.chat_template(adapter_id, source, req.api_token or "")
        template = await self._within_queue_time(fetch, self._queue_deadline())
        if template is None:
            return self.s.tokenizer
        try:
            return await self._off_loop(self.s.tokenizer.with_chat_template, template)
        except TemplateError as e:
            raise ValidationError(
                f"the adapter's chat template does not compile: {e}", param="model"
            ) from None

    async def _run_many(self, valid: list[ValidRequest]) -> list[R.Generation]:
        tasks = [asyncio.ensure_future(self._run(v)) for v in valid]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    async def _sse_openai(
        self,
        request: web.Request,
        valid: list[ValidRequest],
        req: CompletionRequest | ChatCompletionRequest,
        *,
        chat: bool,
        want_logprobs: bool,
    ) -> web.StreamResponse:
        with self._admitted(len(valid)):
            return await self._stream_openai(request, valid, req, chat=chat, want_logprobs=want_logprobs)

    async def _stream_openai(
        self,
        request: web.Request,
        valid: list[ValidRequest],
        req: CompletionRequest | ChatCompletionRequest,
        *,
        chat: bool,
        want_logprobs: bool,
    ) -> web.StreamResponse:
        rid = R.new_id("chatcmpl" if chat else "cmpl")
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.model or self.s.model_id,
        }
        queue: asyncio.Queue[tuple[int, TokenEvent | None]] = asyncio.Queue()
        gens = [R.Generation(v) for v in valid]
        tool_streams = [ToolCallStream() for _ in valid]

        async def pump(i: int) -> None:
            async with contextlib.aclosing(self._events(valid[i], gens[i])) as events:
                async for event in events:
                    await queue.put((i, event))
            await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(valid))]
        response: web.StreamResponse | None = None  # opened at the first token: earlier errors get a status
        try:
            remaining = len(valid)
            while remaining:
                i, event = await _next_item(queue, tasks)
                if event is None:
                    remaining -= 1
                    continue
                if response is None:
                    response = await self._open_openai_stream(request, base, len(valid), chat)
                if chat and valid[i].parse_tool_calls:  # tools: content and call deltas as they come
                    for choice in R.tool_stream_choices(tool_streams[i], event):
                        await _send(response, {**base, "choices": [{"index": i, **choice}]})
                    continue
                choice = self._chunk_choice(i, event, chat, want_logprobs)
                await _send(response, {**base, "choices": [choice]})
            response = response or await self._open_openai_stream(request, base, len(valid), chat)
            if req.stream_options is not None and req.stream_options.include_usage:
                await _send(response, {**base, "choices": [], "usage": R.usage(gens)})
        except RouterError as e:
            if response is None:
                raise
            await _send(response, openai_error_body(e)[1])
        finally:
            for t in tasks:
                t.cancel()
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _open_openai_stream(
        self, request: web.Request, base: dict[str, Any], n: int, chat: bool
    ) -> web.StreamResponse:
        response = await _open_sse(request)
        if chat:  # the role arrives first, once per choice
            for i in range(n):
                delta = {"role": "assistant", "content": ""}
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                await _send(response, {**base, "choices": [choice]})
        return response

    def _chunk_choice(self, i: int, e: TokenEvent, chat: bool, want_logprobs: bool) -> dict[str, Any]:
        tok = self.s.tokenizer
        finish = R.OPENAI_FINISH[e.finish_reason] if e.finish_reason is not None else None
        if chat:
            return {
                "index": i,
                "delta": {"content": e.text},
                "logprobs": R.chat_logprobs(tok, [e]) if want_logprobs else None,
                "finish_reason": finish,
            }
        text = tok.decode([e.token_id], skip_special_tokens=False)
        logprobs = {
            "tokens": [text],
            "token_logprobs": [e.logprob],
            "text_offset": [0],
            "top_logprobs": [{tok.decode([t], skip_special_tokens=False): lp for t, lp in e.top_logprobs}],
        }
        return {
            "index": i,
            "text": e.text,
            "logprobs": logprobs if want_logprobs else None,
            "finish_reason": finish,
        }


async def _next_item(
    queue: asyncio.Queue[tuple[int, TokenEvent | None]], tasks: Sequence[asyncio.Future[Any]]
) -> tuple[int, TokenEvent | None]:
    """The next event from any choice; re-raises the error of a choice that failed."""
    while True:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
        running: list[asyncio.Future[Any]] = [t for t in tasks if not t.done()]
        done, _ = await asyncio.wait([waiter, *running], return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()  # type: ignore[no-any-return]
        waiter.cancel()
        for t in done:
            error = t.exception()
            if error is not None:
                raise error


async def _open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def _send(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(b"data:" + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")


def build_app(
    state: ServerState, max_body_bytes: int = 4 * 2**20, cors_allow_origin: Sequence[str] = ()
) -> web.Application:
    """The app; run it with `keepalive_timeout` bounded (aiohttp's default idles an hour)."""
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware(state.api_key)], client_max_size=max_body_bytes
    )
    api = Api(state)
    app[STATE] = state
    app.add_routes(
        [
            web.post("/", api.root),
            web.get("/", api.health),  # LoRAX's: a probe
            web.get("/ping", api.health),  # SageMaker's probe
            web.get("/startup", api.health),  # Kubernetes' startup probe: ready once warmed up
            web.post("/invocations", api.invocations),
            web.post("/generate", api.generate),
            web.post("/generate_stream", api.generate_stream),
            web.post("/tokenize", api.tokenize),
            web.post("/embed", api.embed),
            web.post("/v1/embeddings", api.embeddings),
            web.post("/classify", api.classify),
            web.post("/classify_batch", api.classify_batch),
            web.get("/health", api.health),
            web.get("/info", api.info),
            web.get("/metrics", api.metrics),
            web.get("/openapi.json", api.openapi),
            web.get(swagger.DOCUMENT_PATH, api.openapi),
            web.get(swagger.PAGE_PATH, swagger.page),
            web.get(swagger.ASSETS_PATH, swagger.asset),
            web.get("/v1/models", api.models),
            web.post("/v1/completions", api.completions),
            web.post("/v1/chat/completions", api.chat_completions),
        ]
    )
    allow_origins(app, cors_allow_origin)
    return app
