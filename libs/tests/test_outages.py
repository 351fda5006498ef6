"""An outage is logged as state changes: once when it begins, a summary per period, once when it ends."""

from __future__ import annotations

import logging

from modelplex_kit.outages import OutageLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[tuple[int, str]]:
    return [(record.levelno, record.getMessage()) for record in caplog.records if record.name == "test.outages"]


def test_an_outage_is_one_warning_a_summary_per_period_and_one_info_line_when_it_ends(caplog):
    caplog.set_level(logging.DEBUG, logger="test.outages")
    clock = Clock()
    outage = OutageLog(logging.getLogger("test.outages"), "gatekeeper", summary_seconds=60, clock=clock)
    assert not outage.down
    outage.recovered()  # nothing to end: nothing logged
    assert _lines(caplog) == []

    outage.failed("stream failed (UNAVAILABLE)", "stream failures")
    assert outage.down
    for i in range(1000):  # within the period: counted, not logged
        clock.now += 0.05
        outage.failed("no decision", "requests refused" if i % 2 else "stream failures")
    assert _lines(caplog) == [(logging.WARNING, "gatekeeper unreachable: stream failed (UNAVAILABLE)")]

    clock.now = 1000.0 + 61  # the first failure after the period writes the summary
    outage.failed("stream failed (UNAVAILABLE)", "stream failures")
    summary = _lines(caplog)[1]
    assert summary[0] == logging.WARNING
    assert summary[1] == (
        "gatekeeper still unreachable after 61 s (stream failed (UNAVAILABLE)): "
        "501 stream failures, 500 requests refused in the last 61 s"
    )
    record = caplog.records[-1]
    assert record.counts == {"stream failures": 501, "requests refused": 500} and record.down_seconds == 61

    clock.now += 30  # half a period: no second summary
    outage.failed("no decision", "requests refused")
    assert len(_lines(caplog)) == 2

    clock.now += 5
    outage.recovered()
    outage.recovered()  # once
    assert _lines(caplog)[2:] == [
        (logging.INFO, "gatekeeper reachable again after 96 s: 502 stream failures, 501 requests refused")
    ]
    assert not outage.down

    clock.now += 1  # the next outage starts afresh
    outage.failed("no answer within 2 s", "admissions timed out")
    outage.recovered()
    assert _lines(caplog)[3:] == [
        (logging.WARNING, "gatekeeper unreachable: no answer within 2 s"),
        (logging.INFO, "gatekeeper reachable again after 0 s: 1 admissions timed out"),
    ]


def test_the_first_line_carries_the_traceback_and_the_words_are_the_callers(caplog):
    caplog.set_level(logging.INFO, logger="test.outages")
    clock = Clock()
    outage = OutageLog(
        logging.getLogger("test.outages"), "batch queue", clock=clock, down="unavailable", up="available again"
    )
    for _ in range(3):
        try:
            raise ConnectionError("redis at 10.0.0.7:6379")
        except ConnectionError:
            outage.failed("claim failed (ConnectionError)", "claims failed", exc_info=True)
    clock.now += 2
    outage.recovered()
    assert _lines(caplog) == [
        (logging.WARNING, "batch queue unavailable: claim failed (ConnectionError)"),
        (logging.INFO, "batch queue available again after 2 s: 3 claims failed"),
    ]
    assert caplog.records[0].exc_info is not None and caplog.records[1].exc_info is None
