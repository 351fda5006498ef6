"""Scale to zero in the pool: requests held while no replica is ready, released to the first one up, bounded
in time and number; the demand they make reported at once to the scaler KEDA asks (the catalog's, over real
gRPC here); a replica leaving mid-stream finishes its stream. In-process replica clients (the HTTP path with
real llama.cpp servers is tests/e2e/test_scale_to_zero.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from externalscaler import externalscaler_pb2, externalscaler_pb2_grpc
from libs.tests.test_pools import FakeReplica
from modelplex.v1 import demand_pb2, demand_pb2_grpc
from modelplex_catalog import scaler
from modelplex_kit.demand import Demand
from modelplex_kit.errors import ServiceError
from modelplex_kit.pools.picker import PickRequest
from modelplex_kit.pools.pool import Pool
from modelplex_kit.pools.settings import PoolSettings
from tests.support.until import until


class MovingSource:
    """A source whose snapshots the test sends (as EndpointSlices change when pods start and stop)."""

    def __init__(self, first: frozenset[str] = frozenset()) -> None:
        self._queue: asyncio.Queue[frozenset[str]] = asyncio.Queue()
        self._queue.put_nowait(first)

    def move(self, replicas: set[str]) -> None:
        self._queue.put_nowait(frozenset(replicas))

    async def snapshots(self) -> AsyncIterator[frozenset[str]]:
        while True:
            yield await self._queue.get()


def cold_pool(
    source: MovingSource, timeout: float = 30.0, **overrides: object
) -> tuple[Pool[FakeReplica], dict[str, FakeReplica]]:
    settings = PoolSettings(
        **{  # type: ignore[arg-type]
            "upstream_url": "http://engine:8000/v1",
            "pool_scrape_interval_seconds": 0.02,
            "pool_ready_check_seconds": 0.02,
            "pool_cold_start_timeout_seconds": timeout,
        }
        | overrides
    )
    clients: dict[str, FakeReplica] = {}

    def client(key: str) -> FakeReplica:
        return clients.setdefault(key, FakeReplica(key))

    return Pool("cold", settings, source, client), clients


async def test_requests_to_a_pool_with_no_replica_are_held_and_served_by_the_first_one_up():
    source = MovingSource()
    pool, clients = cold_pool(source)
    try:
        assert await pool.ready()  # it can hold: its backend serves with no engine at all
        held = [asyncio.create_task(pool.call(PickRequest(), lambda c: c.answer())) for _ in range(20)]
        await until(lambda: pool.held == 20, 5, what="20 held")
        assert pool.demand() == Demand(held=20)
        source.move({"e0:1"})  # the first engine pod is ready
        assert await asyncio.wait_for(asyncio.gather(*held), 5) == ["e0:1"] * 20
        assert pool.held == 0 and clients["e0:1"].served == 20
    finally:
        await pool.close()


async def test_a_replica_that_is_down_until_it_starts_is_probed_back_while_requests_wait():
    """Scaled to zero with a fixed address (a static pool; a Service whose pod is restarting): the replica
    refuses, is ejected, and is probed every tick while requests are held, whatever its backoff."""
    source = MovingSource(frozenset({"e0:1"}))
    pool, clients = cold_pool(source, pool_eject_seconds=30.0)
    try:
        await pool.ready()
        clients["e0:1"].up = False
        waiting = asyncio.create_task(pool.call(PickRequest(), lambda c: c.answer()))
        await until(lambda: pool.held == 1, 5, what="held")
        clients["e0:1"].up = True
        assert await asyncio.wait_for(waiting, 5) == "e0:1"  # long before its 30 s backoff
    finally:
        await pool.close()


async def test_past_the_cold_start_bound_a_held_request_gets_503_with_retry_after():
    pool, _ = cold_pool(MovingSource(), timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(ServiceError) as caught:
            await pool.call(PickRequest(), lambda c: c.answer())
        assert time.monotonic() - started >= 0.3
        assert caught.value.status == grpc.StatusCode.UNAVAILABLE
        assert int(caught.value.headers["retry-after"]) >= 1
        assert "not ready within 0.3 s" in caught.value.message
        assert pool.held == 0
    finally:
        await pool.close()


async def test_beyond_the_held_bound_requests_are_refused_at_once():
    pool, _ = cold_pool(MovingSource(), pool_max_held=3)
    try:
        held = [asyncio.create_task(pool.call(PickRequest(), lambda c: c.answer())) for _ in range(3)]
        await until(lambda: pool.held == 3, 5, what="3 held")
        with pytest.raises(ServiceError) as caught:
            await asyncio.wait_for(pool.call(PickRequest(), lambda c: c.answer()), 1)
        assert caught.value.status == grpc.StatusCode.UNAVAILABLE and "Too many requests" in caught.value.message
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        assert pool.held == 0  # a client that left is no longer held
    finally:
        await pool.close()


async def test_without_scale_to_zero_a_pool_with_no_replica_refuses_at_once():
    source = MovingSource()
    pool, _ = cold_pool(source, timeout=0.0)
    try:
        assert not await pool.ready()
        with pytest.raises(ServiceError) as caught:
            await asyncio.wait_for(pool.call(PickRequest(), lambda c: c.answer()), 1)
        assert caught.value.status == grpc.StatusCode.UNAVAILABLE and pool.held == 0
    finally:
        await pool.close()


class GatedReplica(FakeReplica):
    """Streams tokens one by one, each when the test opens the gate."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.gate = asyncio.Semaphore(0)

    def let(self, tokens: int) -> None:
        for _ in range(tokens):
            self.gate.release()

    async def tokens(self, fail_after: int | None = None) -> AsyncIterator[str]:
        for i in range(5):
            await self.gate.acquire()
            yield f"{self.key}:{i}"
        self.served += 1


