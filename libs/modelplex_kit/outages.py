"""A dependency's outage logged as state changes, not as one line per failure.

While a dependency (the gatekeeper sidecar, the catalog, a job queue) is down, every request or retry that
needs it fails the same way: a line each is thousands of identical lines a minute that bury everything else
(issue 22: 4,127 WARNING lines in one probe). An ``OutageLog`` writes instead:

- the first failure, once: WARNING ``gatekeeper unreachable: stream failed (UNAVAILABLE)``;
- while the outage lasts, a summary at most every ``summary_seconds``: WARNING ``gatekeeper still
  unreachable after 61 s (stream failed (UNAVAILABLE)): 1200 requests refused, 1200 stream failures in the
  last 61 s``;
- its end, once: INFO ``gatekeeper reachable again after 75 s: 1500 requests refused, 1500 stream failures``.

Summaries are written lazily, by the first failure after the period has passed: no task or timer runs, so an
outage nothing runs into (no request, no retry) writes nothing more until it ends. The clock is injectable
(tests). Reasons come from the caller, built from exception types and status codes, never from request data:
nothing secret (a key) reaches the log through here.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

#: Default time between two summaries of one outage.
SUMMARY_SECONDS = 60.0


class OutageLog:
    """One dependency's outages, for ``logger``: ``failed`` at every failure, ``recovered`` at every success.

    ``what`` names the dependency in every line; ``down``/``up`` describe the two states ("unreachable" and
    "reachable again"; a queue may prefer "unavailable" and "available again"). Each failure is counted
    under its ``counted`` label ("requests refused", "stream failures"): the summary gives the counts since
    the previous line, the recovery line those of the whole outage.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        summary_seconds: float = SUMMARY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        down: str = "unreachable",
        up: str = "reachable again",
    ) -> None:
        self._log = logger
        self.what = what
        self.summary_seconds = summary_seconds
        self._clock = clock
        self._down, self._up = down, up
        #: When the outage began (clock seconds); None while the dependency answers.
        self._since: float | None = None
        self._reported = 0.0
        self._reason = ""
        self._recent: Counter[str] = Counter()
        self._total: Counter[str] = Counter()

    @classmethod
    def of_queue(cls, logger: logging.Logger, what: str, summary_seconds: float) -> OutageLog:
        """A job queue's claims: "unavailable" / "available again" (the batch and background workers)."""
        return cls(logger, what, summary_seconds=summary_seconds, down="unavailable", up="available again")

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, reason: str, counted: str = "failures", *, exc_info: Any = None) -> None:
        """One failure. The first of an outage is logged (with ``exc_info``, if given); later ones are
        counted, and written as a summary once ``summary_seconds`` have passed since the last line."""
        now = self._clock()
        self._total[counted] += 1
        if self._since is None:
            self._since = self._reported = now
            self._reason = reason
            self._log.warning(
                "%s %s: %s", self.what, self._down, reason, exc_info=exc_info, extra={"dependency": self.what}
            )
            return
        self._reason = reason
        self._recent[counted] += 1
        if now - self._reported >= self.summary_seconds:
            self._log.warning(
                "%s still %s after %.0f s (%s): %s in the last %.0f s",
                self.what,
                self._down,
                now - self._since,
                reason,
                _listed(self._recent),
                now - self._reported,
                extra={
                    "dependency": self.what,
                    "down_seconds": round(now - self._since, 1),
                    "counts": dict(self._recent),
                },
            )
            self._reported = now
            self._recent.clear()

    def recovered(self) -> None:
        """The dependency answered: ends the outage (one INFO line), if there was one. Cheap otherwise."""
        if self._since is None:
            return
        elapsed = self._clock() - self._since
        self._log.info(
            "%s %s after %.0f s: %s",
            self.what,
            self._up,
            elapsed,
            _listed(self._total),
            extra={"dependency": self.what, "down_seconds": round(elapsed, 1), "counts": dict(self._total)},
        )
        self._since = None
        self._recent.clear()
        self._total.clear()


def _listed(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {label}" for label, n in counts.items())
