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

A request for a LoRA adapter goes where the adapter is loaded, or is loaded first (``adapters.py``).

Scale to zero (``pool_cold_start_timeout_seconds`` > 0): a request that finds no replica ready (none in the
source's snapshot, or every one down) is held, not failed. The pool reports its demand at once (``demand``
below, pushed to the scaler KEDA asks), probes its replicas every ``pool_cold_probe_seconds`` while it holds,
and releases the held requests to the first replica that is ready; a held stream announces itself
(``cold_start``) so the edge keeps its client's connection alive. Past the bound, or beyond ``pool_max_held``
held at once: 503 with Retry-After. The pool counts as ready (its backend SERVING) with no replica at all: it can hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing
from typing import Generic, Protocol, TypeVar, runtime_checkable

import grpc
from opentelemetry import trace

from modelplex_kit import cold_start, telemetry
from modelplex_kit.demand import Demand, DemandReporter
from modelplex_kit.drain import DrainRate, retry_after
from modelplex_kit.errors import ServiceError, unavailable
from modelplex_kit.pools.adapters import AdapterLoading, AdapterPlacement
from modelplex_kit.pools.kv_events import EngineCacheFeed, EngineCacheView
from modelplex_kit.pools.load import EngineLoad, Prefill, ReplicaLoad
from modelplex_kit.pools.picker import CacheUse, Pick, Picker, PickRequest, Reason
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.pools.sources import ReplicaSource
from modelplex_kit.pools.sync import PickSync, SharedPick

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures worth another replica: the upstream was unreachable or failing (UNAVAILABLE) or full (429).
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# How long a request waits for the source's first snapshot before the pool counts as empty.
_FIRST_SNAPSHOT_S = 10.0
# Pause before a failed replica source is restarted.
_SOURCE_RESTART_S = 1.0
# Weight of the newest scrape interval in the drain rate's moving average.
_DRAIN_SMOOTHING = 0.2
# Retry-After of a request the cold-start bound turned away: the replica it was waiting for is still starting.
_COLD_RETRY_AFTER_S = 5


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


@runtime_checkable
class Tokenizing(Protocol):
    """A replica client whose engine tokenizes prompts (vLLM's ``/tokenize``): pools following their
    engines' KV-cache events look prompts up by their tokens."""

    async def tokenize(self, body: dict, timeout_seconds: float) -> list[int] | None: ...


C = TypeVar("C", bound=ReplicaClient)
#: What an answer (or a streamed item) says the engine found in its prefix cache; None: it does not say.
CacheUseOf = Callable[[T], CacheUse | None]


