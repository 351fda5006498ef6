"""Quota leases: most admissions decided in this process, from allowances the gatekeeper leases.

The gatekeeper stays the one authority: a lease is an allowance of one key's requests,
tokens and concurrency slots that the gatekeeper has already reserved in its store (memory
or the Redis every replica shares), so spending it here can never admit more than the
key's limits. The book below holds at most one current lease per key, renews it in the
background before it runs out (half its requests spent, or half its time gone), and
returns what was not used when it expires (once its requests in flight are over).

The gatekeeper sizes each lease from the rate this edge reports for the key, and to at
most a quarter of what the key has left: a key well under its limits always has a lease
ready, a key near them gets none and every request is decided by the gatekeeper.

Keys (the secrets) are only dictionary keys here, in memory; they are never logged.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from modelplex.v1 import gatekeeper_pb2 as pb

log = logging.getLogger(__name__)

#: Used until the gatekeeper says how long its leases last.
DEFAULT_LEASE_SECONDS = 1.0
#: What a fail-open lease holds: no limit.
UNLIMITED = 2**62
#: After a renewal got no answer, the key's next renewal waits this long (no storm during an outage).
RETRY_SECONDS = 0.25


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


@dataclass(slots=True)
class Lease:
    """One key's allowance from the gatekeeper, spent here until it expires."""

    principal_id: str
    ticket: str
    models: tuple[str, ...]
    requests: int
    tokens: int
    slots: int
    ttl: float
    granted: float
    #: The gatekeeper's view of the key when it granted the lease (for x-ratelimit-* headers).
    state: pb.RateLimitState
    limits_requests: bool
    limits_tokens: bool
    size_requests: int = 0
    size_tokens: int = 0
    in_flight: int = 0
    #: Revoked, replaced or expired: no more admissions; returned once nothing is in flight.
    closed: bool = False
    #: Refreshed here while the gatekeeper was unreachable (fail-open): the gatekeeper never
    #: reserved it, so it is never returned.
    local: bool = False

    def __post_init__(self) -> None:
        self.size_requests, self.size_tokens = self.requests, self.tokens

    @property
    def expires(self) -> float:
        return self.granted + self.ttl

    def covers(self, model: str, cost: int, now: float) -> bool:
        return (
            not self.closed
            and now < self.expires
            and self.requests >= 1
            and (not self.limits_tokens or self.tokens >= cost)
            and (not self.slots or self.in_flight < self.slots)
            and any(fnmatch.fnmatchcase(model, glob) for glob in self.models)
        )

    def wants_renewal(self, now: float) -> bool:
        return self.requests * 2 <= self.size_requests or now >= self.granted + self.ttl / 2

    def headers(self, now: float) -> dict[str, str]:
        """x-ratelimit-*: what the gatekeeper saw at the grant, plus what is left of the lease."""
        elapsed = int((now - self.granted) * 1000)
        state, headers = self.state, {}
        left_requests, left_tokens = (0, 0) if self.local else (self.requests, self.tokens)
        if self.limits_requests:
            headers["x-ratelimit-limit-requests"] = str(state.limit_requests)
            headers["x-ratelimit-remaining-requests"] = str(state.remaining_requests + left_requests)
            headers["x-ratelimit-reset-requests"] = duration(max(0, state.reset_requests_ms - elapsed))
        if self.limits_tokens:
            headers["x-ratelimit-limit-tokens"] = str(state.limit_tokens)
            headers["x-ratelimit-remaining-tokens"] = str(state.remaining_tokens + left_tokens)
            headers["x-ratelimit-reset-tokens"] = duration(max(0, state.reset_tokens_ms - elapsed))
        return headers

    def unused(self) -> pb.LeaseReturn:
        return pb.LeaseReturn(ticket=self.ticket, requests=self.requests, tokens=self.tokens, slots=self.slots)


@dataclass(slots=True)
class Draw:
    """One request admitted from a lease: given back to the lease when the request is over."""

    lease: Lease
    owner: KeyLeases
    tokens: int


