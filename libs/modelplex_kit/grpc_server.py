"""gRPC aio server bootstrap shared by every backend.

``serve`` starts a server with grpc.health.v1 and reflection, one interceptor
that gives every call its request id, trace span, metrics and error mapping,
and a SIGTERM handler that stops accepting calls, drains in-flight ones for
``grace_seconds`` and exits. With a ``ready`` probe (a remote engine's), health
follows the engine: NOT_SERVING until it answers, and whenever it stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from prometheus_client import start_http_server

from modelplex_kit import cold_start
from modelplex_kit.connections import KEEPALIVE, ageing_options
from modelplex_kit.errors import ServiceError
from modelplex_kit.logging import configure_logging, request_id_var
from modelplex_kit.looplag import LoopLagMonitor, freeze_startup_heap
from modelplex_kit.memory import tune_malloc
from modelplex_kit.priority import incoming_priority, priority_var
from modelplex_kit.settings import GrpcServiceSettings
from modelplex_kit.telemetry import GRPC_HANDLED, GRPC_LATENCY, configure_tracing, incoming_context, labelled

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("modelplex.grpc")

# Infrastructure methods are not traced or counted: probes would drown the data.
_UNOBSERVED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class _Observation:
    """Request id, span, metrics and error mapping around one call."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.code = grpc.StatusCode.OK

    async def __aenter__(self) -> _Observation:
        metadata = context_metadata(self.context)
        request_id, parent = incoming_context(metadata)
        self._token = request_id_var.set(request_id)
        self._priority = priority_var.set(incoming_priority(metadata))
        self._span = _tracer.start_span(self.method, context=parent, kind=trace.SpanKind.SERVER)
        self._start = time.perf_counter()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            return await self._map_error(exc)
        finally:
            labelled(GRPC_LATENCY, self.method).observe(time.perf_counter() - self._start)
            labelled(GRPC_HANDLED, self.method, self.code.name).inc()
            self._span.set_attribute("rpc.grpc.status_code", self.code.value[0])
            self._span.end()
            request_id_var.reset(self._token)
            priority_var.reset(self._priority)

    async def _map_error(self, exc: BaseException | None) -> bool:
        """Maps a failure to the call's status; True when the failure is handled here."""
        if exc is None:
            return False
        if isinstance(exc, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED
            return False
        if isinstance(exc, grpc.aio.AbortError):
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            return False
        if isinstance(exc, ServiceError):
            self._finish(exc.status, exc.message, exc.trailing_metadata())
        else:
            log.exception("unhandled error in %s", self.method)
            self._finish(grpc.StatusCode.INTERNAL, "internal error in the model backend", ())
        _forget_frames(exc)
        return True

    def _finish(self, code: grpc.StatusCode, message: str, trailing_metadata: Any) -> None:
        """Ends the call with ``code`` without raising: gRPC sends the status when the handler returns.

        Not ``context.abort``: the AbortError it raises would keep the failure as its ``__context__``,
        gRPC keeps that AbortError in the call's state, and the failure's frames reach the call's
        state again: a reference cycle holding every local of the failed call (its request, for an
        embeddings request of 2048 inputs ~200 MB of tokenizer output) until Python's rare full
        collection finds it. Handled here, the failure and its frames are released with the call.
        """
        self.code = code
        self.context.set_code(code)
        self.context.set_details(message)
        if trailing_metadata:
            self.context.set_trailing_metadata(trailing_metadata)


def _forget_frames(exc: BaseException | None) -> None:
    """Drops the tracebacks of a handled failure and of the exceptions it chained.

    A traceback holds the frames it passed through, and with them every local of the failed call.
    Where one of those locals holds the exception again, that is a reference cycle only Python's
    rare full collection frees: an asyncio Future that failed with it (the transcription engine's
    worker: a 24 MB upload kept per refused request), a caught exception kept in a variable. Once
    the failure is mapped to the call's status and logged, no one needs its frames.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def context_metadata(context: grpc.aio.ServicerContext) -> Iterable[tuple[str, Any]]:
    return context.invocation_metadata() or ()


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNOBSERVED_PREFIXES):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _observe_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _observe_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client-streaming methods: none in Modelplex yet


def _observe_unary(method: str, behavior: Callable[..., Awaitable[Any]]):
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _Observation(method, context):
            return await behavior(request, context)

    return wrapper


def _observe_stream(method: str, behavior: Callable[..., AsyncIterator[Any]]):
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _Observation(method, context):
            held = cold_start.announcing(context)  # a pool holding it for a cold start says so at once
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                cold_start.stop_announcing(held)

    return wrapper


Registrar = Callable[[grpc.aio.Server], Iterable[str]]
ReadyProbe = Callable[[], Awaitable[bool]]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _set_health(servicer: health.aio.HealthServicer, services: list[str], ready: bool) -> None:
    for service in ["", *services]:
        await servicer.set(service, _SERVING if ready else _NOT_SERVING)


async def follow_readiness(
    servicer: health.aio.HealthServicer, services: list[str], ready: ReadyProbe, interval: float
) -> None:
    """Polls ``ready`` forever and mirrors each change into grpc.health (probes and the catalog read it)."""
    current: bool | None = None
    while True:
        now = await ready()
        if now != current:
            log.info("engine readiness changed", extra={"ready": now})
            await _set_health(servicer, services, now)
            current = now
        await asyncio.sleep(interval)


def server_options(settings: GrpcServiceSettings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    # The clients' keepalive pings accepted, and ageing that never ends a call within its deadline.
    options += KEEPALIVE.server_options()
    options += ageing_options(settings.max_connection_age_seconds, settings.max_connection_age_grace_seconds)
    return options


async def serve(
    name: str,
    settings: GrpcServiceSettings,
    register: Registrar,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ready: ReadyProbe | None = None,
) -> None:
    """Runs a gRPC service until SIGTERM/SIGINT, then drains and returns.

    ``register`` adds the service's servicers to the server and returns their
    full service names (for health and reflection). ``ready``, when given, is
    polled every ``settings.ready_poll_seconds``; health reports SERVING only
    while it returns True. Without it the service is SERVING once started.
    """
    server = grpc.aio.server(interceptors=[ObservingInterceptor()], options=server_options(settings))
    service_names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise SystemExit(f"{name}: cannot listen on {settings.listen}")
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    await server.start()
    lag = LoopLagMonitor().start()
    freeze_startup_heap()
    await _set_health(health_servicer, service_names, ready is None)
    follower = None
    if ready is not None:
        follower = asyncio.create_task(
            follow_readiness(health_servicer, service_names, ready, settings.ready_poll_seconds)
        )
    log.info("serving", extra={"listen": settings.listen, "services": service_names})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:  # on a signal, or when the caller cancels us (tests, embedding)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("shutting down: draining in-flight calls", extra={"grace_seconds": settings.grace_seconds})
        if follower is not None:
            follower.cancel()  # it must not flip health back to SERVING while we drain
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.grace_seconds)
        if on_shutdown is not None:
            await on_shutdown()
        await lag.stop()
    log.info("stopped")


def run(name: str, settings: GrpcServiceSettings, main: Callable[[], Awaitable[None]]) -> None:
    """Process entry point: allocator, logging, tracing, uvloop, then ``main``."""
    tune_malloc(settings.malloc_arenas, settings.malloc_mmap_threshold_bytes)  # before gRPC starts its threads
    configure_logging(name, settings.log_level, settings.log_format)
    configure_tracing(name, settings.otel_exporter)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep Windows usable
        asyncio.run(main())
    else:
        uvloop.run(main())
