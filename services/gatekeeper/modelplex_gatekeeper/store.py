"""Where limit state lives: one small interface, in memory or in Redis.

Requests and tokens per minute are GCRA (the generic cell rate algorithm: a
token bucket kept as one "theoretical arrival time" per key). A limit of N per
minute lets N through at once after a quiet minute and then one every 60/N s:
never double at a window boundary. Tokens are reserved at admission (the
request's estimate) and reconciled at account (the real usage), so the debt of
a request that used more is charged and the unused rest is given back.
Concurrency slots carry an expiry, so a slot whose edge died frees itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import orjson

from modelplex_gatekeeper.keys import KeyRecord

WINDOW_MS = 60_000.0
DAY_SECONDS = 86_400

# Why a request was refused (also the order in which limits are checked).
DAILY, CONCURRENCY, REQUESTS, TOKENS = "daily", "concurrency", "requests", "tokens"
DENIED_BY = ("", DAILY, CONCURRENCY, REQUESTS, TOKENS)


@dataclass(slots=True)
class Decision:
    allowed: bool
    denied_by: str = ""
    retry_after_ms: int = 0
    #: Of the limit that refused: how much of it is in use.
    used: int = 0
    remaining_requests: int = 0
    reset_requests_ms: int = 0
    remaining_tokens: int = 0
    reset_tokens_ms: int = 0
    #: The concurrency slot held (as ``account`` must name it).
    slot: str = ""


@dataclass(frozen=True, slots=True)
class Accounting:
    """One finished request, as the store accounts it (see ``Store.account``)."""

    key: KeyRecord
    slot: str
    reserved: int
    used: int
    #: The usage record stored for it (the usage stream, or the usage file).
    record: dict


class StoreUnavailable(Exception):
    """Limits cannot be checked (Redis is down and the policy is to fail closed)."""


class Store(Protocol):
    """Limit state of every key. Each call is one atomic decision (one round trip for a remote store)."""

    async def admit(self, key: KeyRecord, cost: int, slot: str) -> Decision:
        """Checks daily budget, concurrency, RPM, TPM in that order; takes all or nothing.

        ``slot`` names the concurrency slot to hold (when the key limits concurrency)."""
        ...

    async def peek(self, key: KeyRecord) -> Decision:
        """The key's state for response headers, consuming nothing."""
        ...

    async def account(self, key: KeyRecord, slot: str, reserved: int, used: int, record: dict) -> None:
        """Releases the slot, charges ``used - reserved`` tokens, adds to the day, stores the usage record."""
        ...

    async def account_many(self, items: list[Accounting]) -> None:
        """``account`` for each, in order, in one call (one round trip for a remote store)."""
        ...

    async def release(self, key: KeyRecord, slot: str) -> None:
        """Frees a slot whose request will never report (its stream ended)."""
        ...

    async def lease(self, key: KeyRecord, allowance: Allowance, name: str) -> Decision:
        """Reserves a lease's requests, tokens and slots (``name#0``..) at once, or nothing (not allowed)."""
        ...

    async def give_back(self, key: KeyRecord, name: str, allowance: Allowance) -> None:
        """Returns a lease's unused requests and tokens and frees its slots (the first ``allowance.slots``)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Allowance:
    """What a quota lease holds of a key's limits."""

    requests: int = 0
    tokens: int = 0
    slots: int = 0


def lease_slots(name: str, count: int) -> list[str]:
    """The concurrency slots a lease holds, by name (its own name is none of them)."""
    return [f"{name}#{i}" for i in range(count)]


def _interval(limit: int) -> float:
    return WINDOW_MS / limit


def gcra(tat: float, now: float, limit: int, cost: int) -> tuple[bool, float, float]:
    """(allowed, new tat, retry-after ms) for ``cost`` units against ``limit`` per minute."""
    start = max(tat, now)
    new = start + cost * _interval(limit)
    over = new - now - WINDOW_MS
    return over <= 0, new, max(0.0, over)


def remaining(tat: float, now: float, limit: int) -> int:
    return max(0, math.floor((WINDOW_MS - max(0.0, tat - now)) / _interval(limit) + 1e-9))


def in_use(tat: float, now: float, limit: int) -> int:
    return limit - remaining(tat, now, limit)