@dataclass(slots=True)
class KeyLeases:
    """One key's leases on this edge, and the rate that sizes the next one."""

    current: Lease | None = None
    #: The last lease the gatekeeper granted (fail-open serves at its size while it is unreachable).
    last: Lease | None = None
    #: Closed leases with requests still in flight.
    draining: list[Lease] = field(default_factory=list)
    renewing: bool = False
    #: After a failed renewal, none is tried before this (monotonic seconds).
    retry_at: float = 0.0
    in_flight: int = 0
    period_start: float = 0.0
    this_period: int = 0
    last_period: int = 0
    peak_in_flight: int = 0
    last_peak: int = 0

    def count(self, now: float, period: float) -> None:
        if now - self.period_start >= period:
            recent = now - self.period_start < 2 * period
            self.last_period = self.this_period if recent else 0
            self.last_peak = self.peak_in_flight if recent else 0
            self.this_period, self.peak_in_flight, self.period_start = 0, 0, now
        self.this_period += 1

    def ask(self) -> pb.LeaseAsk:
        return pb.LeaseAsk(
            recent_requests=max(self.this_period, self.last_period),
            in_flight=max(self.in_flight, self.peak_in_flight, self.last_peak),
        )


Renew = Callable[[str, pb.AdmitRequest], Awaitable[pb.AdmitReply]]


