"""The jobs process (modelplex_edge.jobs): batches and background responses run beside the edge, never in it.

The edge only queues, reads and cancels; ``python -m modelplex_edge.jobs`` claims the work off the same stores
(SQLite here) and survives being killed; both report demand for it to the scaler (key ``jobs``); and with an
embedded gatekeeper both meter to one usage file, whose lines never interleave.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from modelplex.v1 import demand_pb2, demand_pb2_grpc
from modelplex_edge.jobs.demand import JOBS_KEY
from modelplex_edge.jobs.runner import JobsRunner
from modelplex_edge.jobs.settings import JobsSettings
from modelplex_kit import jobqueue
from modelplex_kit.children import tied_to_parent
from tests.support.ports import free_port
from tests.support.scripted_text import edge_on, scripted_backend, scripted_edge
from tests.support.until import until

KEY = "sk-jobs-test"
TERMINAL = {"completed", "incomplete", "failed", "cancelled"}


def _client(edge) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=edge.base_url, api_key=KEY, max_retries=0)


async def _batch(client: openai.AsyncOpenAI, *prompts: str) -> str:
    rows = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "scripted", "messages": [{"role": "user", "content": prompt}]},
        }
        for i, prompt in enumerate(prompts)
    ]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    uploaded = await client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    created = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return created.id


async def _status(client: openai.AsyncOpenAI, response_id: str) -> str:
    return (await client.responses.retrieve(response_id)).status


async def _finished(client: openai.AsyncOpenAI, response_id: str, timeout: float = 30) -> str:
    async def done():
        status = await _status(client, response_id)
        return status if status in TERMINAL else None

    return await until(done, timeout, what=f"{response_id} finished")


async def _batch_done(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 30):
    async def done():
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "cancelled", "expired") else None

    return await until(done, timeout, what=f"{batch_id} finished")


def _worker_tasks() -> list[str]:
    names = (task.get_coro().__qualname__ for task in asyncio.all_tasks())
    return [name for name in names if name.split(".")[0] in ("BatchWorker", "BackgroundWorker", "JobsDemand")]


async def test_the_edge_runs_no_worker_and_only_queues():
    async with scripted_edge(dev_api_key=KEY, jobs=False) as edge:
        client = _client(edge)
        created = await client.responses.create(model="scripted", input="nobody runs me", background=True)
        batch_id = await _batch(client, "nor me")
        assert _worker_tasks() == []  # no worker loop (nor demand sampling: no target) in the edge
        await asyncio.sleep(1.0)  # four idle polls of a worker, had one been started
        assert await _status(client, created.id) == "queued"
        assert (await client.batches.retrieve(batch_id)).status == "validating"
        assert edge.engine.requests == []
        assert not hasattr(edge.state, "worker") and not hasattr(edge.state, "batch_worker")

        runner = JobsRunner(edge.state).start()  # the jobs process's workers, over the same (memory) stores
        try:
            assert sorted(name.split(".")[0] for name in _worker_tasks()) == [
                *["BackgroundWorker"] * edge.settings.responses_background_workers,
                *["BatchWorker"] * (edge.settings.batches_workers + 1),  # + the file-expiry sweep
                "JobsDemand",  # its queues' depth, for /metrics
            ]
            assert await _finished(client, created.id) == "completed"
            assert (await _batch_done(client, batch_id)).status == "completed"
        finally:
            await runner.stop()
        assert _worker_tasks() == []


async def test_a_queued_background_response_starts_within_about_half_a_second():
    """The jobs process finds work by polling its queue (no wake-up from the edge): the default poll is short."""
    async with scripted_edge(dev_api_key=KEY) as edge:
        client = _client(edge)
        await asyncio.sleep(0.5)  # every worker idle, waiting on the queue
        for _ in range(3):
            before = len(edge.engine.requests)
            started = asyncio.get_running_loop().time()
            await client.responses.create(model="scripted", input="quick", background=True)
            await until(lambda n=before: len(edge.engine.requests) > n, 5)
            assert asyncio.get_running_loop().time() - started < 0.6  # the poll is 0.25 s


def _jobs_env(edge_settings, tmp_path: Path, port: int) -> dict[str, str]:
    shared = {
        "dev_api_key": KEY,
        "catalog_target": edge_settings.catalog_target,
        "responses_store": "sqlite",
        "responses_sqlite_path": edge_settings.responses_sqlite_path,
        "batches_store": "sqlite",
        "batches_sqlite_path": edge_settings.batches_sqlite_path,
        "object_dir": edge_settings.object_dir,
        "responses_background_lease_seconds": "2",
    }
    env = {**os.environ, **{f"MODELPLEX_EDGE_{name.upper()}": str(value) for name, value in shared.items()}}
    return env | {"MODELPLEX_JOBS_PORT": str(port), "MODELPLEX_LOG_FORMAT": "text"}


def _start_jobs(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "modelplex_edge.jobs"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            **tied_to_parent(),
        )


async def _ready(port: int, process: subprocess.Popen) -> None:
    async def answers():
        assert process.poll() is None, "the jobs process exited"
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    await until(answers, 60, what="the jobs process ready")


async def test_the_jobs_process_runs_the_edges_queues_and_a_killed_one_is_resumed(tmp_path):
    """`python -m modelplex_edge.jobs` on the edge's SQLite stores completes a background response and a batch;
    killed mid-response, the next one (re-queueing what was running, which the edge, open all along, left
    alone) re-runs it to completion."""
    settings = {
        "dev_api_key": KEY,
        "responses_store": "sqlite",
        "responses_sqlite_path": str(tmp_path / "responses.sqlite3"),
        "batches_store": "sqlite",
        "batches_sqlite_path": str(tmp_path / "batches.sqlite3"),
        "object_dir": str(tmp_path / "objects"),
    }
    port, log = free_port(), tmp_path / "jobs.log"
    async with scripted_backend() as backend, edge_on(backend, jobs=False, **settings) as edge:
        client = _client(edge)
        queued = await client.responses.create(model="scripted", input="run me elsewhere", background=True)
        batch_id = await _batch(client, "one", "two")
        env = _jobs_env(edge.settings, tmp_path, port)
        first = _start_jobs(env, log)
        try:
            await _ready(port, first)
            assert await _finished(client, queued.id) == "completed", log.read_text()
            batch = await _batch_done(client, batch_id)
            assert batch.status == "completed" and batch.request_counts.completed == 2, log.read_text()
            assert (await client.responses.retrieve(queued.id)).output_text == "echo: run me elsewhere"
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert 'modelplex_job_queue_depth{queue="background",state="queued"}' in metrics

            slow = await client.responses.create(model="scripted", input="SLOW " + "word " * 30, background=True)
            await until(lambda: _in_progress(client, slow.id), 30, what="the slow response running")
            first.send_signal(signal.SIGKILL)  # no goodbye: its claim is simply never renewed
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        await asyncio.sleep(1.0)
        assert await _status(client, slow.id) == "in_progress"  # the edge did not take it back
        calls = len(backend.engine.requests)
        second = _start_jobs(env, log)
        try:
            await _ready(port, second)
            assert await _finished(client, slow.id) == "completed", log.read_text()
            assert len(backend.engine.requests) == calls + 1  # re-run from the start, once
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
    assert "jobs runner started" in log.read_text()


async def _in_progress(client: openai.AsyncOpenAI, response_id: str) -> bool:
    return await _status(client, response_id) == "in_progress"


# -- demand reports (key "jobs") ---------------------------------------------------------------------------
class Scaler(demand_pb2_grpc.DemandServiceServicer):
    """Keeps every report, with the event loop's time it arrived."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, demand_pb2.DemandReport]] = []

    async def Report(self, request, context):
        self.reports.append((asyncio.get_running_loop().time(), request))
        return demand_pb2.DemandReportResponse()

    def after(self, since: float) -> list[demand_pb2.DemandReport]:
        return [report for at, report in self.reports if at >= since and report.key == JOBS_KEY]


