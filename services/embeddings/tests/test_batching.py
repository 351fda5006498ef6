"""The micro-batcher: merging, order, bounds, failure isolation and cancellation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from modelplex_embeddings.batching import MicroBatcher
from modelplex_embeddings.engine import Item
from modelplex_embeddings.settings import BatchingSettings
from modelplex_kit.errors import ServiceError, invalid
from tests.support.until import until


class RecordingEngine:
    """Vectors that name their input (row = [id]); records every call; refuses id < 0."""

    def __init__(self, delay: float = 0.01) -> None:
        self.calls: list[list[int]] = []
        self.delay = delay
        self.gate: asyncio.Event | None = None

    async def embed(self, items):
        ids = [item.ids[0] for item in items]
        self.calls.append(ids)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay)
        if any(i < 0 for i in ids):
            raise invalid("negative id", "input[0]")
        if any(i == 999 for i in ids):
            raise RuntimeError("engine crashed")
        return np.array([[float(i)] for i in ids], dtype=np.float32)


def items(*ids: int) -> list[Item]:
    return [Item(ids=[i]) for i in ids]


def batcher(engine, **settings) -> MicroBatcher:
    return MicroBatcher(engine.embed, BatchingSettings(**settings))


async def test_concurrent_requests_share_one_engine_call_and_get_their_own_rows_in_order():
    engine = RecordingEngine()
    mb = batcher(engine, max_wait_ms=20)
    requests = [items(*(10 * r + k for k in range(3))) for r in range(5)]
    results = await asyncio.gather(*(mb.submit(req) for req in requests))
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 15
    for r, rows in enumerate(results):
        assert rows[:, 0].tolist() == [10 * r, 10 * r + 1, 10 * r + 2]


async def test_batches_never_exceed_max_inputs_and_keep_whole_requests():
    engine = RecordingEngine()
    mb = batcher(engine, max_inputs=4, max_wait_ms=20)
    results = await asyncio.gather(*(mb.submit(items(r * 10, r * 10 + 1, r * 10 + 2)) for r in range(4)))
    assert all(len(call) <= 4 for call in engine.calls)
    assert len(engine.calls) == 4  # three-input requests: only one fits per call
    assert [rows[:, 0].tolist() for rows in results] == [[r * 10, r * 10 + 1, r * 10 + 2] for r in range(4)]


async def test_a_request_larger_than_max_inputs_runs_alone_unsplit():
    engine = RecordingEngine()
    mb = batcher(engine, max_inputs=2, max_wait_ms=5)
    rows = await mb.submit(items(1, 2, 3, 4, 5))
    assert engine.calls == [[1, 2, 3, 4, 5]] and rows[:, 0].tolist() == [1, 2, 3, 4, 5]


async def test_disabled_batching_makes_one_call_per_request():
    engine = RecordingEngine()
    mb = batcher(engine, enabled=False)
    await asyncio.gather(*(mb.submit(items(i, i + 100)) for i in range(3)))
    assert sorted(engine.calls) == [[0, 100], [1, 101], [2, 102]]


async def test_one_bad_request_fails_alone_and_its_batch_mates_succeed():
    engine = RecordingEngine()
    mb = batcher(engine, max_wait_ms=20)
    good1, bad, good2 = await asyncio.gather(
        mb.submit(items(1, 2)), mb.submit(items(3, -1)), mb.submit(items(4)), return_exceptions=True
    )
    assert isinstance(bad, ServiceError) and bad.param == "input[0]"
    assert good1[:, 0].tolist() == [1, 2] and good2[:, 0].tolist() == [4]
    assert engine.calls[0] == [1, 2, 3, -1, 4]  # merged first, then isolated


async def test_an_engine_crash_fails_every_request_of_the_batch_without_retries():
    engine = RecordingEngine()
    mb = batcher(engine, max_wait_ms=20)
    results = await asyncio.gather(mb.submit(items(1)), mb.submit(items(999)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len(engine.calls) == 1
    assert (await mb.submit(items(7)))[:, 0].tolist() == [7]  # the batcher keeps serving


async def test_a_request_cancelled_while_queued_never_reaches_the_engine():
    engine = RecordingEngine()
    engine.gate = asyncio.Event()
    mb = batcher(engine, max_wait_ms=0)
    first = asyncio.create_task(mb.submit(items(1)))
    await until(lambda: engine.calls == [[1]], timeout=30)  # the first batch is running (held at the gate)
    doomed = asyncio.create_task(mb.submit(items(2)))
    kept = asyncio.create_task(mb.submit(items(3)))
    await until(lambda: mb.waiting == 2, timeout=30)
    doomed.cancel()
    engine.gate.set()
    assert (await first)[:, 0].tolist() == [1]
    assert (await kept)[:, 0].tolist() == [3]
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert [2] not in engine.calls and all(2 not in call for call in engine.calls)


async def test_a_full_queue_is_refused_with_503():
    engine = RecordingEngine()
    engine.gate = asyncio.Event()
    mb = batcher(engine, max_queued_inputs=3, max_wait_ms=0)
    running = asyncio.create_task(mb.submit(items(1)))
    await until(lambda: engine.calls == [[1]], timeout=30)
    queued = asyncio.create_task(mb.submit(items(2, 3)))
    await until(lambda: mb.waiting == 1, timeout=30)
    with pytest.raises(ServiceError) as refused:
        await mb.submit(items(4, 5))
    assert refused.value.http.status == 503
    engine.gate.set()
    await asyncio.gather(running, queued)
