"""Micro-batching: concurrent Embed calls merged into one engine call.

Requests queue in arrival order. A batch starts with the oldest request, waits
up to ``max_wait_ms`` for company while the engine is idle, and takes whole
requests in order while their inputs fit ``max_inputs`` (a request larger than
that runs alone). Each caller gets its own rows back, in its own order.

Failure isolation: if a merged call fails with a 400 (one request's input the
engine refused), each request of the batch is retried alone, so only the bad one
fails. Other failures (engine down) fail the whole batch. A cancelled caller is
dropped before its batch starts, and ignored if it is already running.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from modelplex_embeddings.engine import Item
from modelplex_embeddings.settings import BatchingSettings
from modelplex_kit.errors import ServiceError, unavailable

EngineCall = Callable[[Sequence[Item]], Awaitable[np.ndarray]]


@dataclass(slots=True)
class _Pending:
    items: Sequence[Item]
    future: asyncio.Future[np.ndarray]
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(
        self,
        engine_call: EngineCall,
        settings: BatchingSettings,
        on_start: Callable[[float], None] = lambda waited: None,
    ) -> None:
        self._call = engine_call
        self._settings = settings
        self._on_start = on_start  # told each request's queue wait, for the queue-time metric
        self._queue: deque[_Pending] = deque()
        self._queued_inputs = 0
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def submit(self, items: Sequence[Item]) -> np.ndarray:
        """Rows for ``items``, in their order, once the batch holding them has run."""
        if self._queued_inputs + len(items) > self._settings.max_queued_inputs and self._queue:
            raise unavailable("The embeddings backend is at capacity; retry shortly.")
        pending = _Pending(items, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_inputs += len(items)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await pending.future  # cancelling the caller cancels the future: _take skips it

    async def close(self) -> None:
        for task in (self._worker, *self._running):
            if task is not None:
                task.cancel()
        for pending in self._queue:
            pending.future.cancel()

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            await self._gather()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _gather(self) -> None:
        """While the batch is not full, waits up to max_wait for more requests."""
        deadline = time.perf_counter() + self._settings.max_wait_ms / 1000
        while self._settings.enabled and self._live_inputs() < self._settings.max_inputs:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _live_inputs(self) -> int:
        return sum(len(p.items) for p in self._queue if not p.future.done())

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # cancelled while queued
                self._dequeue()
                continue
            if batch and (not self._settings.enabled or size + len(pending.items) > self._settings.max_inputs):
                break
            batch.append(self._dequeue())
            size += len(pending.items)
        return batch

    def _dequeue(self) -> _Pending:
        pending = self._queue.popleft()
        self._queued_inputs -= len(pending.items)
        return pending

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            now = time.perf_counter()
            for pending in batch:
                self._on_start(now - pending.queued_at)
            try:
                rows = await self._call([item for pending in batch for item in pending.items])
            except ServiceError as exc:
                if len(batch) > 1 and exc.status == grpc.StatusCode.INVALID_ARGUMENT:
                    await self._run_alone(batch)
                else:
                    _fail(batch, exc)
                return
            except Exception as exc:  # handed to every caller; its servicer reports it
                _fail(batch, exc)
                return
            _deliver(batch, rows)
        finally:
            self._slots.release()

    async def _run_alone(self, batch: list[_Pending]) -> None:
        for pending in batch:
            if pending.future.done():
                continue
            try:
                _deliver([pending], await self._call(pending.items))
            except Exception as exc:  # this request's own failure
                _fail([pending], exc)


def _deliver(batch: list[_Pending], rows: np.ndarray) -> None:
    start = 0
    for pending in batch:
        end = start + len(pending.items)
        if not pending.future.done():
            pending.future.set_result(rows[start:end])
        start = end


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
