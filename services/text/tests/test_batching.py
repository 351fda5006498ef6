import asyncio

import grpc
import pytest

from modelplex.v1 import text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_text.batching import merge_deltas, ready_batches


async def test_a_slow_producer_gets_one_event_per_batch():
    async def slow():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield i

    assert [b async for b in ready_batches(slow())] == [[0], [1], [2]]


async def test_events_that_pile_up_go_together():
    async def burst():
        for i in range(5):
            yield i

    batches = []
    async for batch in ready_batches(burst()):
        batches.append(batch)
        await asyncio.sleep(0.01)  # a slow write lets the rest pile up
    assert [event for batch in batches for event in batch] == [0, 1, 2, 3, 4] and len(batches) < 5


async def test_events_before_a_failure_are_delivered_then_it_is_raised():
    async def failing():
        yield 1
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "gone")

    got = []
    with pytest.raises(ServiceError):
        async for batch in ready_batches(failing()):
            got += batch
    assert got == [1]


async def test_leaving_early_cancels_the_producer():
    cancelled = asyncio.Event()

    async def endless():
        try:
            while True:
                yield 1
                await asyncio.sleep(0.001)
        finally:
            cancelled.set()

    async for _ in ready_batches(endless()):
        break
    await asyncio.wait_for(cancelled.wait(), 1)


def test_merge_joins_text_and_call_fragments_of_one_choice():
    merged = merge_deltas(
        [
            text_pb2.ChoiceDelta(index=0, text="Hel"),
            text_pb2.ChoiceDelta(index=0, text="lo"),
            text_pb2.ChoiceDelta(index=1, text="Hi"),
            text_pb2.ChoiceDelta(index=1, tool_calls=[text_pb2.ToolCallDelta(index=0, id="c", name="f", arguments="")]),
            text_pb2.ChoiceDelta(index=1, tool_calls=[text_pb2.ToolCallDelta(index=0, arguments='{"a"')]),
            text_pb2.ChoiceDelta(
                index=1,
                tool_calls=[text_pb2.ToolCallDelta(index=0, arguments=": 1}")],
                finish_reason=text_pb2.FINISH_REASON_TOOL_CALLS,
            ),
            text_pb2.ChoiceDelta(index=1, text="after the finish stays apart"),
        ]
    )
    assert [(d.index, d.text) for d in merged] == [(0, "Hello"), (1, "Hi"), (1, "after the finish stays apart")]
    call = merged[1].tool_calls
    assert len(call) == 1 and (call[0].id, call[0].name, call[0].arguments) == ("c", "f", '{"a": 1}')
    assert merged[1].finish_reason == text_pb2.FINISH_REASON_TOOL_CALLS


def test_merged_deltas_keep_every_logprob_in_order():
    first = text_pb2.ChoiceDelta(index=0, text="Hel", logprobs=[text_pb2.TokenLogprob(token="Hel", logprob=-0.1)])
    second = text_pb2.ChoiceDelta(index=0, text="lo", logprobs=[text_pb2.TokenLogprob(token="lo", logprob=-0.2)])
    other = text_pb2.ChoiceDelta(index=1, text="x", logprobs=[text_pb2.TokenLogprob(token="x", logprob=-0.3)])
    merged = merge_deltas([first, second, other])
    assert [(d.index, d.text, [lp.token for lp in d.logprobs]) for d in merged] == [
        (0, "Hello", ["Hel", "lo"]),
        (1, "x", ["x"]),
    ]