class UsageLog:
    """Append-only JSONL of usage records; each line is handed to the OS as it is written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "ab")  # noqa: SIM115 - open for the process's life

    def write(self, record: dict) -> None:
        self._handle.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class _KeyState:
    __slots__ = ("day", "day_used", "slots", "tat_requests", "tat_tokens")

    def __init__(self) -> None:
        self.tat_requests = 0.0
        self.tat_tokens = 0.0
        self.slots: dict[str, float] = {}
        self.day = 0
        self.day_used = 0


class MemoryStore:
    """Limits of one process: exact, and atomic because nothing in a decision awaits."""

    def __init__(self, slot_ttl_seconds: float, usage: UsageLog | None = None, clock=time.time) -> None:
        self._keys: dict[str, _KeyState] = {}
        self._slot_ttl_ms = slot_ttl_seconds * 1000
        self._usage = usage
        self._clock = clock

    def _state(self, key: KeyRecord) -> _KeyState:
        state = self._keys.get(key.name)
        if state is None:
            state = self._keys[key.name] = _KeyState()
        return state

    async def admit(self, key: KeyRecord, cost: int, slot: str) -> Decision:
        return self.admit_now(key, cost, slot)

    def admit_now(self, key: KeyRecord, cost: int, slot: str) -> Decision:
        return self._take(key, Allowance(1, cost, 1), [slot] if key.max_concurrent else [], slot)

    def lease_now(self, key: KeyRecord, allowance: Allowance, name: str) -> Decision:
        members = lease_slots(name, allowance.slots) if key.max_concurrent else []
        return self._take(key, allowance, members, name)

    def _take(self, key: KeyRecord, want: Allowance, members: list[str], slot: str) -> Decision:
        now = self._clock() * 1000
        state = self._state(key)
        day = int(now // 1000 // DAY_SECONDS)
        if state.day != day:
            state.day, state.day_used = day, 0
        if key.daily_tokens and state.day_used >= key.daily_tokens:
            return self._denied(key, state, now, DAILY, state.day_used, int((day + 1) * DAY_SECONDS * 1000 - now))
        if members:
            if len(state.slots) + len(members) > key.max_concurrent:  # expired slots only looked for when full
                state.slots = {s: exp for s, exp in state.slots.items() if exp > now}
            if len(state.slots) + len(members) > key.max_concurrent:
                return self._denied(key, state, now, CONCURRENCY, len(state.slots), 1000)
        tat_requests, tat_tokens = state.tat_requests, state.tat_tokens
        if key.rpm and want.requests:
            ok, tat_requests, wait = gcra(state.tat_requests, now, key.rpm, want.requests)
            if not ok:
                return self._denied(key, state, now, REQUESTS, in_use(state.tat_requests, now, key.rpm), wait)
        if key.tpm and want.tokens:
            ok, tat_tokens, wait = gcra(state.tat_tokens, now, key.tpm, want.tokens)
            if not ok:
                return self._denied(key, state, now, TOKENS, in_use(state.tat_tokens, now, key.tpm), wait)
        state.tat_requests, state.tat_tokens = tat_requests, tat_tokens
        for member in members:
            state.slots[member] = now + self._slot_ttl_ms
        return self._state_of(key, state, now, Decision(True, slot=slot))

    def _denied(self, key: KeyRecord, state: _KeyState, now: float, why: str, used: int, wait: float) -> Decision:
        decision = Decision(False, why, max(1, math.ceil(wait)), used)
        return self._state_of(key, state, now, decision)

    @staticmethod
    def _state_of(key: KeyRecord, state: _KeyState, now: float, decision: Decision) -> Decision:
        if key.rpm:
            decision.remaining_requests = remaining(state.tat_requests, now, key.rpm)
            decision.reset_requests_ms = math.ceil(max(0.0, state.tat_requests - now))
        if key.tpm:
            decision.remaining_tokens = remaining(state.tat_tokens, now, key.tpm)
            decision.reset_tokens_ms = math.ceil(max(0.0, state.tat_tokens - now))
        return decision

    async def peek(self, key: KeyRecord) -> Decision:
        return self._state_of(key, self._state(key), self._clock() * 1000, Decision(True))

    async def account(self, key: KeyRecord, slot: str, reserved: int, used: int, record: dict) -> None:
        state = self._state(key)
        state.slots.pop(slot, None)
        if key.tpm and used != reserved:
            state.tat_tokens += (used - reserved) * _interval(key.tpm)
        now = self._clock()
        if int(now // DAY_SECONDS) == state.day:
            state.day_used += used
        if self._usage is not None:
            self._usage.write(record)

    async def account_many(self, items: list[Accounting]) -> None:
        for item in items:
            await self.account(item.key, item.slot, item.reserved, item.used, item.record)

    async def release(self, key: KeyRecord, slot: str) -> None:
        self._state(key).slots.pop(slot, None)

    async def lease(self, key: KeyRecord, allowance: Allowance, name: str) -> Decision:
        return self.lease_now(key, allowance, name)

    async def give_back(self, key: KeyRecord, name: str, allowance: Allowance) -> None:
        state = self._state(key)
        if key.rpm:
            state.tat_requests -= allowance.requests * _interval(key.rpm)
        if key.tpm:
            state.tat_tokens -= allowance.tokens * _interval(key.tpm)
        for member in lease_slots(name, allowance.slots):
            state.slots.pop(member, None)

    async def close(self) -> None:
        if self._usage is not None:
            self._usage.close()
