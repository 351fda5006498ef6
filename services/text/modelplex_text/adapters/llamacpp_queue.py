"""Who may wait for a llama.cpp sequence slot: no more than the engine can start within the wait bound.

A request still waiting after ``max_queue_wait_seconds`` gets a 503, so one that cannot start within that bound
gets it at once instead of after the wait. How fast waiting sequences start is observed (:class:`StartRate`, fed by
the scheduler after each admission pass), as the engine pools observe their drain rate for ``Retry-After``
(``modelplex_kit.drain``); the refusal carries the seconds until the queue should have room. ``max_queue`` stays a
hard cap. A request is judged when it is submitted (:meth:`QueueBounds.refusal`) and again, while it waits, each time
sequences start (:meth:`QueueBounds.late`): so a cold engine, which admits up to ``max_queue`` while it knows no rate,
refuses what its first burst cannot start in time as soon as the first starts show the rate. Pure: no llama.cpp
here, the clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from modelplex_kit.drain import DrainRate, retry_after
from modelplex_kit.errors import ServiceError, unavailable

# The start rate's smoothing: the newest second of backlog weighs this much (so the last ~10 s dominate).
_SMOOTHING = 0.1
_PERIOD_S = 1.0

AT_CAPACITY = "The model is at capacity; retry shortly."


class StartRate:
    """Sequences that got their first slot per second of backlog: how fast the slot queue drains.

    Only time during which sequences waited for a slot counts, and only the starts that ended it: a start into a slot
    that was free anyway measures how fast requests arrive, not how fast the queue drains, and an idle engine is not a
    slow one. A preempted sequence given a slot again is not a start (each one is, once), so preemption does not
    inflate the rate.

    ``per_second`` is None until ``known_after`` sequences have started out of a backlog (the scheduler says one per
    slot): a burst fills every slot at the same moment, so they free at about the same moment, and the first to free
    says how long one request ran, not how many run at once (its 1/duration would be ``parallel`` times too low and
    refuse most of what could start in time). By the time each slot's worth has started, the figure counts them all.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, known_after: int = 1) -> None:
        self._clock = clock
        self._rate = DrainRate(smoothing=_SMOOTHING, period=_PERIOD_S)
        self._backlog_since: float | None = None  # the last pass left sequences waiting: since when
        self._known_after = max(1, known_after)
        self._starts = 0  # out of a backlog, ever

    def admitted(self, started: int, *, still_waiting: bool) -> None:
        """After an admission pass: ``started`` sequences got their first slot; ``still_waiting``: others still wait."""
        now = self._clock()
        if self._backlog_since is not None:
            self._rate.add(started, now - self._backlog_since)
            self._starts += started
        self._backlog_since = now if still_waiting else None

    @property
    def per_second(self) -> float | None:
        return self._rate.per_second if self._starts >= self._known_after else None


@dataclass(frozen=True, slots=True)
class QueuePosition:
    """Where a sequence submitted now would wait."""

    waiting: int  # sequences waiting for a slot, in both lines
    ahead: int  # of those, the ones that get a slot before it


@dataclass(frozen=True, slots=True)
class Waiter:
    """A sequence waiting in its line: how many get a slot before it (as :func:`position` counts them), and since
    when it waits (None: it had a slot and was preempted; its client is reading it already, so it is never refused)."""

    ahead: int
    since: float | None


def position(*, interactive_waiting: int, batch_waiting: int, batch_running: int, batch: bool) -> QueuePosition:
    """Interactive work waits only behind interactive work: it goes before every waiting batch sequence, and a
    running one gives its slot up to it at the next step, so each running batch sequence is one fewer ahead. Batch
    work waits behind everything waiting now (interactive work arriving later goes ahead of it too: that is what the
    wait bound's late 503 still catches)."""
    waiting = interactive_waiting + batch_waiting
    ahead = waiting if batch else max(0, interactive_waiting - batch_running)
    return QueuePosition(waiting, ahead)


@dataclass(frozen=True, slots=True)
class QueueBounds:
    max_queue: int  # waiting sequences, a hard cap
    max_wait: float  # seconds a sequence may wait for its slot

    def refusal(self, at: QueuePosition, per_second: float | None) -> ServiceError | None:
        """The 503 to answer at once, or None to queue: refused when the queue is full, or when the sequences ahead
        cannot all start, and this one after them, within ``max_wait`` at the observed start rate."""
        if at.waiting >= self.max_queue:
            return unavailable(AT_CAPACITY, retry_after=retry_after(at.waiting - self.max_queue + 1, per_second))
        # Next in line: it waits for the first slot to free, whatever the rate (this also keeps a backlog, so a
        # rate that fell low is observed again rather than refusing every request for good).
        if at.ahead == 0:
            return None
        # No start out of a backlog seen yet (a cold engine): nothing says how fast the queue drains, so it admits
        # up to max_queue; what cannot start in time is refused by :meth:`late` once the first starts show the rate.
        if per_second is None:
            return None
        if at.ahead + 1 <= per_second * self.max_wait:  # its start comes with the (ahead + 1)-th
            return None
        return self._busy(at.ahead, per_second)

    def late(self, line: list[Waiter], per_second: float | None, now: float) -> list[ServiceError]:
        """After sequences started (the rate known, or changed): the 503s for the back of one line, front first,
        for the last ``len(result)`` waiters of ``line`` (front first). A waiter is late when its (ahead + 1)-th
        start cannot come within what is left of its ``max_wait``; the back of the line is refused up to the first
        waiter that is not late, which stays with everyone ahead of it: none is refused while one behind it waits
        on (one ahead that is late anyway gets the wait bound's 503). The next in line always stays, as at submit."""
        if per_second is None:
            return []
        refused: list[ServiceError] = []
        for waiter in reversed(line):
            if waiter.since is None or waiter.ahead == 0:
                break
            if waiter.ahead + 1 <= per_second * (waiter.since + self.max_wait - now):
                break
            refused.append(self._busy(waiter.ahead, per_second))
        refused.reverse()
        return refused

    def _busy(self, ahead: int, per_second: float) -> ServiceError:
        """Retry-After: until the queue drains enough that ``ahead`` waiting before a new request can all start, and
        it after them, within ``max_wait`` (1 s when that is so already)."""
        return unavailable(AT_CAPACITY, retry_after=retry_after(ahead + 1 - per_second * self.max_wait, per_second))
