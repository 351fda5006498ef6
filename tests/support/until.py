"""Waiting on a condition instead of a guessed delay: the machine running the tests may be loaded."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    predicate: Callable[[], T | Awaitable[T]], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Polls ``predicate`` (plain or async) until it returns something true (returned), or fails after
    ``timeout`` seconds naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(interval)


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    """``until`` for synchronous tests."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return value
