"""The gatekeeper as the pipeline's Admission: a sidecar, or embedded in the edge.

One long-lived bidirectional stream carries every admission of this process:
a unary call per request would cost a whole gRPC round trip each time. Admits
and accounts are queued; whoever finds no write in flight writes everything
queued as one message (so under load many decisions share a write), and one
reader task hands each reply to the request waiting on its id. Accounts are
fire-and-forget and batched (what finishes within ACCOUNT_DELAY_SECONDS). If the stream
breaks, waiting requests get 503 + Retry-After, unsent accounts are kept for the next stream,
and the next request reconnects.
A stream that ends while admitted requests still run (the gatekeeper's server aged
the connection out, or it broke) is re-opened at once, naming those requests'
tickets (``resumed``), so the gatekeeper keeps their concurrency slots: nothing is
released early, and nothing is admitted twice. Most requests never wait on the stream at all:
they are admitted from quota leases (modelplex_edge.leases).

While the sidecar is unreachable every request that needs it fails the same way; the outage is logged
as state changes (modelplex_kit.outages): one WARNING when it begins, a summary at most every
``summary_seconds`` while it lasts (requests refused, stream failures), one INFO line when the sidecar
answers again. A stream a write went through on that then ends (the server aged it out) is one line, as before.

Even so a Python gRPC hop costs more than the gatekeeper's budget (docs/benchmarks.md),
so the same decisions can also run embedded in the edge (target ``embedded``): with the
in-memory store for one replica, or Redis shared by many.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable

import grpc

from modelplex.v1 import common_pb2, gatekeeper_pb2_grpc
from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex_edge.admission import Admitted, Ask, Consumption, bearer_key, invalid_key
from modelplex_edge.leases import Draw, LeaseBook, duration
from modelplex_kit.connections import KEEPALIVE
from modelplex_kit.errors import ServiceError, model_not_found, unavailable
from modelplex_kit.logging import request_id_var
from modelplex_kit.outages import SUMMARY_SECONDS, OutageLog

log = logging.getLogger(__name__)

_STATUS = {code.value[0]: code for code in grpc.StatusCode}
_UNREACHABLE = "The API gateway's access control is unavailable; please retry shortly."
# Accounts kept while the gatekeeper is unreachable (beyond this, the oldest are dropped and logged).
_MAX_UNSENT_ACCOUNTS = 10_000
# Accounts go to the gatekeeper in batches: everything queued within ACCOUNT_DELAY_SECONDS of the
# first (or this many at once, or sooner with an admission that needs the sidecar); what queues while a
# write is in flight goes with the next write.
FLUSH_BATCH = 256
# Long enough that sequential requests share a stream write (each write costs the edge more CPU than a
# leased request's own admission: it landed on the next request's latency), short against everything a
# limit or a meter reads (a lease lasts a second).
ACCOUNT_DELAY_SECONDS = 0.005


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


def _error_name(exc: BaseException) -> str:
    """A gRPC status code, or the exception's type: never its text (which may name internal addresses)."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return code().name
        except Exception:
            pass
    return type(exc).__name__


def embedded_transport():
    """The gatekeeper's decisions inside this process (its public facade; imported only when asked for)."""
    from modelplex_gatekeeper.embedded import EmbeddedGatekeeper

    return EmbeddedGatekeeper()


def _from_lease(draw: Draw, ask: Ask) -> Admitted:
    lease = draw.lease
    return Admitted(
        lease.principal_id,
        endpoint=ask.endpoint,
        model=ask.model,
        headers=lease.headers(time.monotonic()),
        models=lease.models,
        ticket=lease.ticket,
        lease=draw,
    )


