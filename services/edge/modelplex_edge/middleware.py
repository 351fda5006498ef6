"""The edge's one ASGI middleware: request id, body limit and read timeout, trace span, metrics.

Written as plain ASGI (not BaseHTTPMiddleware) because it wraps every request,
streaming ones included, and must add next to nothing to the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from opentelemetry import trace
from starlette.requests import ClientDisconnect

from modelplex_edge.errors import BodyTimeout, BodyTooLarge, http_only_error, internal_error
from modelplex_kit.logging import request_id_var
from modelplex_kit.telemetry import HTTP_LATENCY, HTTP_REQUESTS, labelled

_tracer = trace.get_tracer("modelplex.edge")
log = logging.getLogger(__name__)
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class EdgeMiddleware:
    def __init__(
        self,
        app,
        max_body_bytes: int,
        body_timeout_seconds: float = 30.0,
        body_deadline_seconds: float = 300.0,
        upload_paths: frozenset[str] = frozenset(),
        max_upload_bytes: int = 0,
        body_limits: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout_seconds
        self.body_deadline = body_deadline_seconds
        # File-upload endpoints get their own (larger) body limit.
        self.upload_paths = upload_paths
        self.max_upload_bytes = max(max_upload_bytes, max_body_bytes)
        # Upload endpoints with a limit of their own (path -> bytes).
        self.body_limits = body_limits or {}

    def _limit(self, scope) -> int:
        if (own := self.body_limits.get(scope.get("path"))) is not None:
            return own
        return self.max_upload_bytes if scope.get("path") in self.upload_paths else self.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming.decode() if incoming and _SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status = 500
        started = False
        start = scope["modelplex.start"] = time.perf_counter()

        async def send_with_id(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        span = _tracer.start_span(scope["method"], kind=trace.SpanKind.SERVER)
        try:
            with trace.use_span(span):
                if self._declared_too_large(scope):  # refused before auth or parsing
                    limit = BodyTooLarge(self._limit(scope))
                    await http_only_error(413, str(limit))(scope, receive, send_with_id)
                    return
                await self.app(scope, self._limited(receive, self._limit(scope)), send_with_id)
        except ClientDisconnect:  # the client left mid-upload: its problem, not a server error
            status = 499
            log.info("client disconnected before sending the whole body")
        except BodyTimeout as exc:
            status = 408
            log.info("request body too slow; closing the connection")
            if not started:
                await http_only_error(408, str(exc), close=True)(scope, receive, send_with_id)
        except Exception:
            # Here, not in an app-level handler, so the log line and the response keep the request id.
            log.exception("unhandled error")
            if not started:
                await internal_error()(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            label = route.path if route is not None else "unmatched"
            span.update_name(f"{scope['method']} {label}")  # the route, not the raw path: few names
            span.end()
            labelled(HTTP_LATENCY, label).observe(time.perf_counter() - start)
            labelled(HTTP_REQUESTS, label, str(status)).inc()
            request_id_var.reset(token)

    def _declared_too_large(self, scope) -> bool:
        declared = _header(scope, b"content-length")
        return declared is not None and declared.isdigit() and int(declared) > self._limit(scope)

    def _limited(self, receive, limit: int):
        """receive() that bounds the body: its size (also when chunked), the wait for each piece of
        it, and the whole of it from the first read: a client sending a byte every few seconds (each
        gap short enough) cannot hold a connection for longer than the body deadline.
        Once the body is complete, receive() is left alone: it then waits for a disconnect."""
        loop = asyncio.get_running_loop()
        seen = 0
        complete = False
        deadline: float | None = None

        async def guarded():
            nonlocal seen, complete, deadline
            if complete:
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.body_deadline
            left = deadline - loop.time()
            if left <= 0:
                raise BodyTimeout(self.body_deadline, "The whole request body")
            try:
                # asyncio.timeout, not wait_for: wait_for runs receive() in a task of its own, per call.
                async with asyncio.timeout(min(self.body_timeout, left)):
                    message = await receive()
            except TimeoutError:
                if left < self.body_timeout:
                    raise BodyTimeout(self.body_deadline, "The whole request body") from None
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
                complete = not message.get("more_body", False)
            return message

        return guarded