@pytest.fixture
async def scaler():
    server, servicer = grpc.aio.server(), Scaler()
    demand_pb2_grpc.add_DemandServiceServicer_to_server(servicer, server)
    target = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(target)
    await server.start()
    servicer.target = target  # type: ignore[attr-defined]
    yield servicer
    await server.stop(None)


async def test_the_edge_reports_queued_work_at_once_and_the_jobs_runner_what_it_runs(scaler):
    async with scripted_edge(dev_api_key=KEY, jobs=False, demand_target=scaler.target) as edge:
        client = _client(edge)
        await asyncio.sleep(0.3)
        sent = asyncio.get_running_loop().time()
        created = await client.responses.create(model="scripted", input="SLOW " + "word " * 10, background=True)
        # Poked at the enqueue: reported well before the reporter's 2 s interval.
        await until(lambda: any(r.queued >= 1 for r in scaler.after(sent)), 1.0, what="the edge's poke")

        jobs = JobsSettings(demand_target=scaler.target, demand_interval_seconds=0.1)
        runner = JobsRunner(edge.state, jobs).start()
        try:
            await until(lambda: any(r.in_flight == 1 for r in scaler.after(sent)), 10, what="in flight reported")
            assert await _finished(client, created.id) == "completed"
            done = asyncio.get_running_loop().time()
            await until(
                lambda: any(r.in_flight == 0 and r.queued == 0 for r in scaler.after(done)), 5, what="idle reported"
            )
        finally:
            await runner.stop()
        mine = runner.demand._reporter._reporter
        reporters = {report.reporter for _, report in scaler.reports}
        assert len(reporters) == 2 and mine in reporters  # the edge and the jobs runner, each its own reporter
        withdrawn = [r for _, r in scaler.reports if r.reporter == mine and r.ttl_seconds == 0]
        assert len(withdrawn) == 1  # the stopped runner withdrew its figures


