"""The decisions: who a key is, whether it may use a model, whether its limits allow a request.

Messages never contain a key, only its name; the edge writes the 401 itself
(it has the key to mask).
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
import secrets
import time
from collections.abc import Iterable

import grpc

from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex_gatekeeper.keys import KeyRecord, KeyRing
from modelplex_gatekeeper.metrics import REQUESTS, TOKENS, UNITS
from modelplex_gatekeeper.store import (
    CONCURRENCY,
    DAILY,
    Accounting,
    Allowance,
    Decision,
    MemoryStore,
    Store,
    StoreUnavailable,
)
from modelplex_gatekeeper.store import REQUESTS as BY_REQUESTS
from modelplex_gatekeeper.store import TOKENS as BY_TOKENS
from modelplex_kit.priority import BATCH_CREATE_ENDPOINT, BATCH_LINE_PREFIX
from modelplex_kit.telemetry import labelled

log = logging.getLogger(__name__)

_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def wait_text(ms: int) -> str:
    return f"{ms}ms" if ms < 1000 else f"{math.ceil(ms / 1000)}s"


def limit_denial(key: KeyRecord, model: str, cost: int, decision: Decision) -> pb.Denial:
    where = f"Rate limit reached for {model} in project {key.project} (key {key.name})"
    retry = f"Please try again in {wait_text(decision.retry_after_ms)}."
    why = decision.denied_by
    if why == BY_REQUESTS:
        message = f"{where} on requests per min (RPM): Limit {key.rpm}, Used {decision.used}, Requested 1. {retry}"
        return pb.Denial(
            status=_EXHAUSTED,
            code="rate_limit_exceeded",
            type="requests",
            message=message,
            retry_after_ms=decision.retry_after_ms,
        )
    if why == BY_TOKENS:
        numbers = f"Limit {key.tpm}, Used {decision.used}, Requested {cost}."
        if cost > key.tpm:
            message = (
                f"Request too large for {model} in project {key.project} (key {key.name}) on tokens per min "
                f"(TPM): {numbers} Reduce the prompt or max_tokens."
            )
        else:
            message = f"{where} on tokens per min (TPM): {numbers} {retry}"
        return pb.Denial(
            status=_EXHAUSTED,
            code="rate_limit_exceeded",
            type="tokens",
            message=message,
            retry_after_ms=decision.retry_after_ms,
        )
    if why == CONCURRENCY:
        message = (
            f"{where} on concurrent requests: Limit {key.max_concurrent}, Used {decision.used}, Requested 1. {retry}"
        )
        return pb.Denial(
            status=_EXHAUSTED,
            code="rate_limit_exceeded",
            type="requests",
            message=message,
            retry_after_ms=decision.retry_after_ms,
        )
    assert why == DAILY
    message = (
        f"You exceeded your daily token budget (key {key.name}, project {key.project}): Limit "
        f"{key.daily_tokens}, Used {decision.used}. It renews at 00:00 UTC."
    )
    return pb.Denial(
        status=_EXHAUSTED,
        code="insufficient_quota",
        type="insufficient_quota",
        message=message,
        retry_after_ms=decision.retry_after_ms,
    )


def _rate_state(key: KeyRecord, decision: Decision) -> pb.RateLimitState:
    return pb.RateLimitState(
        limit_requests=key.rpm,
        remaining_requests=decision.remaining_requests,
        reset_requests_ms=decision.reset_requests_ms,
        limit_tokens=key.tpm,
        remaining_tokens=decision.remaining_tokens,
        reset_tokens_ms=decision.reset_tokens_ms,
    )


#: A lease takes at most this share of what a key has left, so a key near its limit gets none.
LEASE_SHARE = 4
#: A key whose limit allows fewer requests (or tokens) than this in two lease periods is decided
#: per request: at that rate the sidecar's round trip costs nothing worth saving, and leased units
#: held by one edge would be a large share of the limit, refused meanwhile on the others.
MIN_LEASE = 8


def lease_cap(limit: int, lease_seconds: float) -> int:
    """The most one lease holds of a per-minute limit: two lease periods at the limit's rate."""
    return int(limit * lease_seconds / 60 * 2)


