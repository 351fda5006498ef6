import asyncio

import grpc

from modelplex_edge.sse import KEEPALIVE, _frames, _kept_alive
from modelplex_kit.errors import ServiceError


async def collect(chunks) -> list[bytes]:
    return [frame async for frame in _frames(chunks)]


async def test_chunks_are_framed_and_closed_with_done():
    async def chunks():
        yield {"a": 1}
        yield {"b": 2}

    assert await collect(chunks()) == [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]


async def test_a_failure_mid_stream_is_an_error_event_then_done():
    async def chunks():
        yield {"a": 1}
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "backend went away")

    frames = await collect(chunks())
    assert frames[1].startswith(b'data: {"error":{"message":"backend went away","type":"server_error"')
    assert frames[-1] == b"data: [DONE]\n\n"


async def test_unexpected_exceptions_do_not_leak_details():
    async def chunks():
        raise RuntimeError("secret")
        yield {}

    frames = await collect(chunks())
    assert b"secret" not in frames[0] and b"error" in frames[0] and frames[-1] == b"data: [DONE]\n\n"


async def test_a_held_stream_gets_comments_until_its_first_chunk_and_none_after():
    first = asyncio.Event()

    async def chunks():
        await first.wait()
        yield {"a": 1}
        await asyncio.sleep(0.05)  # slower than the keepalive interval, but past the first chunk
        yield {"b": 2}

    frames: list[bytes] = []
    async for frame in _frames(_kept_alive(chunks(), 0.01)):
        frames.append(frame)
        if frames.count(KEEPALIVE) == 3:
            first.set()
    assert frames[:3] == [KEEPALIVE] * 3
    assert frames[3:] == [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
