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
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from prometheus_client import Counter, Gauge, Histogram

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

# Per-model serving metrics, recorded once in the edge's pipeline for every modality (and queue
# time in the backends). Named like vLLM's where they mean the same thing, so dashboards and
# autoscalers written for vLLM read them with a prefix change.
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TIME_TO_FIRST_TOKEN = Histogram(
    "modelplex_time_to_first_token_seconds",
    "Time from the request's arrival to its first streamed token, audio byte or event",
    ["model", "endpoint"],
    buckets=_REQUEST_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "modelplex_inter_token_latency_seconds",
    "Time between two streamed messages of one response",
    ["model", "endpoint"],
    buckets=_TOKEN_BUCKETS,
)
E2E_REQUEST_LATENCY = Histogram(
    "modelplex_e2e_request_latency_seconds",
    "Time from the request's arrival to its last byte, per model",
    ["model", "endpoint"],
    buckets=_REQUEST_BUCKETS,
)
REQUEST_QUEUE_TIME = Histogram(
    "modelplex_request_queue_time_seconds",
    "Time a request waited in a backend before its engine started on it",
    ["model"],
    buckets=_REQUEST_BUCKETS,
)
REQUESTS_RUNNING = Gauge(
    "modelplex_num_requests_running", "Requests in flight through the edge, per model", ["model", "endpoint"]
)
REQUESTS_WAITING = Gauge("modelplex_num_requests_waiting", "Requests queued in a backend for its engine", ["model"])
PROMPT_TOKENS = Counter("modelplex_prompt_tokens_total", "Prompt (input) tokens processed", ["model"])
GENERATION_TOKENS = Counter("modelplex_generation_tokens_total", "Generated (output) tokens", ["model"])
REQUEST_UNITS = Counter(
    "modelplex_request_units_total",
    "Non-token units served: images, audio/video seconds, characters",
    ["model", "kind"],
)

# Engine pools (modelplex_kit.pools): where each request went and why, and each replica's state.
POOL_PICKS = Counter(
    "modelplex_pool_picks_total",
    "Requests sent to a replica of an engine pool, by why it was picked (session, prefix, load, retry...)",
    ["pool", "replica", "reason"],
)
POOL_IN_FLIGHT = Gauge(
    "modelplex_pool_in_flight", "Requests this backend has in flight on a replica", ["pool", "replica"]
)
POOL_QUEUE_DEPTH = Gauge(
    "modelplex_pool_queue_depth", "Requests waiting in a replica's engine queue, as last known", ["pool", "replica"]
)
POOL_EJECTIONS = Counter(
    "modelplex_pool_ejections_total", "Replicas left out for a backoff after a failure", ["pool", "replica"]
)
POOL_HELD = Gauge(
    "modelplex_pool_held_requests",
    "Requests held for a replica to start (the pool has none ready: scale to zero)",
    ["pool"],
)
POOL_HOLD_SECONDS = Histogram(
    "modelplex_pool_hold_seconds",
    "How long held requests waited for a replica to start",
    ["pool", "outcome"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
POOL_SATURATED = Counter(
    "modelplex_pool_saturated_total", "Requests refused with 503 because every replica's queue was full", ["pool"]
)
POOL_SYNC = Counter(
    "modelplex_pool_sync_picks_total",
    "Picks shared between backend replicas of a pool: published, learned (from another backend) or dropped "
    "(Redis unreachable)",
    ["pool", "direction"],
)
POOL_KV_EVENTS = Counter(
    "modelplex_pool_kv_events_total",
    "Engines' KV-cache event batches received (batch), skipped sequence numbers (gap: that replica's view "
    "starts again) and undecodable batches",
    ["pool", "kind"],
)
POOL_TOKENIZE = Counter(
    "modelplex_pool_tokenize_total",
    "Prompts tokenized by an engine to look them up in its KV-cache events (ok, or failed: picked without)",
    ["pool", "outcome"],
)
POOL_ADAPTER_LOADS = Counter(
    "modelplex_pool_adapter_loads_total",
    "Requests for a LoRA adapter by what their replica needed: hit (already loaded), cold (loaded for it), failed",
    ["pool", "outcome"],
)
POOL_ADAPTER_EVICTIONS = Counter(
    "modelplex_pool_adapter_evictions_total",
    "LoRA adapters unloaded from a replica to make room for another",
    ["pool"],
)
POOL_ADAPTER_LOAD_SECONDS = Histogram(
    "modelplex_pool_adapter_load_seconds",
    "Time a replica took to load a LoRA adapter (a cold load, which the request waits for)",
    ["pool"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


_CHILDREN: dict[tuple[Any, tuple[str, ...]], Any] = {}


def labelled(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: prometheus_client's labels() (label checks, string
    conversion, a lock) costs more than the observation itself, and the edge makes several per
    request. Only for metrics whose children are never removed (the pools' are: they call labels())."""
    key = (metric, labels)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*labels)
    return child


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
