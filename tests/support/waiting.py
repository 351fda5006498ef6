"""Waiting on a condition instead of sleeping a fixed time: the one helper every test uses.

A fixed sleep is either too short on a loaded machine (a flaky failure) or too long everywhere
(a slow suite). ``until`` polls the condition and returns as soon as it holds; its timeout is a
generous ceiling that only a real failure reaches, and the failure names what was awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# Ceiling for conditions that hold within milliseconds on an idle machine: on a loaded 2-core
# machine shared with other suites they can take seconds.
DEFAULT_TIMEOUT = 30.0


class NotReached(AssertionError):
    """The awaited condition did not hold within the timeout."""


def until(
    predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02, what: str = ""
) -> T:
    """Polls ``predicate`` until it returns a truthy value, and returns that value.

    Exceptions from the predicate propagate (a condition that cannot be evaluated is a bug, not a wait).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise NotReached(f"not reached within {timeout:g} s: {what or _describe(predicate)}")
        time.sleep(interval)


async def async_until(
    predicate: Callable[[], T | Awaitable[T]], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02, what: str = ""
) -> T:
    """``until`` for the event loop: the predicate may be a plain or an async function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise NotReached(f"not reached within {timeout:g} s: {what or _describe(predicate)}")
        await asyncio.sleep(interval)


def _describe(predicate: Callable[..., object]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)