class GatekeeperAdmission:
    """Admission decided by the gatekeeper, in a sidecar (``unix:///...``, ``host:port``) or ``embedded``.

    With the sidecar, most requests are admitted from quota leases (modelplex_edge.leases) without
    waiting on it; ``fail_open`` is what a key with a lease gets while the sidecar is unreachable.
    """

    def __init__(
        self,
        target: str,
        timeout_seconds: float = 2.0,
        *,
        leases: bool = True,
        fail_open: bool = False,
        summary_seconds: float = SUMMARY_SECONDS,
    ) -> None:
        self._book: LeaseBook | None = None
        self._outage: OutageLog | None = None
        if target == "embedded":
            self._transport = embedded_transport()
            return
        stream = StreamTransport(target, timeout_seconds, summary_seconds)
        self._transport = stream
        self._outage = stream.outage
        if leases:
            self._book = LeaseBook(stream.renew, stream.give_back, fail_open)
            stream.on_revoked = self._book.revoked

    async def admit(self, ask: Ask) -> Admitted:
        key = bearer_key(ask.authorization)
        cost = max(0, ask.cost)
        book = self._book if ask.model else None  # identity-only checks are never leased
        if book is not None:
            draw = book.draw(key, ask.model, ask.endpoint, cost)
            if draw is not None:
                return _from_lease(draw, ask)
        request = pb.AdmitRequest(api_key=key, model=ask.model, endpoint=ask.endpoint, estimated_tokens=cost)
        asked = False
        if book is not None:
            wanted = book.wants_lease(key)
            if wanted is not None:
                request.lease.CopyFrom(wanted)
                asked = True
        try:
            reply = await self._transport.admit(request)
        except BaseException as exc:  # unreachable (a 503), or the client left while it waited
            unreachable = isinstance(exc, ServiceError)
            draw = None
            if book is not None:
                book.failed(key, unreachable=unreachable, asked=asked)
                draw = book.draw(key, ask.model, ask.endpoint, cost) if unreachable else None
            if unreachable and self._outage is not None:
                self._outage.failed(
                    "no decision", "requests refused" if draw is None else "requests admitted fail-open"
                )
            if draw is None:
                raise
            return _from_lease(draw, ask)  # fail-open: a key the gatekeeper vouched for
        if book is not None:
            if reply.denial.code == "invalid_api_key":
                book.denied(key)
            else:
                book.granted(key, reply, asked)
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
        lease_tokens = 0
        if admitted.lease is not None and self._book is not None:
            lease_tokens = admitted.lease.tokens
            self._book.finished(admitted.lease)
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
                lease_tokens=lease_tokens,
                response_id=admitted.response_id,
            )
        )

    def hand_off(self, admitted: Admitted) -> None:
        """With the sidecar, a request admitted over the stream is resumed on every new stream until it is
        accounted; one the jobs process accounts would be resumed by this edge forever."""
        if isinstance(self._transport, StreamTransport) and admitted.ticket and admitted.lease is None:
            self._transport.forget(admitted.ticket)

    def take_over(self, admitted: Admitted) -> None:
        if isinstance(self._transport, StreamTransport) and admitted.ticket and admitted.lease is None:
            self._transport.take_over(admitted.ticket)

    async def close(self) -> None:
        if self._book is not None:
            self._book.close()  # unused leases go back with the last batch
        await self._transport.close()


