"""How much parsing a JSON body costs, bounded before it is parsed.

JSON parsers (pydantic-core's, orjson) hold the event loop for as long as a document takes, and that
time grows with its number of values, not its bytes: 16 MiB of ``[[0],[0],…]`` is millions of values
and held the loop for seconds, while 16 MiB in one base64 string parses in milliseconds. So a body's
structure is weighed before it is parsed, outside its strings: a comma (another member of an array or
object) weighs 1, and so does a colon (an object member's key), a bracket or brace (a new array or
object, several times as dear to build) ``CONTAINER_WEIGHT``. The default budget, 300,000, admits
what OpenAI does (300,000 token ids in one embeddings request) and bounds a parse of the edge's own
models to about 100 ms (README: Input limits, with the measurement). A body no larger in bytes than
the budget over the heaviest weight cannot exceed it and is not scanned; a larger one is scanned in
steps that give the loop back every few milliseconds, strings skipped at C speed, and the scan stops
at the budget. Beyond it: a 413.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import grpc

from modelplex_kit.errors import ServiceError
from modelplex_kit.looplag import TimeSlice

#: The longest stretch scanned in one step (a gap between strings, or a part of one long string).
WINDOW = 1 << 20
#: Time the scan may hold the loop before it yields.
SLICE_SECONDS = 0.005
#: A string's content up to its closing quote, an escape cut by the window's end, or the window's end.
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.S)
#: What a new array or object weighs against a comma.
CONTAINER_WEIGHT = 4


def too_complex(limit: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"The request body holds too many JSON values: it weighs more than {limit} (outside strings a comma "
        f"or colon weighs 1, a bracket or brace {CONTAINER_WEIGHT}); send fewer items, or split them over "
        "several requests.",
        code="request_too_large",
    )


def _structure(body: bytes, start: int, end: int) -> int:
    containers = body.count(b"[", start, end) + body.count(b"{", start, end)
    return body.count(b",", start, end) + body.count(b":", start, end) + CONTAINER_WEIGHT * containers


async def weigh(body: bytes, limit: int) -> int:
    """The weight of ``body``'s commas, colons, brackets and braces outside its strings; it stops once past
    ``limit``.
    Malformed JSON is counted as far as it can be (the parser refuses it afterwards)."""
    count, pos, size = 0, 0, len(body)
    pause = TimeSlice(SLICE_SECONDS).pause
    while pos < size and count <= limit:
        quote = body.find(b'"', pos, min(pos + WINDOW, size))
        gap_end = quote if quote >= 0 else min(pos + WINDOW, size)
        count += _structure(body, pos, gap_end)
        pos = gap_end
        if quote >= 0:
            pos = await _skip_string(body, quote + 1, pause)
        await pause()
    return count


async def _skip_string(body: bytes, pos: int, pause: Callable[[], Awaitable[None]]) -> int:
    """The position after the string whose content starts at ``pos`` (the end of the body if it never ends)."""
    size = len(body)
    while pos < size:
        end = _STRING_BODY.match(body, pos, min(pos + WINDOW, size)).end()
        if end < size and body[end] == 0x22:  # the closing quote
            return end + 1
        # The window ended, inside the string or on an escape it cut: go on from there.
        pos = end if end > pos else pos + 1
        await pause()
    return size


async def check(body: bytes, limit: int) -> None:
    """Raises a 413 when ``body`` weighs more than ``limit``. 0: no limit."""
    if limit and len(body) * CONTAINER_WEIGHT > limit and await weigh(body, limit) > limit:
        raise too_complex(limit)
