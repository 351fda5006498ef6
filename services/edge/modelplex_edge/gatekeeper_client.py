"""The gatekeeper as the pipeline's Admission: a sidecar, or embedded in the edge.

One long-lived bidirectional stream carries every admission of this process:
a unary call per request would cost a whole gRPC round trip each time. Admits
and accounts are queued; whoever finds no write in flight writes everything
queued as one message (so under load many decisions share a write), and one
reader task hands each reply to the request waiting on its id. Accounts are
fire-and-forget. If the stream breaks, waiting requests get 503 + Retry-After,
unsent accounts are kept for the next stream, and the next request reconnects.
A stream that ends while admitted requests still run (the gatekeeper's server aged
the connection out, or it broke) is re-opened at once, naming those requests'
tickets (``resumed``), so the gatekeeper keeps their concurrency slots: nothing is
released early, and nothing is admitted twice.

Even so a Python gRPC hop costs more than the gatekeeper's budget (docs/benchmarks.md),
so the same decisions can also run embedded in the edge (target ``embedded``): with the
in-memory store for one replica, or Redis shared by many.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math

import grpc

from modelplex.v1 import common_pb2, gatekeeper_pb2_grpc
from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex_edge.admission import Admitted, Ask, Consumption, bearer_key, invalid_key
from modelplex_kit.connections import KEEPALIVE
from modelplex_kit.errors import ServiceError, model_not_found, unavailable
from modelplex_kit.logging import request_id_var

log = logging.getLogger(__name__)

_STATUS = {code.value[0]: code for code in grpc.StatusCode}
_UNREACHABLE = "The API gateway's access control is unavailable; please retry shortly."
# Accounts kept while the gatekeeper is unreachable (beyond this, the oldest are dropped and logged).
_MAX_UNSENT_ACCOUNTS = 10_000


def duration(ms: int) -> str:
    """OpenAI's reset format: 120ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, seconds = divmod(ms / 1000, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def rate_headers(reply: pb.AdmitReply) -> dict[str, str]:
    state = reply.rate_limit
    headers = {}
    if reply.limits_requests:
        headers["x-ratelimit-limit-requests"] = str(state.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(state.remaining_requests)
        headers["x-ratelimit-reset-requests"] = duration(state.reset_requests_ms)
    if reply.limits_tokens:
        headers["x-ratelimit-limit-tokens"] = str(state.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(state.remaining_tokens)
        headers["x-ratelimit-reset-tokens"] = duration(state.reset_tokens_ms)
    return headers


def denial_error(reply: pb.AdmitReply, ask: Ask, key: str) -> ServiceError:
    denial = reply.denial
    if denial.code == "invalid_api_key":
        return invalid_key(key)
    if denial.code == "model_not_found":
        return model_not_found(ask.model)
    retry_ms = max(1000, denial.retry_after_ms)
    if _STATUS.get(denial.status) == grpc.StatusCode.UNAVAILABLE:
        return unavailable(denial.message or _UNREACHABLE, math.ceil(retry_ms / 1000))
    headers = rate_headers(reply)
    headers["retry-after"] = str(math.ceil(denial.retry_after_ms / 1000) or 1)
    headers["retry-after-ms"] = str(max(1, denial.retry_after_ms))
    if denial.code == "insufficient_quota":
        headers["x-should-retry"] = "false"  # a spent budget does not come back in seconds
    return ServiceError(
        _STATUS.get(denial.status, grpc.StatusCode.RESOURCE_EXHAUSTED),
        denial.message,
        code=denial.code or None,
        type=denial.type or None,
        param=denial.param or None,
        headers=headers,
    )


def _fail(waiter: asyncio.Future | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_exception(ConnectionError())
        waiter.exception()  # retrieved: its admit may already have given up (and raised) on its own


class EmbeddedTransport:
    """The gatekeeper's decisions inside this process: no hop at all (one Redis round trip with Redis).

    Configured by the gatekeeper's own settings (MODELPLEX_KEYS_FILE, MODELPLEX_GATEKEEPER_*).
    Accounts to Redis run in the background so that its round trip never delays a response;
    in memory they are immediate.
    """

    def __init__(self) -> None:
        from modelplex_gatekeeper.embedded import embedded_gate

        self._gate, self._following = embedded_gate()
        self._accounts: set[asyncio.Task] = set()
        self._remote = self._gate.remote

    async def admit(self, request: pb.AdmitRequest) -> pb.AdmitReply:
        return await self._gate.admit(request)

    async def account(self, request: pb.AccountRequest) -> None:
        if not self._remote:
            await self._gate.account(request)
            return
        task = asyncio.create_task(self._gate.account(request))
        self._accounts.add(task)
        task.add_done_callback(self._accounts.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._accounts, return_exceptions=True)
        self._following.cancel()
        await self._gate.store.close()


class GatekeeperAdmission:
    """Admission decided by the gatekeeper, in a sidecar (``unix:///...``, ``host:port``) or ``embedded``."""

    def __init__(self, target: str, timeout_seconds: float = 2.0) -> None:
        self._transport = EmbeddedTransport() if target == "embedded" else StreamTransport(target, timeout_seconds)

    async def admit(self, ask: Ask) -> Admitted:
        key = bearer_key(ask.authorization)
        request = pb.AdmitRequest(
            api_key=key, model=ask.model, endpoint=ask.endpoint, estimated_tokens=max(0, ask.cost)
        )
        reply = await self._transport.admit(request)
        if not reply.allowed:
            raise denial_error(reply, ask, key)
        return Admitted(
            reply.principal_id,
            endpoint=ask.endpoint,
            model=ask.model,
            headers=rate_headers(reply),
            models=tuple(reply.models),
            ticket=reply.ticket,
            project=reply.project,
        )

    async def account(self, admitted: Admitted, used: Consumption, failed: bool) -> None:
        if not admitted.ticket:
            return
        await self._transport.account(
            pb.AccountRequest(
                ticket=admitted.ticket,
                model=admitted.model,
                endpoint=admitted.endpoint,
                usage=used.usage,
                units=used.units,
                unit_kind=used.unit_kind,
                failed=failed,
                ended=used.ended,
                meta=common_pb2.RequestMeta(request_id=request_id_var.get(), principal_id=admitted.principal_id),
            )
        )

    async def close(self) -> None:
        await self._transport.close()


class StreamTransport:
    """The sidecar over one multiplexed bidirectional stream."""

    def __init__(self, target: str, timeout_seconds: float = 2.0) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=KEEPALIVE.client_options())
        self._stub = gatekeeper_pb2_grpc.GatekeeperServiceStub(self._channel)
        self._timeout = timeout_seconds
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        # Tickets of admitted requests not yet accounted: resumed on a new stream if this one ends.
        self._running: set[str] = set()
        self._resumer: asyncio.Task | None = None
        self._closing = False
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._queue = pb.GateBatch()
        self._writing = False

    async def admit(self, request: pb.AdmitRequest) -> pb.AdmitReply:
        request.id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._pending[request.id] = waiter
        self._queue.admits.append(request)
        try:
            await self._write()
            reply = await asyncio.wait_for(waiter, self._timeout)
            if reply.ticket:
                self._running.add(reply.ticket)
            return reply
        except (TimeoutError, ConnectionError):
            raise unavailable(_UNREACHABLE) from None
        finally:
            self._pending.pop(request.id, None)

    async def account(self, request: pb.AccountRequest) -> None:
        self._running.discard(request.ticket)
        self._queue.accounts.append(request)
        try:
            await self._write()
        except ConnectionError:
            pass  # kept queued; sent on the next stream

    async def close(self) -> None:
        self._closing = True
        if self._resumer is not None:
            self._resumer.cancel()
        if self._queue.accounts:
            try:
                await self._write()
            except ConnectionError:
                log.error("usage of finished requests not delivered to the gatekeeper",
                          extra={"accounts": len(self._queue.accounts)})
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()

    # -- the stream --------------------------------------------------------------
    def _stream(self) -> grpc.aio.StreamStreamCall:
        if self._call is None:
            self._call = self._stub.Gate()
            self._reader = asyncio.create_task(self._read(self._call))
        return self._call

    async def _write(self) -> None:
        """Writes everything queued, unless a write is in flight (its writer picks our entries up)."""
        if self._writing:
            return
        self._writing = True
        try:
            while self._queue.admits or self._queue.accounts or self._queue.resumed:
                if self._call is None and self._running:  # a new stream: it takes over the running requests
                    self._queue.resumed[:] = sorted(self._running)
                batch, self._queue = self._queue, pb.GateBatch()
                try:
                    await self._stream().write(batch)
                except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                    self._broken(batch, exc)
                    raise ConnectionError from None
        finally:
            self._writing = False

    def _broken(self, batch: pb.GateBatch, exc: BaseException) -> None:
        log.warning("gatekeeper stream failed", extra={"error": type(exc).__name__})
        self._drop_stream()
        for admit in batch.admits:
            _fail(self._pending.pop(admit.id, None))
        kept = list(batch.accounts)[-_MAX_UNSENT_ACCOUNTS:]
        self._queue.accounts.extend(kept)
        # batch.resumed is not kept: the next stream names whatever is running then.

    def _drop_stream(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = None

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                for reply in message.replies:
                    waiter = self._pending.get(reply.id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(reply)
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("gatekeeper stream ended", extra={"error": type(exc).__name__})
        finally:
            if self._call is call:
                self._call = None
            # Every admission still waiting went out on this stream: it will not be answered.
            for waiter in self._pending.values():
                _fail(waiter)
            if self._running and not self._closing and (self._resumer is None or self._resumer.done()):
                self._resumer = asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        """Re-opens the stream for the requests still running, so the gatekeeper keeps their slots."""
        delay = 0.05
        for _ in range(8):  # about 6 s of tries: within the gatekeeper's window for resuming
            await asyncio.sleep(delay)
            if self._call is not None or not self._running:
                return  # a request re-opened it first (its batch named them), or they are done
            self._queue.resumed[:] = sorted(self._running)
            try:
                await self._write()
                return
            except ConnectionError:
                delay = min(delay * 2, 2.0)
        log.warning("could not resume requests in flight on the gatekeeper", extra={"requests": len(self._running)})