class StreamTransport:
    """The sidecar over one multiplexed bidirectional stream."""

    def __init__(self, target: str, timeout_seconds: float = 2.0, summary_seconds: float = SUMMARY_SECONDS) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=KEEPALIVE.client_options())
        self._stub = gatekeeper_pb2_grpc.GatekeeperServiceStub(self._channel)
        self._timeout = timeout_seconds
        self._call: grpc.aio.StreamStreamCall | None = None
        #: The last stream a write went through on: if it ends, it was working (not an outage).
        self._taken: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        # Tickets of admitted requests not yet accounted: resumed on a new stream if this one ends.
        self._running: set[str] = set()
        self._resumer: asyncio.Task | None = None
        self._closing = False
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._queue = pb.GateBatch()
        self._writing = False
        self._flush: asyncio.TimerHandle | asyncio.Handle | None = None
        self._flushing: set[asyncio.Task] = set()
        #: Told the names of keys the gatekeeper says were edited or revoked.
        self.on_revoked: Callable[[list[str]], None] | None = None
        #: Failures to reach the sidecar, logged once per outage (and a summary while it lasts).
        self.outage = OutageLog(log, "gatekeeper", summary_seconds=summary_seconds)

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
        except TimeoutError:
            self.outage.failed(f"no answer within {self._timeout:g} s", "admissions timed out")
            raise unavailable(_UNREACHABLE) from None
        except ConnectionError:  # the stream's failure is logged where it was seen
            raise unavailable(_UNREACHABLE) from None
        finally:
            self._pending.pop(request.id, None)

    async def renew(self, key: str, request: pb.AdmitRequest) -> pb.AdmitReply:
        """A lease-only admission (the lease book's renewal)."""
        return await self.admit(request)

    async def account(self, request: pb.AccountRequest) -> None:
        """Queued, and sent in a batch: with the next admission, or ACCOUNT_DELAY_SECONDS after the first
        queued (or at once when the batch is full). A crash loses at most the batch not yet sent."""
        self._running.discard(request.ticket)
        self._queue.accounts.append(request)
        if len(self._queue.accounts) >= FLUSH_BATCH:
            await self._send_queued()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(ACCOUNT_DELAY_SECONDS, self._flush_now)

    def forget(self, ticket: str) -> None:
        """Another process accounts this ticket: it is not this stream's to resume."""
        self._running.discard(ticket)

    def take_over(self, ticket: str) -> None:
        """A ticket admitted by another process (the edge), accounted by this one: the gatekeeper is told now
        that this stream holds it (``resumed``), so its slot is kept while this process lives."""
        self._running.add(ticket)
        self._queue.resumed.append(ticket)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._flush_now)

    def give_back(self, returned: pb.LeaseReturn) -> None:
        """The unused rest of a lease: sent with the next batch."""
        self._queue.returns.append(returned)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush = None
        task = asyncio.get_running_loop().create_task(self._send_queued())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send_queued(self) -> None:
        try:
            await self._write()
        except ConnectionError:
            pass  # kept queued; sent on the next stream

    async def close(self) -> None:
        self._closing = True
        if self._resumer is not None:
            self._resumer.cancel()
        if self._flush is not None:
            self._flush.cancel()
        await asyncio.gather(*self._flushing, return_exceptions=True)
        if self._queue.accounts or self._queue.returns:
            try:
                await self._write()
            except ConnectionError:
                log.error(
                    "usage of finished requests not delivered to the gatekeeper",
                    extra={"accounts": len(self._queue.accounts)},
                )
        if self._call is not None:
            await self._finish(self._call)
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()

    async def _finish(self, call: grpc.aio.StreamStreamCall) -> None:
        """Ends the stream cleanly: the gatekeeper handles everything written, then ends it too."""
        try:
            await call.done_writing()
            if self._reader is not None:
                await asyncio.wait_for(asyncio.shield(self._reader), self._timeout)
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError, TimeoutError):
            pass
        call.cancel()

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
            while self._queue.admits or self._queue.accounts or self._queue.returns or self._queue.resumed:
                if self._call is None and self._running:  # a new stream: it takes over the running requests
                    self._queue.resumed[:] = sorted(self._running)
                batch, self._queue = self._queue, pb.GateBatch()
                try:
                    call = self._stream()
                    await call.write(batch)
                    self._taken = call  # the sidecar took a write (an outage ends at its next answer)
                except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                    self._broken(batch, exc)
                    raise ConnectionError from None
        finally:
            self._writing = False

    def _broken(self, batch: pb.GateBatch, exc: BaseException) -> None:
        self.outage.failed(f"stream failed ({_error_name(exc)})", "stream failures")
        self._drop_stream()
        for admit in batch.admits:
            _fail(self._pending.pop(admit.id, None))
        kept = list(batch.accounts)[-_MAX_UNSENT_ACCOUNTS:]
        self._queue.accounts.extend(kept)
        # batch.resumed is not kept: the next stream names whatever is running then.
        # Leases issued on a broken stream were released by the gatekeeper when it ended.

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
                self.outage.recovered()  # a None check, unless an outage ends here (one INFO line)
                for reply in message.replies:
                    waiter = self._pending.get(reply.id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(reply)
                if message.revoked and self.on_revoked is not None:
                    self.on_revoked(list(message.revoked))
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                pass
            elif call is self._taken:  # a stream the sidecar took ended (aged out, or it went away): once
                log.warning("gatekeeper stream ended", extra={"error": _error_name(exc)})
            elif self._call is call:  # no write went through: unreachable (unless the write failed first)
                self.outage.failed(f"stream failed ({_error_name(exc)})", "stream failures")
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
        self.outage.failed(f"could not resume {len(self._running)} requests in flight", "resumes given up")