async def test_no_demand_target_no_reports_and_no_sampling():
    async with scripted_edge(dev_api_key=KEY, jobs=False) as edge:
        demand = edge.state.jobs_demand
        await _client(edge).responses.create(model="scripted", input="x", background=True)
        assert not demand.reporting and demand._sampling is None and demand.queued == 0


async def test_depth_counts_over_both_queues_for_the_jobs_runner():
    async with scripted_edge(dev_api_key=KEY, jobs=False) as edge:
        client = _client(edge)
        await client.responses.create(model="scripted", input="a", background=True)
        await _batch(client, "b")
        runner = JobsRunner(edge.state, background=False, batches=False)
        await runner.demand.sample()
        assert runner.demand.read().queued == 2 and runner.demand.read().in_flight == 0
        assert await edge.state.background.depth() == jobqueue.QueueDepth(queued=1, running=0)


# -- the embedded gatekeeper in two processes ---------------------------------------------------------------
_APPENDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from modelplex_gatekeeper.store import UsageLog

    log = UsageLog(Path(sys.argv[1]))
    for i in range(int(sys.argv[3])):
        log.write({"writer": sys.argv[2], "i": i, "padding": "x" * (i % 3000)})
    """
)


def test_two_processes_metering_to_one_usage_file_never_interleave_lines(tmp_path):
    """With `embedded`, the edge and the jobs process each embed the gatekeeper and append to one usage file:
    each record is one write of an O_APPEND file, so lines from the two stay whole."""
    usage, count = tmp_path / "usage.jsonl", 4000
    writers = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(usage), name, str(count)]) for name in ("edge", "jobs")
    ]
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    rows = [json.loads(line) for line in usage.read_text().splitlines()]
    assert len(rows) == 2 * count
    for name in ("edge", "jobs"):
        assert [row["i"] for row in rows if row["writer"] == name] == list(range(count))


def test_the_jobs_process_runs_no_queue_held_in_its_own_memory(caplog):
    from modelplex_edge.jobs.server import _shared
    from modelplex_edge.settings import EdgeSettings

    assert _shared(EdgeSettings(responses_store="sqlite", batches_store="redis")) == {
        "background": True,
        "batches": True,
    }
    assert _shared(EdgeSettings()) == {"background": False, "batches": False}  # memory: the edge's own
    warned = [r.getMessage() for r in caplog.records if r.name == "modelplex_edge.jobs.server"]
    assert len(warned) == 2 and "MODELPLEX_EDGE_RESPONSES_STORE is memory" in warned[0]