class LeaseBook:
    """Every key's leases on this edge.

    ``renew`` sends a lease-only admission to the gatekeeper; ``give_back`` queues a LeaseReturn.
    ``fail_open``: while the gatekeeper is unreachable, a key it granted a lease to keeps being admitted,
    without limits; otherwise (closed) its requests are refused (503) once its lease expires.
    """

    def __init__(self, renew: Renew, give_back: Callable[[pb.LeaseReturn], None], fail_open: bool) -> None:
        self._renew = renew
        self._give_back = give_back
        self._fail_open = fail_open
        self._keys: dict[str, KeyLeases] = {}
        self._period = DEFAULT_LEASE_SECONDS
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        #: Set while the gatekeeper does not answer (cleared by its next reply).
        self.unreachable = False

    def __len__(self) -> int:
        """Keys this edge keeps state for (bounded: quiet keys are forgotten)."""
        return len(self._keys)

    # -- admissions ---------------------------------------------------------------
    def draw(self, key: str, model: str, endpoint: str, cost: int) -> Draw | None:
        """Admits the request from the key's lease, or None (the gatekeeper decides it)."""
        now = time.monotonic()
        leases = self._keys.get(key)
        if leases is None:
            leases = self._keys[key] = KeyLeases(period_start=now)
            if self._sweeper is None:  # forgets keys gone quiet (a flood of made-up keys too)
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        leases.count(now, self._period)
        lease = leases.current
        if lease is not None and (now >= lease.expires or (lease.local and not self.unreachable)):
            self._close(leases, lease)
            lease = None
        if lease is None or not lease.covers(model, cost, now):
            if not (self.unreachable and self._fail_open and leases.last is not None):
                return None
            lease = self._refresh_locally(leases, leases.last, now)
            if not lease.covers(model, cost, now):
                return None
        lease.requests -= 1
        lease.in_flight += 1
        leases.in_flight += 1
        leases.peak_in_flight = max(leases.peak_in_flight, leases.in_flight)
        drawn = cost if lease.limits_tokens else 0
        lease.tokens -= drawn
        if not leases.renewing and now >= leases.retry_at and lease.wants_renewal(now):
            self._start_renewal(key, leases, model, endpoint, cost)
        return Draw(lease, leases, drawn)

    def wants_lease(self, key: str) -> pb.LeaseAsk | None:
        """What to ask for with a decision the gatekeeper makes (None: a renewal is already on its way)."""
        leases = self._keys.get(key)
        if leases is None or leases.renewing:
            return None
        leases.renewing = True  # until this decision's reply
        return leases.ask()

    def granted(self, key: str, reply: pb.AdmitReply, asked: bool = True) -> None:
        """The reply to a decision or renewal for this key (``asked``: it asked for a lease)."""
        self.unreachable = False
        leases = self._keys.get(key)
        if leases is None:
            return
        if asked:
            leases.renewing = False
        if not reply.HasField("lease"):
            return
        lease = reply.lease
        self._period = lease.ttl_ms / 1000
        if leases.current is not None:
            self._close(leases, leases.current)
        leases.current = leases.last = Lease(
            principal_id=reply.principal_id,
            ticket=lease.ticket,
            models=tuple(reply.models),
            requests=lease.requests,
            tokens=lease.tokens,
            slots=lease.slots,
            ttl=lease.ttl_ms / 1000,
            granted=time.monotonic(),
            state=reply.rate_limit,
            limits_requests=reply.limits_requests,
            limits_tokens=reply.limits_tokens,
        )

    def failed(self, key: str, unreachable: bool = True, asked: bool = True) -> None:
        """A decision or renewal for this key got no answer (``unreachable``: the gatekeeper did not
        answer; else the request went away while it waited; ``asked``: it asked for a lease)."""
        leases = self._keys.get(key)
        if leases is not None and asked:
            leases.renewing = False
        if unreachable:
            self.unreachable = True
            if leases is not None:
                leases.retry_at = time.monotonic() + RETRY_SECONDS

    def denied(self, key: str) -> None:
        """The gatekeeper refused this key outright (revoked, unknown): its leases end now."""
        leases = self._keys.pop(key, None)
        if leases is not None:
            self._end_all(leases)

    def finished(self, draw: Draw) -> None:
        """A request admitted from a lease is over: its slot is free again."""
        lease = draw.lease
        lease.in_flight -= 1
        draw.owner.in_flight -= 1
        if lease.closed and lease.in_flight == 0:
            if lease in draw.owner.draining:
                draw.owner.draining.remove(lease)
            self._return(lease)

    def revoked(self, principals: list[str]) -> None:
        """Keys edited or revoked in the gatekeeper: their leases end now (the next request asks again)."""
        names = set(principals)
        for key, leases in list(self._keys.items()):
            lease = leases.current
            if lease is not None and lease.principal_id in names:
                del self._keys[key]
                self._end_all(leases)

    def close(self) -> None:
        """Returns every lease with nothing in flight (the edge is stopping)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in self._tasks:
            task.cancel()
        for leases in self._keys.values():
            self._end_all(leases)
        self._keys.clear()

    # -- inside -------------------------------------------------------------------
    def _refresh_locally(self, leases: KeyLeases, lease: Lease, now: float) -> Lease:
        """Fail-open: the gatekeeper is unreachable; a key it vouched for is admitted without its limits
        (as Envoy's failure_mode_allow) for a lease period at a time, until the gatekeeper answers again."""
        fresh = Lease(
            principal_id=lease.principal_id,
            ticket=lease.ticket,
            models=lease.models,
            requests=UNLIMITED,
            tokens=UNLIMITED,
            slots=0,
            ttl=lease.ttl,
            granted=now,
            state=lease.state,
            limits_requests=lease.limits_requests,
            limits_tokens=lease.limits_tokens,
            local=True,
        )
        if leases.current is not None:
            self._close(leases, leases.current)
        leases.current = fresh
        return fresh

    def _close(self, leases: KeyLeases, lease: Lease) -> None:
        lease.closed = True
        if leases.current is lease:
            leases.current = None
        if lease.in_flight:
            leases.draining.append(lease)
        else:
            self._return(lease)

    def _end_all(self, leases: KeyLeases) -> None:
        if leases.current is not None:
            self._close(leases, leases.current)

    def _return(self, lease: Lease) -> None:
        if lease.local:
            return
        if lease.requests or lease.tokens or lease.slots:
            self._give_back(lease.unused())
        lease.requests = lease.tokens = lease.slots = 0

    def _start_renewal(self, key: str, leases: KeyLeases, model: str, endpoint: str, cost: int) -> None:
        leases.renewing = True
        request = pb.AdmitRequest(
            api_key=key, model=model, endpoint=endpoint, estimated_tokens=cost, lease=leases.ask(), lease_only=True
        )
        task = asyncio.get_running_loop().create_task(self._renewal(key, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renewal(self, key: str, request: pb.AdmitRequest) -> None:
        try:
            reply = await self._renew(key, request)
        except Exception:  # unreachable: the current lease runs out, then the policy applies
            self.failed(key)
            return
        except asyncio.CancelledError:
            self.failed(key, unreachable=False)
            raise
        if not reply.allowed and reply.denial.code == "invalid_api_key":
            self.denied(key)
            return
        self.granted(key, reply)

    async def _sweep(self) -> None:
        """Returns leases that expired with no request to notice, and forgets keys gone quiet."""
        while True:
            await asyncio.sleep(self._period / 2)
            now = time.monotonic()
            for key, leases in list(self._keys.items()):
                leases.draining = [lease for lease in leases.draining if lease.in_flight]
                lease = leases.current
                if lease is not None and now >= lease.expires:
                    self._close(leases, lease)
                if leases.current is None and not leases.draining and now - leases.period_start > 4 * self._period:
                    del self._keys[key]
