"""A dependency that is down is logged once, not once per request or retry (issue 22: log floods).

The gatekeeper sidecar down used to cost two WARNING lines per refused request ("gatekeeper stream
failed" and "gatekeeper stream ended"); the catalog one per watch retry; the batch queue one traceback per
worker poll. Each is now an outage (modelplex_kit.outages): one WARNING, one INFO line when it is over.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from modelplex.v1 import catalog_pb2
from modelplex.v1 import gatekeeper_pb2_grpc as pb_grpc
from modelplex_edge import catalog_client
from modelplex_edge.admission import Ask, Consumption
from modelplex_edge.catalog_client import CatalogWatcher
from modelplex_edge.endpoints.batches.worker import BatchWorker
from modelplex_edge.endpoints.responses.background import BackgroundWorker
from modelplex_edge.endpoints.responses.router import ENDPOINT as RESPONSES
from modelplex_edge.gatekeeper_client import GatekeeperAdmission
from modelplex_edge.settings import EdgeSettings
from modelplex_gatekeeper.gate import Gate
from modelplex_gatekeeper.keys import KeyRecord, KeyRing, KeysFile, new_key
from modelplex_gatekeeper.servicer import GatekeeperServicer
from modelplex_gatekeeper.store import MemoryStore, UsageLog
from modelplex_kit import jobqueue
from modelplex_kit.errors import ServiceError
from tests.support.ports import free_port
from tests.support.until import until

REQUESTS = 50


class Sidecar:
    """The gatekeeper service on a fixed address, stopped and started again at will."""

    def __init__(self, tmp: Path) -> None:
        keys = KeysFile()
        self.secret, self.spare = new_key(), new_key()
        keys.add(self.secret, KeyRecord(name="dev", hash="", rpm=100_000))
        keys.add(self.spare, KeyRecord(name="spare", hash="", rpm=100_000))
        keys.save(tmp / "keys.yaml")
        self.gate = Gate(KeyRing(tmp / "keys.yaml"), MemoryStore(900, UsageLog(tmp / "usage.jsonl")))
        self.target = f"127.0.0.1:{free_port()}"
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.server = grpc.aio.server()
        pb_grpc.add_GatekeeperServiceServicer_to_server(GatekeeperServicer(self.gate), self.server)
        self.server.add_insecure_port(self.target)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None


@pytest.fixture
async def sidecar(tmp_path):
    """Not started: each test starts (and stops) it; it is stopped at the end whatever happened."""
    sidecar = Sidecar(tmp_path)
    yield sidecar
    await sidecar.stop()


def _ask(secret: str) -> Ask:
    return Ask((f"Bearer {secret}",), "chat.completions", "m", 10)


def _edge_lines(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("modelplex_edge") and r.levelno == level]


async def _refused(admission: GatekeeperAdmission, secret: str) -> None:
    with pytest.raises(ServiceError) as refused:
        await admission.admit(_ask(secret))
    assert refused.value.http.status == 503 and "retry-after" in refused.value.headers


async def _admitted_once_up(admission: GatekeeperAdmission, secret: str) -> None:
    async def admitted() -> bool:
        try:
            taken = await admission.admit(_ask(secret))
        except ServiceError:
            return False  # the channel may still be backing off from the outage
        await admission.account(taken, Consumption(), failed=False)
        return True

    await until(admitted, 30, what="a request admitted once the sidecar is up")


def _refused_count(recovery: str) -> int:
    found = re.search(r"(\d+) requests refused", recovery)
    assert found, recovery
    return int(found.group(1))


@pytest.mark.parametrize("leases", [True, False])
async def test_a_sidecar_that_is_not_there_is_one_warning_not_two_per_request(sidecar, caplog, leases):
    caplog.set_level(logging.INFO)
    # No summary within the test (the summary has its own test in libs/tests/test_outages.py).
    admission = GatekeeperAdmission(sidecar.target, timeout_seconds=0.5, leases=leases, summary_seconds=3600)
    for _ in range(REQUESTS):
        await _refused(admission, sidecar.secret)
    assert _edge_lines(caplog, logging.WARNING) == ["gatekeeper unreachable: stream failed (UNAVAILABLE)"]

    await sidecar.start()
    await _admitted_once_up(admission, sidecar.secret)
    recoveries = [line for line in _edge_lines(caplog, logging.INFO) if "reachable again" in line]
    assert len(recoveries) == 1 and recoveries[0].startswith("gatekeeper reachable again after")
    assert _refused_count(recoveries[0]) >= REQUESTS
    assert len(_edge_lines(caplog, logging.WARNING)) == 1
    assert sidecar.secret not in caplog.text  # keys are never logged
    await admission.close()


async def test_a_sidecar_that_goes_away_and_comes_back_is_logged_as_it_changes(sidecar, caplog):
    caplog.set_level(logging.INFO)
    await sidecar.start()
    admission = GatekeeperAdmission(sidecar.target, timeout_seconds=0.5, summary_seconds=3600)
    await _admitted_once_up(admission, sidecar.secret)  # the stream works (and this key holds a lease)

    await sidecar.stop()
    for _ in range(REQUESTS):  # a key with no lease: every one of its requests needs the sidecar
        await _refused(admission, sidecar.spare)
    warnings = _edge_lines(caplog, logging.WARNING)
    # The working stream's end (once) and the outage (once), in either order: not one or two per request.
    assert len(warnings) <= 2 and sum(line.startswith("gatekeeper unreachable") for line in warnings) == 1, warnings

    await sidecar.start()
    await _admitted_once_up(admission, sidecar.spare)  # decided by the sidecar: it answered
    recoveries = [line for line in _edge_lines(caplog, logging.INFO) if "reachable again" in line]
    assert len(recoveries) == 1 and _refused_count(recoveries[0]) >= REQUESTS, recoveries
    assert _edge_lines(caplog, logging.WARNING) == warnings
    assert sidecar.secret not in caplog.text and sidecar.spare not in caplog.text
    await admission.close()


# -- the catalog watch ----------------------------------------------------------------------------------------
def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")


class FlakyCatalog:
    """A catalog stub whose first ``failures`` watches fail to connect; the next delivers, then stays open."""

    def __init__(self, failures: int) -> None:
        self.failures, self.watches = failures, 0

    def WatchModels(self, request):
        self.watches += 1
        return self._fail() if self.watches <= self.failures else self._deliver()

    async def _fail(self):
        raise _unavailable()
        yield  # an async generator, like the stub's stream

    async def _deliver(self):
        yield catalog_pb2.WatchModelsResponse(revision=1)
        await asyncio.Event().wait()


async def test_a_catalog_that_cannot_be_reached_is_one_warning_not_one_per_retry(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(catalog_client, "BACKOFF_FIRST_S", 0.001)
    monkeypatch.setattr(catalog_client, "BACKOFF_MAX_S", 0.001)
    watcher = CatalogWatcher(grpc.aio.insecure_channel("127.0.0.1:1"))
    watcher._stub = FlakyCatalog(failures=20)
    following = asyncio.create_task(watcher.run())
    await until(watcher.ready.is_set, 30, what="the catalog's first update")
    following.cancel()
    await asyncio.gather(following, return_exceptions=True)
    assert _edge_lines(caplog, logging.WARNING) == ["catalog unreachable: watch failed (UNAVAILABLE)"]
    recoveries = [line for line in _edge_lines(caplog, logging.INFO) if "reachable again" in line]
    assert len(recoveries) == 1 and recoveries[0].endswith(": 20 watch retries"), recoveries


# -- the batch queue ------------------------------------------------------------------------------------------
class DownQueue:
    """A job queue whose store does not answer for the first ``failures`` claims; then it counts a job queued
    that every claim finds taken (so idle workers keep claiming)."""

    def __init__(self, failures: int) -> None:
        self.failures, self.claims = failures, 0

    async def depth(self) -> jobqueue.QueueDepth:
        if self.claims < self.failures:
            raise ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused.")
        return jobqueue.QueueDepth(queued=1)

    async def claim(self, worker: str, lease_seconds: float):
        self.claims += 1
        if self.claims <= self.failures:
            raise ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused.")
        return None


def _batch_worker(queue: DownQueue, ready: asyncio.Event) -> tuple[str, Any]:
    settings = EdgeSettings(batches_poll_seconds=0.001)
    state = SimpleNamespace(settings=settings, batches=queue, objects=None, catalog=SimpleNamespace(ready=ready))
    return "batch queue", BatchWorker(state)


def _background_worker(queue: DownQueue, ready: asyncio.Event) -> tuple[str, Any]:
    settings = EdgeSettings(responses_background_poll_seconds=0.001)
    state = SimpleNamespace(settings=settings, background=queue, catalog=SimpleNamespace(ready=ready))
    return "background queue", BackgroundWorker(state, RESPONSES)


@pytest.mark.parametrize("make_worker", [_batch_worker, _background_worker])
async def test_a_job_queue_that_is_down_is_one_warning_not_one_per_poll(caplog, make_worker):
    caplog.set_level(logging.INFO)
    queue = DownQueue(failures=40)
    ready = asyncio.Event()
    ready.set()
    name, worker = make_worker(queue, ready)
    workers = [asyncio.create_task(worker._work(f"w-{i}")) for i in range(4)]
    await until(lambda: queue.claims > 60, 30, what="claims after the queue came back")
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    warnings = [r for r in caplog.records if r.name.startswith("modelplex_edge") and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [f"{name} unavailable: claim failed (ConnectionError)"]
    assert warnings[0].exc_info is not None  # the traceback, once
    infos = [line for line in _edge_lines(caplog, logging.INFO) if "queue" in line]
    assert len(infos) == 1 and re.fullmatch(rf"{name} available again after \d+ s: 40 claims failed", infos[0])