async def test_scaling_down_during_a_stream_loses_nothing():
    """The replica leaves the source (its pod terminating) mid-stream: new requests go elsewhere at once,
    its stream runs to its end, and only then is its client closed."""
    source = MovingSource(frozenset({"e0:1"}))
    settings = PoolSettings(
        upstream_url="http://engine:8000/v1", pool_scrape_interval_seconds=0.02, pool_cold_start_timeout_seconds=10
    )
    clients: dict[str, GatedReplica] = {}
    pool: Pool[GatedReplica] = Pool("cold", settings, source, lambda k: clients.setdefault(k, GatedReplica(k)))
    try:
        await pool.ready()
        received: list[str] = []

        async def read() -> None:
            async for token in pool.stream(PickRequest(), lambda c: c.tokens()):
                received.append(token)

        streaming = asyncio.create_task(read())
        clients["e0:1"].let(1)
        await until(lambda: received == ["e0:1:0"], 5, what="first token")
        source.move({"e1:1"})  # scale-down replaces e0 with e1 (or to zero and back)
        await until(lambda: [r.key for r in pool.replicas] == ["e1:1"], 5, what="e0 gone from the pool")
        clients["e1:1"].let(5)
        assert [t async for t in pool.stream(PickRequest(), lambda c: c.tokens())] == [f"e1:1:{i}" for i in range(5)]
        assert not clients["e0:1"].closed  # its stream is still running on it
        clients["e0:1"].let(4)
        await asyncio.wait_for(streaming, 5)
        assert received == [f"e0:1:{i}" for i in range(5)]
        await until(lambda: clients["e0:1"].closed, 5, what="e0 closed after its last stream")
    finally:
        await pool.close()


# -- the demand, as KEDA reads it ----------------------------------------------------------
@pytest.fixture
async def scaler_server():
    board = scaler.DemandBoard()
    server = grpc.aio.server()
    scaler.register(server, board)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", board
    finally:
        await server.stop(None)


