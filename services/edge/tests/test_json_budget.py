"""The JSON budget: a body's structure weighed before it is parsed, strings skipped, the loop given back."""

from __future__ import annotations

import asyncio
import json

import pytest

from modelplex_edge import json_budget
from modelplex_kit.errors import ServiceError


def _reference_weight(body: bytes) -> int:
    """The same weight from a full parse: a value is a comma or a container's first member."""
    weight = 0

    def walk(value: object) -> None:
        nonlocal weight
        if isinstance(value, dict):
            weight += json_budget.CONTAINER_WEIGHT + max(len(value) - 1, 0) + len(value)
            for member in value.values():
                walk(member)
        elif isinstance(value, list):
            weight += json_budget.CONTAINER_WEIGHT + max(len(value) - 1, 0)
            for member in value:
                walk(member)

    walk(json.loads(body))
    return weight


BODIES = [
    {"model": "m", "messages": [{"role": "user", "content": "a, b: [c] {d}"}]},
    {"input": [[1, 2, 3], [4, 5]], "s": 'quote \\" inside, [not] {counted}: ok'},
    {"k": "\\\\", "l": ["\\\\\\\"", ",,,", "]]"], "m": {"n": {"o": []}}},
    {"unicode": "é, ü: [ß] \u2028", "esc": "\\u0022, \\n"},
]


@pytest.mark.parametrize("value", BODIES)
@pytest.mark.parametrize("window", [2, 3, 7, 1 << 20])
async def test_the_weight_counts_structure_outside_strings_only(value, window, monkeypatch):
    monkeypatch.setattr(json_budget, "WINDOW", window)  # strings and escapes cut at every place
    body = json.dumps(value).encode()
    assert await json_budget.weigh(body, 10**9) == _reference_weight(body)


async def test_a_body_beyond_the_budget_is_a_413_and_one_within_it_passes():
    body = json.dumps({"model": "m", "input": [0] * 5000}).encode()
    weight = await json_budget.weigh(body, 10**9)
    await json_budget.check(body, weight)  # exactly at the budget
    with pytest.raises(ServiceError) as refused:
        await json_budget.check(body, weight - 1)
    assert refused.value.http.status == 413 and refused.value.http.code == "request_too_large"


async def test_a_long_string_weighs_nothing_however_many_commas_it_holds():
    prose = ("a long text, with commas, colons: and [brackets] " * 200_000)[:8_000_000]
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prose}]}).encode()
    await json_budget.check(body, 1000)


async def test_a_small_body_is_not_scanned(monkeypatch):
    async def never(body: bytes, limit: int) -> int:
        raise AssertionError("scanned")

    monkeypatch.setattr(json_budget, "weigh", never)
    await json_budget.check(b"[" * 100, 400)  # 100 bytes can weigh at most 400


async def test_the_scan_stops_at_the_budget_and_gives_the_loop_back(monkeypatch):
    monkeypatch.setattr(json_budget, "SLICE_SECONDS", 0.0)  # yield after every step
    monkeypatch.setattr(json_budget, "WINDOW", 4096)
    body = b"[" + b'"x",' * 2_000_000 + b'"x"]'
    ticks = 0

    async def other_request() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_request())
    await asyncio.sleep(0)
    weight = await json_budget.weigh(body, 1000)
    other.cancel()
    assert 1000 < weight < 1000 + 4096  # it stopped once past the budget, not at the end of 8 MB
    assert ticks > 1  # and the loop ran another task while it scanned
