"""Opportunistic batching of streamed deltas.

A gRPC stream costs far more per message than per byte (a few hundred µs per
write on a small machine), so deltas that pile up while a write is in flight
go out together, merged per choice. A slow engine still gets one message per
delta and no added wait: nothing is ever held back to fill a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from modelplex.v1 import text_pb2

_END = object()


async def ready_batches(events: AsyncIterator[Any]) -> AsyncIterator[list[Any]]:
    """Yields, each time, every event produced since the last yield (at least one)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except Exception as exc:  # re-raised in the consumer, where the gRPC status is set
            queue.put_nowait(_Failure(exc))
        queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            failure = next((item for item in batch if isinstance(item, _Failure)), None)
            events_ready = [item for item in batch if item is not _END and not isinstance(item, _Failure)]
            if events_ready:
                yield events_ready
            if failure is not None:  # raised after what came before it
                raise failure.error
            if batch[-1] is _END:
                return
    finally:
        task.cancel()  # the consumer left early: the engine's stream is cancelled, which aborts it
        await asyncio.gather(task, return_exceptions=True)


class _Failure:
    def __init__(self, error: Exception) -> None:
        self.error = error


def merge_deltas(deltas: list[text_pb2.ChoiceDelta]) -> list[text_pb2.ChoiceDelta]:
    """Joins consecutive deltas of the same choice into one (text appended, call fragments and logprobs
    joined in order, so the merged delta still carries the logprobs of exactly its tokens)."""
    merged: list[text_pb2.ChoiceDelta] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if last is None or last.index != delta.index or last.finish_reason:
            merged.append(delta)
            continue
        last.text += delta.text
        last.logprobs.extend(delta.logprobs)
        for fragment in delta.tool_calls:
            previous = last.tool_calls[-1] if last.tool_calls else None
            if previous is not None and previous.index == fragment.index and not fragment.id:
                previous.arguments += fragment.arguments
            else:
                last.tool_calls.append(fragment)
        last.finish_reason = delta.finish_reason
    return merged
