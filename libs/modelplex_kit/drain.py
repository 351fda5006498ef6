"""How fast a queue drains (items per second, exponentially smoothed) and the ``Retry-After`` that implies.

Shared by the engine pools (requests their replicas finished, sampled each scrape) and the llama.cpp engine
(sequences that got a slot while others waited for one): both refuse what a queue cannot take with a 503 at once,
saying when to retry.
"""

from __future__ import annotations

import math

# Retry-After when no drain has been observed yet, and the most it ever says.
RETRY_AFTER_UNKNOWN_S = 5
RETRY_AFTER_MAX_S = 60


class DrainRate:
    """Items per second over the time it is told about, the newest ``period`` seconds weighing about ``smoothing``
    of the figure (a decaying count of items over a decaying count of seconds: an interval weighs by its length, and
    one in which nothing drained pulls the rate down). Pure: whoever calls :meth:`add` keeps the clock.

    ``per_second`` is None until an item has been seen: nothing is known about the rate yet. It is one float,
    replaced whole on each :meth:`add`, so another thread may read it while one thread adds.
    """

    def __init__(self, *, smoothing: float, period: float) -> None:
        if not 0.0 < smoothing < 1.0 or period <= 0.0:
            raise ValueError("smoothing must be in (0, 1) and period positive")
        self._keep = 1.0 - smoothing
        self._period = period
        self._items = 0.0
        self._seconds = 0.0
        self._seen = False
        self.per_second: float | None = None

    def add(self, items: float, seconds: float) -> None:
        """``items`` drained over the last ``seconds``."""
        seconds = max(seconds, 0.0)
        keep = self._keep ** (seconds / self._period)
        self._items = self._items * keep + items
        self._seconds = self._seconds * keep + seconds
        self._seen = self._seen or items > 0
        if self._seen and self._seconds > 0.0:
            self.per_second = self._items / self._seconds


def retry_after(items: float, per_second: float | None) -> int:
    """Whole seconds (1 to RETRY_AFTER_MAX_S) for ``items`` to drain at ``per_second``; RETRY_AFTER_UNKNOWN_S
    when no rate is known."""
    if not per_second or per_second <= 0.0:
        return RETRY_AFTER_UNKNOWN_S
    return max(1, min(RETRY_AFTER_MAX_S, math.ceil(items / per_second)))
