"""A pool of engine replicas: their state, the watch of their source, the scrape of their load, and
each request's pick, retries and ejections. The transport is the replica client's (``http.py``).

A request goes to the replica the picker names. If that replica fails before anything of the answer
arrived (refused the connection, was cut before the first byte, answered 5xx or 429), the request
is tried on another one, up to ``pool_max_attempts`` distinct replicas; once a stream has produced
anything it is never retried (bytes may have reached the client). A replica that failed so is
ejected: left out for ``pool_eject_seconds``, doubling with each further failure, then probed
(its readiness check) and taken back when it answers. A replica whose scrape is refused, or whose
readiness check fails, is ejected the same way. When every replica is ejected a request still tries
one rather than failing untried (a pool of one behaves as a single upstream did).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing
from typing import Generic, Protocol, TypeVar

import grpc
from opentelemetry import trace

from modelplex_kit import telemetry
from modelplex_kit.errors import ServiceError, unavailable
from modelplex_kit.pools.load import EngineLoad, ReplicaLoad
from modelplex_kit.pools.picker import Pick, Picker, PickRequest, Reason
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.pools.sources import ReplicaSource

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures worth another replica: the upstream was unreachable or failing (UNAVAILABLE) or full (429).
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# How long a request waits for the source's first snapshot before the pool counts as empty.
_FIRST_SNAPSHOT_S = 10.0
# Weight of the newest sample in the drain rate's moving average.
_DRAIN_SMOOTHING = 0.2


class ReplicaUnreachable(Exception):
    """The replica refused the connection (or its name did not resolve): it is down, not slow."""


class ReplicaClient(Protocol):
    async def ready(self) -> bool | None:
        """Its readiness check: None when it did not answer in time (busy: not a reason to eject)."""
        ...

    async def engine_load(self) -> EngineLoad | None:
        """One scrape; raises ReplicaUnreachable when down, TimeoutError or OSError when it could not tell."""
        ...

    async def close(self) -> None: ...


C = TypeVar("C", bound=ReplicaClient)


class Replica(Generic[C]):
    def __init__(self, pool: str, key: str, client: C) -> None:
        self.key = key
        self.client = client
        self.load = ReplicaLoad()
        self.ejected_until: float | None = None
        self.failures = 0
        self.next_ready_check = 0.0
        self.in_flight_gauge = telemetry.POOL_IN_FLIGHT.labels(pool, key)
        self.queue_gauge = telemetry.POOL_QUEUE_DEPTH.labels(pool, key)
        self.ejections = telemetry.POOL_EJECTIONS.labels(pool, key)

    @property
    def available(self) -> bool:
        return self.ejected_until is None

    def eject(self, settings: PoolSettings, why: str) -> None:
        backoff = min(settings.pool_eject_seconds * 2**self.failures, settings.pool_eject_max_seconds)
        self.failures += 1
        self.ejected_until = time.monotonic() + backoff
        self.ejections.inc()
        log.warning("pool replica ejected", extra={"replica": self.key, "why": why, "backoff_s": backoff})


class Pool(Generic[C]):
    def __init__(
        self, name: str, settings: PoolSettings, source: ReplicaSource, make_client: Callable[[str], C]
    ) -> None:
        self.name = name
        self._settings = settings
        self._source = source
        self._make_client = make_client
        self.picker = Picker(
            settings.pool_policy,
            max_imbalance=settings.pool_max_imbalance,
            block_chars=settings.pool_prefix_block_chars,
            index_blocks=settings.pool_prefix_index_blocks,
        )
        self._replicas: dict[str, Replica[C]] = {}
        self._ordered: list[Replica[C]] = []  # sorted by key: round robin and ties need a stable order
        self._known = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._finished = 0  # requests completed, for the drain rate
        self.drain_per_second = 0.0

    # -- lifecycle ------------------------------------------------------
    def _start(self) -> None:
        # On first use, not in __init__: the tasks belong to the serving event loop.
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._scrape_forever())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await asyncio.gather(*(r.client.close() for r in self._ordered), return_exceptions=True)
        self._replicas, self._ordered = {}, []

    async def ready(self) -> bool:
        """Ready while some replica not ejected passes its readiness check."""
        await self._wait_known()
        for replica in [r for r in self._ordered if r.available]:
            if await replica.client.ready():
                return True
        return False

    @property
    def replicas(self) -> Sequence[Replica[C]]:
        return self._ordered

    # -- a request ---------------------------------------------------------
    async def call(self, request: PickRequest, send: Callable[[C], Awaitable[T]]) -> T:
        """``send`` on a picked replica's client, on another one if it fails before answering."""
        tried: set[str] = set()
        while True:
            replica = await self._choose(request, tried)
            try:
                with self._running(replica):
                    return await send(replica.client)
            except ServiceError as exc:
                self._after_failure(replica, exc, tried)

    async def stream(self, request: PickRequest, open_: Callable[[C], AsyncIterator[T]]) -> AsyncIterator[T]:
        """The items of ``open_`` on a picked replica; retried elsewhere only before its first item."""
        tried: set[str] = set()
        while True:
            replica = await self._choose(request, tried)
            produced = False
            try:
                with self._running(replica):
                    async with aclosing(open_(replica.client)) as items:
                        async for item in items:
                            produced = True
                            yield item
                return
            except ServiceError as exc:
                if produced:
                    raise
                self._after_failure(replica, exc, tried)

    @contextlib.contextmanager
    def _running(self, replica: Replica[C]) -> Iterator[None]:
        replica.load.started()
        replica.in_flight_gauge.inc()
        try:
            yield
        finally:
            replica.load.finished()
            replica.in_flight_gauge.dec()
        # Only reached without an exception: the replica served the request.
        replica.failures = 0
        self._finished += 1

    def _after_failure(self, replica: Replica[C], exc: ServiceError, tried: set[str]) -> None:
        """Eject the replica where that is the cause; re-raise unless another replica may serve."""
        if exc.status not in _RETRYABLE:
            raise exc
        if exc.status == grpc.StatusCode.UNAVAILABLE and replica.available:
            replica.eject(self._settings, exc.message)
        tried.add(replica.key)
        if len(tried) >= self._settings.pool_max_attempts or len(tried) >= len(self._ordered):
            raise exc

    async def _choose(self, request: PickRequest, tried: set[str]) -> Replica[C]:
        await self._wait_known()
        untried = [r for r in self._ordered if r.key not in tried]
        candidates = [r for r in untried if r.available] or untried
        if not candidates:
            raise unavailable("No replica of the model server is ready; retry shortly.", retry_after=2)
        if not tried:
            self._refuse_if_saturated(candidates)
        pick = self.picker.pick(candidates, request)
        reason = Reason.RETRY if tried else pick.reason
        self._record(pick, reason)
        return self._replicas[pick.key]

    def _record(self, pick: Pick, reason: Reason) -> None:
        telemetry.POOL_PICKS.labels(self.name, pick.key, reason.value).inc()
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({"modelplex.pool.replica": pick.key, "modelplex.pool.reason": reason.value})

    def _refuse_if_saturated(self, candidates: Sequence[Replica[C]]) -> None:
        limit = self._settings.pool_max_queue
        if limit <= 0:
            return
        shortest = min(r.load.queue() for r in candidates)
        if shortest < limit:
            return
        telemetry.POOL_SATURATED.labels(self.name).inc()
        raise unavailable(
            "Every replica of the model server is saturated; retry shortly.",
            retry_after=self._retry_after(shortest - limit + 1, len(candidates)),
        )

    def _retry_after(self, excess: float, replicas: int) -> int:
        """Seconds until the shortest queue should be back under the limit, at the observed drain rate."""
        per_replica = self.drain_per_second / max(replicas, 1)
        if per_replica <= 0:
            return 5
        return max(1, min(60, math.ceil(excess / per_replica)))

    async def _wait_known(self) -> None:
        self._start()
        if not self._known.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._known.wait(), _FIRST_SNAPSHOT_S)

    # -- membership --------------------------------------------------------
    async def _watch(self) -> None:
        async for snapshot in self._source.snapshots():
            await self._apply(snapshot)

    async def _apply(self, snapshot: frozenset[str]) -> None:
        gone = [self._replicas.pop(key) for key in set(self._replicas) - snapshot]
        for key in sorted(snapshot - set(self._replicas)):
            self._replicas[key] = Replica(self.name, key, self._make_client(key))
        self._ordered = sorted(self._replicas.values(), key=lambda r: r.key)
        self._known.set()
        log.info("pool replicas", extra={"pool": self.name, "replicas": sorted(snapshot)})
        for replica in gone:
            self.picker.forget(replica.key)
            await replica.client.close()

    # -- load and health ----------------------------------------------------
    async def _scrape_forever(self) -> None:
        interval = self._settings.pool_scrape_interval_seconds
        last, finished = time.monotonic(), self._finished
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self._scrape(r) for r in self._ordered))
            now = time.monotonic()
            rate = (self._finished - finished) / max(now - last, 1e-6)
            self.drain_per_second += _DRAIN_SMOOTHING * (rate - self.drain_per_second)
            last, finished = now, self._finished

    async def _scrape(self, replica: Replica[C]) -> None:
        now = time.monotonic()
        if not replica.available:
            if replica.ejected_until is not None and now >= replica.ejected_until:
                await self._probe_back(replica)
            return
        try:
            async with asyncio.timeout(self._settings.pool_scrape_timeout_seconds):
                replica.load.scraped(await replica.client.engine_load())
        except ReplicaUnreachable:
            replica.eject(self._settings, "unreachable")
            return
        except (TimeoutError, OSError) as exc:
            # Slow or garbled: the last figures stand (a busy replica must not look idle).
            log.debug("pool scrape failed", extra={"replica": replica.key, "error": type(exc).__name__})
        engine = replica.load.engine
        replica.queue_gauge.set(engine.waiting if engine is not None else replica.load.queue())
        if now >= replica.next_ready_check:
            replica.next_ready_check = now + self._settings.pool_ready_check_seconds
            if await replica.client.ready() is False:
                replica.eject(self._settings, "not ready")

    async def _probe_back(self, replica: Replica[C]) -> None:
        if await replica.client.ready():
            replica.ejected_until = None
            log.info("pool replica back", extra={"replica": replica.key})
        else:
            replica.eject(self._settings, "still not ready")