class Replica(Generic[C]):
    def __init__(self, pool: str, key: str, client: C) -> None:
        self.key = key
        self.client = client
        self.load = ReplicaLoad()
        self.ejected_until: float | None = None
        self.failures = 0
        self.retired = False  # gone from the source: closed once its last request ends
        self.next_ready_check = 0.0
        self.in_flight_gauge = telemetry.POOL_IN_FLIGHT.labels(pool, key)
        self.queue_gauge = telemetry.POOL_QUEUE_DEPTH.labels(pool, key)
        self.ejections = telemetry.POOL_EJECTIONS.labels(pool, key)
        self._labels = (pool, key)

    def forget_metrics(self) -> None:
        """A replica gone for good: its series go too (pods come and go; label sets must not pile up)."""
        for metric in (telemetry.POOL_IN_FLIGHT, telemetry.POOL_QUEUE_DEPTH, telemetry.POOL_EJECTIONS):
            with contextlib.suppress(KeyError):
                metric.remove(*self._labels)

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
            replica_cache_chars=settings.pool_prefix_replica_cache_chars,
        )
        self.adapters = AdapterPlacement(name, settings.pool_adapter_slots, settings.pool_adapter_wait_seconds)
        self._replicas: dict[str, Replica[C]] = {}
        self._ordered: list[Replica[C]] = []  # sorted by key: round robin and ties need a stable order
        self._known = asyncio.Event()
        self._started_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._finished = 0  # requests completed, for the drain rate
        self._closing: set[asyncio.Task[None]] = set()
        self._drain = DrainRate(smoothing=_DRAIN_SMOOTHING, period=settings.pool_scrape_interval_seconds)
        self._sync = (
            PickSync(name, settings.pool_sync_url, settings.pool_sync_channel or f"modelplex:pool:{name}", self._learn)
            if settings.pool_sync_url
            else None
        )
        self._held = 0
        self._held_gauge = telemetry.POOL_HELD.labels(name)
        self._replica_ready = asyncio.Event()  # set whenever a replica becomes available: held requests go
        self._prober: asyncio.Task[None] | None = None
        self.demand_reporter = DemandReporter(
            settings.pool_demand_target,
            settings.pool_demand_key or name,
            self.demand,
            settings.pool_demand_interval_seconds,
        )
        self._engine_cache = (
            EngineCacheFeed(
                name,
                EngineCacheView(settings.pool_kv_events_max_blocks),
                settings.pool_kv_events_port,
                settings.pool_kv_events_topic,
            )
            if settings.pool_kv_events_port and settings.pool_policy == "affinity"
            else None
        )

    # -- lifecycle ------------------------------------------------------
    def _start(self) -> None:
        # On first use, not in __init__: the tasks belong to the serving event loop.
        if not self._tasks:
            self._started_at = time.monotonic()
            self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._scrape_forever())]
            if self._sync is not None:
                self._sync.start()
            self.demand_reporter.start()

    async def close(self) -> None:
        if self._prober is not None:
            self._tasks.append(self._prober)
            self._prober = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.demand_reporter.close()
        if self._sync is not None:
            await self._sync.close()
        if self._engine_cache is not None:
            await self._engine_cache.close()
        await asyncio.gather(*(r.client.close() for r in self._ordered), *self._closing, return_exceptions=True)
        self._replicas, self._ordered = {}, []

    async def ready(self) -> bool:
        """Ready while some replica passes its readiness check. Ejected replicas are checked too when no
        other one is ready, and taken back at once if they pass: a pool whose every replica was down
        (a pool of one whose server restarted) serves again as soon as one is back, not after its backoff.
        A pool that holds for cold starts is ready with none: it takes requests and holds them."""
        await self._wait_known()
        for replica in sorted(self._ordered, key=lambda r: not r.available):
            if await replica.client.ready():
                if not replica.available:
                    self._take_back(replica)
                return True
        return self._holds

    @property
    def replicas(self) -> Sequence[Replica[C]]:
        return self._ordered

    @property
    def _holds(self) -> bool:
        return self._settings.pool_cold_start_timeout_seconds > 0

    @property
    def held(self) -> int:
        """Requests waiting now for a replica to start."""
        return self._held

    def demand(self) -> Demand:
        """What this backend replica sees of its model's demand: requests it holds, runs, and the engines' queues."""
        queued = 0.0
        in_flight = 0
        for replica in self._ordered:
            in_flight += replica.load.in_flight
            engine = replica.load.engine
            if engine is not None:
                queued += engine.waiting
        return Demand(held=self._held, in_flight=in_flight, queued=round(queued))

    @property
    def drain_per_second(self) -> float:
        """Requests the pool finished per second, smoothed; 0 until one has finished."""
        return self._drain.per_second or 0.0

    # -- a request ---------------------------------------------------------
    async def call(
        self, request: PickRequest, send: Callable[[C], Awaitable[T]], cache_use: CacheUseOf[T] | None = None
    ) -> T:
        """``send`` on a picked replica's client, on another one if it fails before answering.
        ``cache_use``: what the answer says the engine found cached (the picker learns from it)."""
        tried: set[str] = set()
        reloads = 0
        hold_until = self._hold_deadline()
        while True:
            replica, pick = await self._choose(request, tried, hold_until)
            try:
                with self._running(replica, pick):
                    async with self._adapter_on(replica, request):
                        answer = await send(replica.client)
            except ServiceError as exc:
                reloads = self._after_failure(replica, request, exc, tried, reloads)
                continue
            self._observe(pick, answer, cache_use)
            return answer

    async def stream(
        self, request: PickRequest, open_: Callable[[C], AsyncIterator[T]], cache_use: CacheUseOf[T] | None = None
    ) -> AsyncIterator[T]:
        """The items of ``open_`` on a picked replica; retried elsewhere only before its first item.
        ``cache_use``: which item says what the engine found cached, and what (the picker learns from it)."""
        tried: set[str] = set()
        reloads = 0
        hold_until = self._hold_deadline()
        while True:
            replica, pick = await self._choose(request, tried, hold_until)
            produced = False
            try:
                with self._running(replica, pick) as prefilled:
                    async with self._adapter_on(replica, request), aclosing(open_(replica.client)) as items:
                        async for item in items:
                            if not produced:
                                produced = True
                                prefilled()  # the first item: the engine is past this prompt's prefill
                            self._observe(pick, item, cache_use)
                            yield item
                return
            except ServiceError as exc:
                if produced:
                    raise
                reloads = self._after_failure(replica, request, exc, tried, reloads)

    def _observe(self, pick: Pick, item: T, cache_use: CacheUseOf[T] | None) -> None:
        use = cache_use(item) if cache_use is not None else None
        if use is not None:
            # The picker ignores a replica it no longer knows (one the source removed meanwhile).
            self.picker.observed(pick, use)

    @contextlib.contextmanager
    def _running(self, replica: Replica[C], pick: Pick) -> Iterator[Callable[[], None]]:
        """The request runs on the replica; the callable it yields marks its prefill done."""
        replica.load.started()
        replica.in_flight_gauge.inc()
        prefill = Prefill(replica.load)
        try:
            yield prefill.done
        finally:
            prefill.done()
            replica.load.finished()
            replica.in_flight_gauge.dec()
            if replica.retired and replica.load.in_flight == 0:
                self._retire(replica)
        # Only reached without an exception: the replica served the request.
        replica.failures = 0
        self._finished += 1

    def _adapter_on(self, replica: Replica[C], request: PickRequest) -> contextlib.AbstractAsyncContextManager:
        """The request's adapter loaded on the replica while it runs there (nothing for the base model)."""
        if request.adapter is None or not isinstance(replica.client, AdapterLoading):
            return contextlib.nullcontext()
        return self.adapters.holding(replica.key, replica.client, request.adapter)

    def _after_failure(
        self, replica: Replica[C], request: PickRequest, exc: ServiceError, tried: set[str], reloads: int
    ) -> int:
        """Eject the replica where that is the cause; re-raise unless another replica may serve. Returns the
        reloads of the request's adapter so far: an engine that no longer has it (a 404 for its name: it
        restarted, another backend unloaded it) gets it loaded again, once, before the failure stands."""
        if exc.status == grpc.StatusCode.NOT_FOUND and request.adapter is not None and reloads == 0:
            self.adapters.lost(replica.key, request.adapter.name)
            return reloads + 1
        if exc.status not in _RETRYABLE:
            raise exc
        if exc.status == grpc.StatusCode.UNAVAILABLE and replica.available:
            replica.eject(self._settings, exc.message)
        tried.add(replica.key)
        if len(tried) >= self._settings.pool_max_attempts or len(tried) >= len(self._ordered):
            if self._holds and not self._any_available():
                tried.clear()  # every replica is down: the next pick holds for one to start
                return reloads
            raise exc
        return reloads

    async def _choose(self, request: PickRequest, tried: set[str], hold_until: float) -> tuple[Replica[C], Pick]:
        await self._wait_known()
        held = self._holds and not self._any_available()
        if held:
            await self._hold(hold_until)
            tried.clear()
        candidates = self._candidates(tried)
        if not tried:
            if not held:  # a held burst goes to the first replica up: it waited its turn, the engine queues it
                self._refuse_if_saturated(candidates)
            engine_cached = await self._engine_cached(candidates, request)
            # The tokenize call awaited: the source may have removed a replica meanwhile.
            candidates = self._candidates(tried)
        else:
            engine_cached = None
        if request.adapter is not None:
            candidates = self.adapters.narrow(
                candidates,
                request.adapter.name,
                prefer_holders=self._settings.pool_policy == "affinity",
                max_imbalance=self._settings.pool_max_imbalance,
            )
        pick = self.picker.pick(candidates, request, engine_cached)
        reason = Reason.RETRY if tried else pick.reason
        self._record(pick, reason)
        if self._sync is not None:
            # Every pick, with a prompt or not: the others count it in the replica's load until their next scrape.
            adapter = request.adapter.name if request.adapter is not None else ""
            self._sync.share(SharedPick(pick.key, pick.hashes, pick.session_hash, adapter))
        return self._replicas[pick.key], pick

    # -- cold starts ---------------------------------------------------------
    def _hold_deadline(self) -> float:
        return time.monotonic() + self._settings.pool_cold_start_timeout_seconds if self._holds else 0.0

    def _any_available(self) -> bool:
        return any(r.available for r in self._ordered)

    async def _hold(self, until: float) -> None:
        """Waits for a replica to be ready (the request arrived while none was), up to ``until``."""
        if self._held >= self._settings.pool_max_held:
            telemetry.POOL_SATURATED.labels(self.name).inc()
            raise unavailable(
                "Too many requests are waiting for the model server to start; retry shortly.",
                retry_after=_COLD_RETRY_AFTER_S,
            )
        started = time.monotonic()
        self._held += 1
        self._held_gauge.set(self._held)
        self.demand_reporter.poke()  # the scaler hears of it now, not at the next tick
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probe_while_held())
        outcome = "timeout"
        try:
            await cold_start.announce_held()
            while not self._any_available():
                remaining = until - time.monotonic()
                if remaining <= 0:
                    raise unavailable(
                        "The model server is starting and was not ready within "
                        f"{self._settings.pool_cold_start_timeout_seconds:g} s; retry shortly.",
                        retry_after=_COLD_RETRY_AFTER_S,
                    )
                self._replica_ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._replica_ready.wait(), remaining)
            outcome = "served"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._held -= 1
            self._held_gauge.set(self._held)
            telemetry.POOL_HOLD_SECONDS.labels(self.name, outcome).observe(time.monotonic() - started)

    async def _probe_while_held(self) -> None:
        """Every ``pool_cold_probe_seconds`` while requests are held: each replica that is not available is
        asked whether it is ready, whatever its backoff, and quietly (a starting engine is not news); the
        first that is takes the held requests. With an empty source there is nothing to ask: the snapshot
        that brings a replica releases them (``_apply``)."""
        interval = self._settings.pool_cold_probe_seconds
        while self._held:
            down = [r for r in self._ordered if not r.available]
            answers = await asyncio.gather(*(r.client.ready() for r in down), return_exceptions=True)
            for replica, ready in zip(down, answers, strict=True):
                if ready is True and replica.key in self._replicas:
                    self._take_back(replica)
            await asyncio.sleep(interval)

    def _candidates(self, tried: set[str]) -> list[Replica[C]]:
        untried = [r for r in self._ordered if r.key not in tried]
        candidates = [r for r in untried if r.available] or untried
        if not candidates:
            raise unavailable("No replica of the model server is ready; retry shortly.", retry_after=2)
        return candidates

    async def _engine_cached(self, candidates: Sequence[Replica[C]], request: PickRequest) -> dict[str, int] | None:
        """Where the engines' KV-cache events say the prompt's prefix is, for a prompt the prefix index
        knows nothing of (one tokenize call on an engine); None where that cannot or need not be asked.
        Whatever goes wrong here, the request is picked without the events, never failed."""
        feed = self._engine_cache
        if feed is None or request.tokenize is None or feed.view.block_size <= 0:
            return None
        if not self.picker.prefix_unknown(candidates, request):
            return None
        try:
            tokens = await self._tokenize(candidates, request.tokenize)
            return feed.view.matches(tokens, (c.key for c in candidates)) if tokens is not None else None
        except Exception:
            log.exception("pool: looking a prompt up in the engines' events failed", extra={"pool": self.name})
            return None

    async def _tokenize(self, candidates: Sequence[Replica[C]], body: dict) -> list[int] | None:
        # The least loaded candidate's engine: tokenizing is the same on every replica of a model. A short
        # bound: a prompt that cannot be looked up in time is placed without the events.
        client = min(candidates, key=lambda r: r.load.score()).client
        timeout = self._settings.pool_tokenize_timeout_seconds
        tokens = await client.tokenize(body, timeout) if isinstance(client, Tokenizing) else None
        telemetry.POOL_TOKENIZE.labels(self.name, "ok" if tokens is not None else "failed").inc()
        return tokens

    def _learn(self, pick: SharedPick) -> None:
        """A pick of another backend replica of this model (sync.py), for an engine replica this pool knows."""
        replica = self._replicas.get(pick.replica)
        if replica is not None:
            replica.load.peer_started()
            self.picker.learn_from_peer(pick.replica, pick.hashes, pick.session_hash)
            if pick.adapter:
                self.adapters.learned(pick.replica, pick.adapter)

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
        return retry_after(excess, self.drain_per_second / max(replicas, 1))

    async def _wait_known(self) -> None:
        """Waits for the source's first snapshot, up to _FIRST_SNAPSHOT_S after the pool started (not
        per request: a source that never answers must not hold every request that long)."""
        self._start()
        if not self._known.is_set():
            remaining = self._started_at + _FIRST_SNAPSHOT_S - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._known.wait(), max(remaining, 0.0))

    # -- membership --------------------------------------------------------
    async def _watch(self) -> None:
        """Follows the source; one that fails is restarted after a pause (the last snapshot stands meanwhile)."""
        while True:
            try:
                async for snapshot in self._source.snapshots():
                    await self._apply(snapshot)
                return  # a source that ends has no more changes
            except Exception:
                log.exception("pool replica source failed; restarting it", extra={"pool": self.name})
                await asyncio.sleep(_SOURCE_RESTART_S)

    async def _apply(self, snapshot: frozenset[str]) -> None:
        gone = [self._replicas.pop(key) for key in set(self._replicas) - snapshot]
        for key in sorted(snapshot - set(self._replicas)):
            self._replicas[key] = Replica(self.name, key, self._make_client(key))
            if self._engine_cache is not None:
                self._engine_cache.follow(key)
        self._ordered = sorted(self._replicas.values(), key=lambda r: r.key)
        self._known.set()
        if self._any_available():
            self._replica_ready.set()
        log.info("pool replicas", extra={"pool": self.name, "replicas": sorted(snapshot)})
        for replica in gone:
            self.picker.forget(replica.key)
            self.adapters.forget(replica.key)
            if self._engine_cache is not None:
                self._engine_cache.unfollow(replica.key)
            replica.retired = True
            if replica.load.in_flight == 0:
                self._retire(replica)
            # else: its requests finish on it (a pod leaving the endpoints drains them); the last one closes it.

    def _retire(self, replica: Replica[C]) -> None:
        if replica.key not in self._replicas:  # not back under the same address meanwhile (same series)
            replica.forget_metrics()
        task = asyncio.create_task(replica.client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- load and health ----------------------------------------------------
    def _take_back(self, replica: Replica[C]) -> None:
        replica.ejected_until = None
        self._replica_ready.set()
        log.info("pool replica back", extra={"replica": replica.key})

    async def _scrape_forever(self) -> None:
        interval = self._settings.pool_scrape_interval_seconds
        last, finished = time.monotonic(), self._finished
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self._scrape_safely(r) for r in self._ordered))
            now = time.monotonic()
            self._drain.add(self._finished - finished, now - last)
            last, finished = now, self._finished

    async def _scrape_safely(self, replica: Replica[C]) -> None:
        # Whatever one replica's scrape raises, the loop (every replica's load) goes on.
        try:
            await self._scrape(replica)
        except Exception:
            log.exception("pool scrape failed", extra={"replica": replica.key})
        finally:
            # Other backends' picks count for one scrape interval, whether or not this scrape succeeded:
            # a replica whose metrics cannot be read must not look busier with every pick forever.
            replica.load.peers_counted()
            self.adapters.peers_counted(replica.key)

    async def _scrape(self, replica: Replica[C]) -> None:
        now = time.monotonic()
        if not replica.available:
            # While requests are held, _probe_while_held looks far more often.
            if not self._held and replica.ejected_until is not None and now >= replica.ejected_until:
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
        if engine is not None:
            self.adapters.engine_says(replica.key, engine.lora_busy)
        replica.queue_gauge.set(engine.waiting if engine is not None else replica.load.queue())
        if now >= replica.next_ready_check:
            replica.next_ready_check = now + self._settings.pool_ready_check_seconds
            if await replica.client.ready() is False:
                replica.eject(self._settings, "not ready")

    async def _probe_back(self, replica: Replica[C]) -> None:
        if await replica.client.ready():
            self._take_back(replica)
        else:
            replica.eject(self._settings, "still not ready")
