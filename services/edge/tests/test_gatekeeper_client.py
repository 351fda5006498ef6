"""OpenAI's rate-limit header formats, the stream client's failure path, and its stream across age-outs."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex.v1 import gatekeeper_pb2_grpc
from modelplex_edge.admission import Admitted, Ask, Consumption
from modelplex_edge.gatekeeper_client import GatekeeperAdmission, denial_error, duration, rate_headers
from modelplex_gatekeeper.gate import Gate
from modelplex_gatekeeper.keys import KeyRecord, KeyRing, KeysFile
from modelplex_gatekeeper.servicer import GatekeeperServicer
from modelplex_gatekeeper.store import MemoryStore, UsageLog
from modelplex_kit import grpc_server
from modelplex_kit.errors import ServiceError
from modelplex_kit.settings import GrpcServiceSettings
from tests.support.ports import free_port
from tests.support.until import until


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (120, "120ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (59_999, "59.999s"),
        (360_000, "6m0s"),
        (61_500, "1m1.5s"),
        (3_723_000, "1h2m3s"),
    ],
)
def test_durations_in_openai_format(ms, text):
    assert duration(ms) == text


def test_a_429_carries_retry_after_and_every_header():
    reply = pb.AdmitReply(
        limits_requests=True,
        limits_tokens=True,
        rate_limit=pb.RateLimitState(
            limit_requests=3,
            remaining_requests=0,
            reset_requests_ms=59_100,
            limit_tokens=100,
            remaining_tokens=40,
            reset_tokens_ms=250,
        ),
        denial=pb.Denial(
            status=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
            code="rate_limit_exceeded",
            type="requests",
            message="Rate limit reached",
            retry_after_ms=19_700,
        ),
    )
    error = denial_error(reply, Ask(("Bearer k",), "chat.completions", "m"), "k")
    assert error.http.status == 429 and error.envelope()["error"]["type"] == "requests"
    assert error.headers["retry-after"] == "20" and error.headers["retry-after-ms"] == "19700"
    assert error.headers["x-ratelimit-reset-requests"] == "59.1s"
    assert error.headers["x-ratelimit-reset-tokens"] == "250ms"
    assert rate_headers(pb.AdmitReply()) == {}  # a key without limits claims none


async def test_an_unreachable_sidecar_is_a_503_with_retry_after():
    admission = GatekeeperAdmission(f"127.0.0.1:{free_port()}", timeout_seconds=0.5)
    with pytest.raises(ServiceError) as caught:
        await admission.admit(Ask(("Bearer sk-some-key-0123456789",), "chat.completions", "m"))
    await admission.close()
    assert caught.value.http.status == 503 and int(caught.value.headers["retry-after"]) >= 1
    assert "sk-some-key" not in caught.value.message


# -- the stream across age-outs: slots of requests still running are kept ---------------------------
@pytest.fixture
async def ageing_sidecar(tmp_path):
    """The gatekeeper service, whose connections are aged out every second (0.5 s of grace), with a key
    allowing one request at a time: (its target, its usage file)."""
    keys_file = KeysFile()
    keys_file.add(ONE_AT_A_TIME, KeyRecord(name="one", hash="", max_concurrent=1))
    keys_file.save(tmp_path / "keys.yaml")
    usage = tmp_path / "usage.jsonl"
    gate = Gate(KeyRing(tmp_path / "keys.yaml"), MemoryStore(900, UsageLog(usage)))
    servicer = GatekeeperServicer(gate, resume_window_seconds=1.0)
    settings = GrpcServiceSettings(
        listen=f"127.0.0.1:{free_port()}",
        max_connection_age_seconds=1.0,
        max_connection_age_grace_seconds=0.5,
        grace_seconds=0.5,
    )

    def register(server):
        gatekeeper_pb2_grpc.add_GatekeeperServiceServicer_to_server(servicer, server)
        return ["modelplex.v1.GatekeeperService"]

    task = asyncio.create_task(grpc_server.serve("gatekeeper", settings, register))
    yield settings.listen, usage
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def ageing_gatekeeper(ageing_sidecar):
    """An admission over ``ageing_sidecar``: (it, the usage file)."""
    target, usage = ageing_sidecar
    admission = GatekeeperAdmission(target, timeout_seconds=5)
    yield admission, usage
    await admission.close()


ONE_AT_A_TIME = "sk-one-at-a-time-0123456789"


async def _admit(admission: GatekeeperAdmission) -> Admitted:
    return await admission.admit(Ask((f"Bearer {ONE_AT_A_TIME}",), "chat.completions", "m", 10))


async def test_a_request_keeps_its_slot_while_the_gatekeeper_stream_is_aged_out_and_reopened(ageing_gatekeeper):
    admission, usage = ageing_gatekeeper
    first = await until_admitted(admission, 30)  # the server may still be starting
    transport = admission._transport
    streams = []

    def stream_replaced_three_times() -> bool:
        if transport._call is not None and (not streams or streams[-1] is not transport._call):
            streams.append(transport._call)
        return len(streams) >= 4

    # The stream is cut by every age-out (1 s + 0.5 s of grace); each time the edge re-opens it at
    # once, naming the request still running, and the gatekeeper's 1 s window to resume passes.
    await until(stream_replaced_three_times, 30, interval=0.02)
    with pytest.raises(ServiceError) as refused:
        await _admit(admission)
    assert refused.value.http.status == 429 and "concurrent" in refused.value.message
    # The first request ends: its slot is freed once, and its usage recorded once.
    await admission.account(first, Consumption(), failed=False)
    second = await until_admitted(admission)
    await admission.account(second, Consumption(), failed=False)
    await until(lambda: usage.exists() and len(usage.read_text().splitlines()) == 2, 10)


async def until_admitted(admission: GatekeeperAdmission, timeout: float = 10) -> Admitted:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await _admit(admission)
        except ServiceError:
            assert time.monotonic() < deadline, "never admitted"
            await asyncio.sleep(0.05)


async def test_accounts_finishing_within_the_delay_share_one_stream_message(ageing_gatekeeper, monkeypatch):
    """Sequential requests (c=1) each used to cost the edge a stream write of its own after the response.
    The test ends the delay itself, not the clock: with the real 5 ms, a loaded machine's event loop
    stalled past it between two of the requests (fresh-clone run 11 wrote 2 + 1)."""
    from modelplex_edge import gatekeeper_client

    monkeypatch.setattr(gatekeeper_client, "ACCOUNT_DELAY_SECONDS", 3600.0)
    admission, usage = ageing_gatekeeper
    first = await until_admitted(admission, 30)
    transport = admission._transport
    stream = transport._stream()
    write, writes = stream.write, []

    async def counted(batch):
        writes.append((len(batch.admits), len(batch.accounts)))
        await write(batch)

    stream.write = counted
    await admission.account(first, Consumption(), failed=False)
    for i in range(2):  # two more requests end apart (later turns of the loop), within the delay
        await asyncio.sleep(0)
        ended = Admitted("one", endpoint="chat.completions", model="m", ticket=f"batch|0|one-{i}")
        await admission.account(ended, Consumption(), failed=False)
    assert writes == []  # nothing written before the delay ends
    timer = transport._flush
    assert isinstance(timer, asyncio.TimerHandle)  # one timer for the three, set by the first
    timer.cancel()
    transport._flush_now()  # the delay ends
    await until(lambda: usage.exists() and len(usage.read_text().splitlines()) == 3, 10)
    assert writes == [(0, 3)]


async def test_a_request_handed_to_the_jobs_process_keeps_its_slot_on_the_jobs_stream(ageing_sidecar):
    """A background response is admitted by the edge and accounted by the jobs process: the edge stops naming
    its ticket when its stream is re-opened (before, it would have resumed it forever), the jobs process names
    it on its own stream from when it takes the request over, so the slot is held across both processes'
    age-outs until the jobs process accounts it."""
    target, usage = ageing_sidecar
    edge = GatekeeperAdmission(target, timeout_seconds=5, leases=False)
    jobs = GatekeeperAdmission(target, timeout_seconds=5, leases=False)
    try:
        admitted = await until_admitted(edge, 30)
        edge.hand_off(admitted)
        assert admitted.ticket not in edge._transport._running
        jobs.take_over(admitted)
        streams = []

        def jobs_stream_replaced_twice() -> bool:
            call = jobs._transport._call
            if call is not None and (not streams or streams[-1] is not call):
                streams.append(call)
            return len(streams) >= 3

        await until(jobs_stream_replaced_twice, 30, interval=0.02)  # each age-out passes the 1 s window
        with pytest.raises(ServiceError) as refused:
            await _admit(edge)
        assert refused.value.http.status == 429 and "concurrent" in refused.value.message
        assert admitted.ticket not in edge._transport._running
        await jobs.account(admitted, Consumption(), failed=False)
        second = await until_admitted(edge)
        await edge.account(second, Consumption(), failed=False)
        await until(lambda: usage.exists() and len(usage.read_text().splitlines()) == 2, 10)
    finally:
        await jobs.close()
        await edge.close()
