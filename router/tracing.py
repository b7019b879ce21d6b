"""OpenTelemetry traces over OTLP/HTTP (--otlp-endpoint): a span per request with validation, queue and
inference children. Without an endpoint every call is a no-op and opentelemetry is never imported.

Spans carry counts and outcomes only: no prompt text, no tokens, no API keys.
"""

from __future__ import annotations

import time
from typing import Any

SERVICE_NAME = "lorax-router"


class Tracer:
    def __init__(self, endpoint: str | None) -> None:
        self._tracer: Any = None
        self._provider: Any = None
        if endpoint:
            self._setup(endpoint)

    @property
    def is_enabled(self) -> bool:
        return self._tracer is not None

    def _setup(self, endpoint: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            raise ValueError("--otlp-endpoint needs the tracing extra: pip install 'loraxpy[tracing]'") from e
        url = endpoint.rstrip("/")
        if not url.endswith("/v1/traces"):
            url += "/v1/traces"
        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=url), schedule_delay_millis=200)
        )
        self._provider = provider
        self._tracer = provider.get_tracer("loraxpy.router")

    def start_request(self, name: str, start_ns: int) -> Any:
        if self._tracer is None:
            return None
        return self._tracer.start_span(name, start_time=start_ns)

    def child(self, parent: Any, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        if self._tracer is None or parent is None:
            return
        from opentelemetry import trace

        span = self._tracer.start_span(
            name, context=trace.set_span_in_context(parent), start_time=start_ns, attributes=attributes
        )
        span.end(end_time=end_ns)

    def end(self, span: Any, **attributes: Any) -> None:
        if span is None:
            return
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        span.end(end_time=time.time_ns())

    def grpc_metadata(self, span: Any) -> tuple[tuple[str, str], ...]:
        """W3C trace context of `span`, for the metadata of the gRPC call that serves it."""
        if span is None:
            return ()
        from opentelemetry import trace
        from opentelemetry.propagate import inject

        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(span))
        return tuple(carrier.items())

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
