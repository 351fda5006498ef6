"""The drain rate shared by the engine pools and the llama.cpp engine, and the Retry-After it implies."""

from __future__ import annotations

import pytest

from modelplex_kit.drain import RETRY_AFTER_MAX_S, RETRY_AFTER_UNKNOWN_S, DrainRate, retry_after


def test_nothing_is_known_until_an_item_drains():
    rate = DrainRate(smoothing=0.2, period=1.0)
    assert rate.per_second is None
    rate.add(0, 5.0)  # time without a drained item says nothing yet ...
    assert rate.per_second is None
    rate.add(2, 1.0)  # ... but counts once one drains: 2 items in 6 s, the older 5 weighing 0.8
    assert rate.per_second == pytest.approx(2 / (5 * 0.8 + 1))
    instant = DrainRate(smoothing=0.2, period=1.0)
    instant.add(3, 0.0)  # items in no time: no rate
    assert instant.per_second is None


def test_a_steady_rate_is_measured_exactly_and_a_stall_pulls_it_down():
    rate = DrainRate(smoothing=0.2, period=1.0)
    for _ in range(50):
        rate.add(3, 2.0)
    assert rate.per_second == pytest.approx(1.5)
    rate.add(0, 1.0)  # a second in which nothing drained: the newest second weighs about 0.2
    assert 1.5 * 0.75 < rate.per_second < 1.5 * 0.85


def test_an_interval_weighs_by_its_length_not_by_its_count():
    steps, one = DrainRate(smoothing=0.2, period=1.0), DrainRate(smoothing=0.2, period=1.0)
    steps.add(4, 2.0)
    for _ in range(10):
        steps.add(1, 0.1)  # ten short steps ...
    one.add(4, 2.0)
    one.add(10, 1.0)  # ... are one second with as many items
    assert steps.per_second == pytest.approx(one.per_second, rel=0.05)


def test_it_matches_the_pools_former_moving_average_in_steady_state():
    rate, average = DrainRate(smoothing=0.2, period=0.25), 0.0
    for finished in [3, 5, 2, 4] * 30:  # one scrape every 0.25 s
        rate.add(finished, 0.25)
        average += 0.2 * (finished / 0.25 - average)
    assert rate.per_second == pytest.approx(average, rel=0.05)


def test_retry_after_is_the_drain_time_bounded_and_a_default_when_unknown():
    assert retry_after(6, 1.5) == 4
    assert retry_after(0.1, 1.5) == 1
    assert retry_after(10_000, 1.5) == RETRY_AFTER_MAX_S
    assert retry_after(6, None) == retry_after(6, 0.0) == RETRY_AFTER_UNKNOWN_S