def ref(key: str, **metadata: str) -> externalscaler_pb2.ScaledObjectRef:
    return externalscaler_pb2.ScaledObjectRef(name="engine", namespace="ns", scalerMetadata={"key": key, **metadata})


async def test_the_first_held_request_is_pushed_to_keda_at_once(scaler_server):
    target, _ = scaler_server
    source = MovingSource()
    pool, _ = cold_pool(source, pool_demand_target=target, pool_demand_key="m1", pool_demand_interval_seconds=30)
    async with grpc.aio.insecure_channel(target) as channel:
        keda = externalscaler_pb2_grpc.ExternalScalerStub(channel)
        activity = keda.StreamIsActive(ref("m1"))
        try:
            assert (await activity.read()).result is False
            await pool.ready()  # the pool's tasks (and its reporter) run from its first use
            started = time.monotonic()
            waiting = asyncio.create_task(pool.call(PickRequest(), lambda c: c.answer()))
            assert (await asyncio.wait_for(activity.read(), 5)).result is True
            # Well within KEDA's needs: not the 30 s report interval, not KEDA's polling interval.
            assert time.monotonic() - started < 0.1
            request = externalscaler_pb2.GetMetricsRequest(scaledObjectRef=ref("m1"), metricName="demand")
            assert (await keda.GetMetrics(request)).metricValues[0].metricValue == 1
            source.move({"e0:1"})
            assert await waiting == "e0:1"
        finally:
            activity.cancel()
            await pool.close()
        # A closed pool withdraws its demand: nothing of it lingers until it lapses.
        assert not (await keda.IsActive(ref("m1"))).result


async def test_demand_sums_what_each_reporter_holds_and_takes_the_largest_queue(scaler_server):
    target, _ = scaler_server
    async with grpc.aio.insecure_channel(target) as channel:
        reports = demand_pb2_grpc.DemandServiceStub(channel)
        keda = externalscaler_pb2_grpc.ExternalScalerStub(channel)
        for reporter, held, queued in (("backend-a", 2, 7), ("backend-b", 3, 6)):
            report = demand_pb2.DemandReport(
                key="m1", reporter=reporter, held=held, in_flight=1, queued=queued, ttl_seconds=60
            )
            await reports.Report(report)
        # Both backends see the same engines' queue (7 or 6 as they last scraped it): counted once.
        request = externalscaler_pb2.GetMetricsRequest(scaledObjectRef=ref("m1"), metricName="demand")
        assert (await keda.GetMetrics(request)).metricValues[0].metricValue == 2 + 3 + 1 + 1 + 7
        assert not (await keda.IsActive(ref("m2"))).result  # per model
        spec = await keda.GetMetricSpec(ref("m1", targetPerReplica="16"))
        assert (spec.metricSpecs[0].metricName, spec.metricSpecs[0].targetSize) == ("demand", 16)
        assert (await keda.GetMetricSpec(ref("m1"))).metricSpecs[0].targetSize == scaler.DEFAULT_TARGET_PER_REPLICA

        await reports.Report(demand_pb2.DemandReport(key="m1", reporter="backend-a", held=0, ttl_seconds=0))
        assert (await keda.GetMetrics(request)).metricValues[0].metricValue == 3 + 1 + 6

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await keda.GetMetricSpec(ref("m1", targetPerReplica="lots"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as unnamed:
            await keda.IsActive(externalscaler_pb2.ScaledObjectRef(name="engine", namespace="ns"))
        assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "key" in unnamed.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await reports.Report(demand_pb2.DemandReport(key="m1", held=1, ttl_seconds=5))
        assert anonymous.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_reporter_that_stops_reporting_lapses():
    now = [100.0]
    board = scaler.DemandBoard(clock=lambda: now[0])
    board.report("m1", "dead-backend", Demand(held=4), ttl_seconds=6)
    assert board.demand("m1").total == 4
    now[0] += 6.5
    assert board.demand("m1") == Demand()
