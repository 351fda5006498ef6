"""A batch's input lines: streamed apart, bounded, checked; and batch calls' priority metadata."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from modelplex_edge.backends import Backends
from modelplex_edge.endpoints.batches.lines import RawLine, parse_line, read_lines
from modelplex_kit.errors import ServiceError


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _lines(*parts: bytes, max_bytes: int = 100) -> list[RawLine]:
    return [line async for line in read_lines(_chunks(*parts), max_bytes)]


async def test_lines_split_across_chunks_blank_lines_skipped_last_line_without_newline():
    lines = await _lines(b'{"a"', b": 1}\n\n  \n{", b'"b": 2}\n{"c": 3}')
    assert [(line.number, line.index, line.data) for line in lines] == [
        (1, 0, b'{"a": 1}'),
        (4, 1, b'{"b": 2}'),
        (5, 2, b'{"c": 3}'),
    ]


async def test_a_line_past_the_bound_is_reported_not_held():
    lines = await _lines(b"x" * 60, b"y" * 60, b"\n", b'{"ok": 1}\n', b"z" * 150, max_bytes=100)
    assert [(line.number, line.index, line.too_long, line.data) for line in lines] == [
        (1, 0, True, b""),
        (2, 1, False, b'{"ok": 1}'),
        (3, 2, True, b""),
    ]


def _raw(row: object) -> RawLine:
    return RawLine(1, 0, json.dumps(row).encode())


def _line(**changes) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body, **changes}


@pytest.mark.parametrize(
    ("row", "param"),
    [
        (_line(method="GET"), "method"),
        (_line(url="/v1/completions"), "url"),
        (_line(custom_id=""), "custom_id"),
        (_line(body={"model": "m"}), "body.messages"),
        (_line(body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}), "body.stream"),
        (
            _line(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}),
            "body.temperature",
        ),
    ],
)
def test_each_wrong_line_names_its_parameter(row, param):
    with pytest.raises(ServiceError) as refused:
        parse_line(_raw(row), "/v1/chat/completions", 1000)
    assert refused.value.param == param


def test_a_good_line_parses_into_the_endpoints_body():
    checked = parse_line(_raw(_line()), "/v1/chat/completions", 1000)
    assert checked.line.custom_id == "a" and checked.body.model == "m"


def test_batch_calls_carry_their_priority_as_metadata():
    backends = Backends(5.0)
    assert ("x-modelplex-priority", "batch") in backends.call_options("r", "batch")["metadata"]
    assert all(key != "x-modelplex-priority" for key, _ in backends.call_options("r")["metadata"])