def lease_size(
    key: KeyRecord, ask: pb.LeaseAsk, cost: int, state: Decision, lease_seconds: float = 1.0
) -> Allowance | None:
    """The lease a key may have now, sized to its recent rate: enough for one lease period at the
    rate the edge saw plus half again, capped at a quarter of what is left of each limit and at two
    lease periods of it (slots: a quarter of the key's concurrency). None when the key is decided per
    request: near a limit, a limit too small to lease (MIN_LEASE; under 32 concurrent requests), or a
    daily budget (checked per request)."""
    if key.daily_tokens:
        return None
    requests = ask.recent_requests + ask.recent_requests // 2 + 1
    if key.rpm:
        cap = lease_cap(key.rpm, lease_seconds)
        if cap < MIN_LEASE:
            return None
        requests = min(requests, state.remaining_requests // LEASE_SHARE, cap)
    tokens = 0
    if key.tpm:
        cap = lease_cap(key.tpm, lease_seconds)
        if cap < MIN_LEASE:
            return None
        if cost:
            requests = min(requests, min(state.remaining_tokens // LEASE_SHARE, cap) // cost)
        tokens = requests * cost
    slots = 0
    if key.max_concurrent:
        cap = key.max_concurrent // LEASE_SHARE
        if cap < MIN_LEASE:  # a slot idle in a lease would be a large share of the limit
            return None
        slots = min(ask.in_flight + ask.in_flight // 2 + 1, cap)
    if requests <= 0:
        return None
    return Allowance(requests, tokens, slots)


#: The slot a batch's ticket names: none (its lines hold no concurrency slot).
BATCH_SLOT = "batch"


class Gate:
    def __init__(self, keys: KeyRing, store: Store, lease_seconds: float = 1.0) -> None:
        self.keys = keys
        self.store = store
        self.lease_ms = int(lease_seconds * 1000)
        self._leases = itertools.count(1)
        #: Whether decisions leave this process (Redis): callers may then overlap accounts.
        self.remote = not isinstance(store, MemoryStore)
        # Slot names are unique across replicas sharing Redis: a random prefix per process.
        self._slot_prefix = secrets.token_hex(4)
        self._slots = itertools.count(1)

    async def admit(self, request: pb.AdmitRequest) -> pb.AdmitReply:
        key = self.keys.find(request.api_key)
        if key is None:
            REQUESTS.labels("", "", request.model, "invalid_key").inc()
            return pb.AdmitReply(id=request.id, denial=pb.Denial(status=_UNAUTHENTICATED, code="invalid_api_key"))
        reply = pb.AdmitReply(
            id=request.id,
            principal_id=key.name,
            project=key.project,
            models=key.models,
            limits_requests=key.rpm > 0,
            limits_tokens=key.tpm > 0,
        )
        if not request.model:  # identity only: report the limits, consume nothing
            reply.allowed = True
            if request.endpoint == BATCH_CREATE_ENDPOINT:
                # A batch's lines are accounted later with this ticket: it names the key and holds no slot.
                reply.ticket = f"{BATCH_SLOT}|0|{key.name}"
            reply.rate_limit.CopyFrom(_rate_state(key, await self._peek(key)))
            return reply
        if not any(fnmatch.fnmatchcase(request.model, glob) for glob in key.models):
            REQUESTS.labels(key.name, key.project, request.model, "model_not_allowed").inc()
            reply.denial.CopyFrom(pb.Denial(status=_NOT_FOUND, code="model_not_found", param="model"))
            return reply
        cost = request.estimated_tokens
        if request.lease_only:
            return await self._renew(key, request, reply)
        try:
            decision = await self.store.admit(key, cost, f"{self._slot_prefix}.{next(self._slots):x}")
        except StoreUnavailable:
            REQUESTS.labels(key.name, key.project, request.model, "store_unavailable").inc()
            reply.denial.CopyFrom(
                pb.Denial(
                    status=_UNAVAILABLE,
                    retry_after_ms=1000,
                    message="Rate limits cannot be checked right now; please retry shortly.",
                )
            )
            return reply
        reply.rate_limit.CopyFrom(_rate_state(key, decision))
        if not decision.allowed:
            REQUESTS.labels(key.name, key.project, request.model, decision.denied_by).inc()
            reply.denial.CopyFrom(limit_denial(key, request.model, cost, decision))
            return reply
        labelled(REQUESTS, key.name, key.project, request.model, "admitted").inc()
        reply.allowed = True
        reply.ticket = f"{decision.slot}|{cost}|{key.name}"
        if request.HasField("lease"):
            await self._grant(key, request, decision, reply)
        return reply

    async def _renew(self, key: KeyRecord, request: pb.AdmitRequest, reply: pb.AdmitReply) -> pb.AdmitReply:
        """A lease alone: granted (allowed) or not, consuming nothing else."""
        state = await self._peek(key)
        reply.rate_limit.CopyFrom(_rate_state(key, state))
        await self._grant(key, request, state, reply)
        reply.allowed = reply.HasField("lease")
        return reply

    async def _grant(self, key: KeyRecord, request: pb.AdmitRequest, state: Decision, reply: pb.AdmitReply) -> None:
        """Adds a lease to the reply when the key's limits leave room for one (else the edge asks each time)."""
        allowance = lease_size(key, request.lease, request.estimated_tokens, state, self.lease_ms / 1000)
        if allowance is None:
            return
        name = f"{self._slot_prefix}.L{next(self._leases):x}"
        try:
            granted = await self.store.lease(key, allowance, name)
        except StoreUnavailable:
            return
        if not granted.allowed:
            return
        reply.rate_limit.CopyFrom(_rate_state(key, granted))
        # The lease's own name is none of its slots: an account naming it frees no slot.
        reply.lease.CopyFrom(
            pb.Lease(
                ticket=f"{granted.slot}|0|{key.name}",
                requests=allowance.requests,
                tokens=allowance.tokens,
                slots=allowance.slots,
                ttl_ms=self.lease_ms,
            )
        )

    async def give_back(self, returned: pb.LeaseReturn) -> None:
        """Takes back a lease's unused requests and tokens, and frees its slots."""
        parsed = self._ticket_key(returned.ticket)
        if parsed is not None:
            name, _, key = parsed
            await self.store.give_back(key, name, Allowance(returned.requests, returned.tokens, returned.slots))

    async def _peek(self, key: KeyRecord) -> Decision:
        try:
            return await self.store.peek(key)
        except StoreUnavailable:
            return Decision(True)

    def _ticket_key(self, ticket: str) -> tuple[str, int, KeyRecord] | None:
        try:
            slot, reserved, name = ticket.split("|", 2)
            reserved_tokens = int(reserved)
        except ValueError:
            log.warning("malformed ticket in an account; ignored")
            return None
        # A key revoked or deleted meanwhile is still accounted (its slot and usage are real).
        return slot, reserved_tokens, self.keys.named(name) or KeyRecord(name=name, hash="")

    async def account(self, request: pb.AccountRequest) -> None:
        await self.account_many([request])

    async def account_many(self, requests: Iterable[pb.AccountRequest]) -> None:
        """Accounts finished requests in one store call (with Redis: one round trip for all of them)."""
        items = [item for item in map(self._accounting, requests) if item is not None]
        if items:
            await self.store.account_many(items)

    def _accounting(self, request: pb.AccountRequest) -> Accounting | None:
        """What the store accounts for one finished request (its metrics counted here), or None for a
        malformed ticket."""
        parsed = self._ticket_key(request.ticket)
        if parsed is None:
            return None
        slot, reserved, key = parsed
        reserved += request.lease_tokens  # a leased request's estimate was drawn from its lease
        usage = request.usage
        used = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        if request.endpoint.startswith(BATCH_LINE_PREFIX):
            reserved = used  # batch lines are metered (usage, daily budget), never charged to TPM
        labels = (key.name, key.project, request.model)
        for kind, count in (
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("cached_prompt", usage.cached_prompt_tokens),
        ):
            if count:
                labelled(TOKENS, *labels, kind).inc(count)
        if request.units:
            UNITS.labels(*labels, request.unit_kind).inc(request.units)
        record = {
            "ts": round(time.time(), 3),
            "key": key.name,
            "project": key.project,
            "model": request.model,
            "endpoint": request.endpoint,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_prompt_tokens": usage.cached_prompt_tokens,
            "total_tokens": used,
            "units": request.units,
            "unit_kind": request.unit_kind,
            "failed": int(request.failed),
            # Why it ended early ("client_disconnect", "drain", "upstream_failure"); "" when it ran to its end.
            "ended": request.ended,
            "request_id": request.meta.request_id,
            "response_id": request.response_id,
        }
        return Accounting(key, slot, reserved, used, record)

    async def release(self, ticket: str) -> None:
        parsed = self._ticket_key(ticket)
        if parsed is not None:
            await self.store.release(parsed[2], parsed[0])
