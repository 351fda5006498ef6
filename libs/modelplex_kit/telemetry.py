"""Tracing and metrics.

Tracing: with an exporter configured, an OpenTelemetry SDK provider records a
span per hop and the edge propagates the trace to backends in gRPC metadata
(W3C ``traceparent``). Without one, no spans are made: recording them costs
tens of µs per hop for nobody. A trace context that arrives with a request is
still passed on, so callers' own traces stay whole.

Metrics: Prometheus collectors shared by all services. HTTP services serve
them on ``/metrics``; gRPC services on ``MODELPLEX_METRICS_PORT``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

GRPC_HANDLED = Counter(
    "modelplex_grpc_server_handled_total", "gRPC calls completed, by method and status code", ["method", "code"]
)
GRPC_LATENCY = Histogram(
    "modelplex_grpc_server_handling_seconds", "gRPC call duration", ["method"], buckets=_LATENCY_BUCKETS
)
HTTP_REQUESTS = Counter("modelplex_http_requests_total", "HTTP requests, by route and status", ["route", "status"])
HTTP_LATENCY = Histogram(
    "modelplex_http_request_duration_seconds",
    "HTTP request duration to the last byte",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter("modelplex_tokens_total", "Tokens processed, by model and kind (prompt/completion)", ["model", "kind"])


def configure_tracing(service: str, exporter: str = "none") -> None:
    if exporter == "none":
        return  # the API's no-op provider: propagates incoming context, records nothing
    provider = TracerProvider(resource=Resource.create({"service.name": f"modelplex-{service}"}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:  # optional dependency: opentelemetry-exporter-otlp
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("MODELPLEX_OTEL_EXPORTER=otlp but opentelemetry-exporter-otlp is not installed")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def outgoing_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the request id and the current trace context."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (("x-request-id", request_id), *carrier.items())


def incoming_context(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, Context]:
    """Request id and trace context from incoming gRPC metadata."""
    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    return carrier.get("x-request-id", ""), propagate.extract(carrier)
