"""Quota leases between the edge's client and a real gatekeeper (its servicer over real gRPC).

The gatekeeper runs in this process (so the test can count what reaches it) or, where it must
die mid-load, as its own process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from modelplex.v1 import common_pb2
from modelplex.v1 import gatekeeper_pb2_grpc as pb_grpc
from modelplex_edge.admission import Ask, Consumption
from modelplex_edge.gatekeeper_client import GatekeeperAdmission
from modelplex_edge.leases import LeaseBook
from modelplex_gatekeeper.gate import Gate
from modelplex_gatekeeper.keys import KeyRecord, KeyRing, KeysFile, new_key
from modelplex_gatekeeper.servicer import GatekeeperServicer
from modelplex_gatekeeper.store import MemoryStore, UsageLog
from modelplex_kit.errors import ServiceError
from tests.support.ports import free_port


async def until(predicate, timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(every)
    return predicate()


def write_keys(path: Path, **keys: dict) -> dict[str, str]:
    """name -> limits; returns name -> secret."""
    keys_file = KeysFile()
    secrets = {}
    for name, limits in keys.items():
        secrets[name] = new_key()
        keys_file.add(secrets[name], KeyRecord(name=name, hash="", **limits))
    keys_file.save(path)
    return secrets


class CountingGate(Gate):
    """The real Gate, counting the decisions that reached the sidecar."""

    admits = 0

    async def admit(self, request):
        self.admits += 1
        return await super().admit(request)


class Sidecar:
    def __init__(self, tmp: Path, lease_seconds: float = 1.0, **keys: dict) -> None:
        self.keys_path = tmp / "keys.yaml"
        self.usage_path = tmp / "usage.jsonl"
        self.secrets = write_keys(self.keys_path, **keys)
        self.ring = KeyRing(self.keys_path)
        self.store = MemoryStore(900, UsageLog(self.usage_path))
        self.gate = CountingGate(self.ring, self.store, lease_seconds=lease_seconds)
        self.target = f"127.0.0.1:{free_port()}"

    async def start(self) -> Sidecar:
        self.server = grpc.aio.server()
        pb_grpc.add_GatekeeperServiceServicer_to_server(GatekeeperServicer(self.gate), self.server)
        self.server.add_insecure_port(self.target)
        await self.server.start()
        self.following = asyncio.create_task(self.ring.follow(0.1))
        return self

    async def stop(self) -> None:
        self.following.cancel()
        await self.server.stop(None)
        await self.store.close()

    def usage(self) -> list[dict]:
        return [json.loads(line) for line in self.usage_path.read_text().splitlines()]


def ask(secret: str, cost: int = 10) -> Ask:
    return Ask((f"Bearer {secret}",), "chat.completions", "m", cost)


def used(tokens: int = 7) -> Consumption:
    return Consumption(usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=tokens - 3, total_tokens=tokens))


async def one_request(admission: GatekeeperAdmission, secret: str) -> None:
    admitted = await admission.admit(ask(secret))
    await admission.account(admitted, used(), False)


async def test_a_key_well_under_its_limits_rarely_waits_on_the_sidecar_and_every_use_is_metered(tmp_path):
    sidecar = await Sidecar(tmp_path, dev={"rpm": 100_000, "tpm": 10_000_000, "max_concurrent": 100}).start()
    admission = GatekeeperAdmission(sidecar.target)
    for _ in range(200):
        await one_request(admission, sidecar.secrets["dev"])
    # Most requests were decided in this process, from leases renewed ahead of need.
    assert sidecar.gate.admits < 40, sidecar.gate.admits
    await admission.close()  # a clean stop: the last batch of accounts goes out
    assert await until(lambda: len(sidecar.usage()) == 200), len(sidecar.usage())
    assert all(r["key"] == "dev" and r["total_tokens"] == 7 for r in sidecar.usage())
    await sidecar.stop()


async def test_without_leases_every_request_is_a_decision_of_the_sidecar(tmp_path):
    """The control for the test above: its figure comes from the leases."""
    sidecar = await Sidecar(tmp_path, dev={"rpm": 100_000}).start()
    admission = GatekeeperAdmission(sidecar.target, leases=False)
    for _ in range(50):
        await one_request(admission, sidecar.secrets["dev"])
    assert sidecar.gate.admits == 50
    await admission.close()
    await sidecar.stop()


async def test_leases_admit_the_limit_then_refuse(tmp_path):
    sidecar = await Sidecar(tmp_path, tight={"rpm": 600, "tpm": 1_000_000}).start()
    admission = GatekeeperAdmission(sidecar.target)
    statuses = []
    start = time.monotonic()
    for _ in range(800):
        try:
            await one_request(admission, sidecar.secrets["tight"])
            statuses.append(200)
        except ServiceError as exc:
            statuses.append(exc.http.status)
    elapsed = time.monotonic() - start
    admitted = statuses.count(200)
    # GCRA gives back 10 requests a second while this runs, and a leased request may be admitted up
    # to one lease period (1 s) after its unit was reserved: the limit, plus those, and no more.
    assert 600 <= admitted <= 600 + math.ceil(10 * elapsed) + 10, (admitted, elapsed)
    assert statuses[:600] == [200] * 600 and set(statuses) == {200, 429}
    assert sidecar.gate.admits < 400, "most were admitted from leases"
    await admission.close()
    await sidecar.stop()


async def test_leased_tokens_are_reconciled_with_real_usage(tmp_path):
    sidecar = await Sidecar(tmp_path, tok={"tpm": 100_000}).start()
    admission = GatekeeperAdmission(sidecar.target)
    for _ in range(30):
        await one_request(admission, sidecar.secrets["tok"])  # reserves 10, uses 7
    await admission.close()  # returns the leases' unused tokens
    key = sidecar.ring.named("tok")
    assert await until(lambda: len(sidecar.usage()) == 30)
    await asyncio.sleep(0.1)
    state = await sidecar.store.peek(key)
    # 30 x 7 tokens used; GCRA may have given a few back meanwhile, never taken more.
    assert 100_000 - 30 * 7 <= state.remaining_tokens <= 100_000, state.remaining_tokens
    await sidecar.stop()


DYING_EDGE = """
import asyncio, sys
from modelplex_edge.admission import Ask
from modelplex_edge.gatekeeper_client import GatekeeperAdmission

async def main():
    admission = GatekeeperAdmission(sys.argv[1])
    ask = Ask(("Bearer " + sys.argv[2],), "chat.completions", "m", 10)
    held = [await admission.admit(ask) for _ in range(3)]  # in flight, never accounted
    print("leased" if any(a.lease is not None for a in held) else "not leased", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_slots_never_leak_when_an_edge_dies_holding_a_lease(tmp_path):
    sidecar = await Sidecar(tmp_path, conc={"max_concurrent": 40}).start()
    # An edge process admits requests (one of them from a lease holding slots), then is killed.
    dying = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DYING_EDGE, sidecar.target, sidecar.secrets["conc"], stdout=asyncio.subprocess.PIPE
    )
    line = await asyncio.wait_for(dying.stdout.readline(), 60)
    assert line.strip() == b"leased", line
    dying.send_signal(signal.SIGKILL)
    await dying.wait()
    other = GatekeeperAdmission(sidecar.target, leases=False)
    secret = sidecar.secrets["conc"]

    async def all_forty_fit() -> bool:
        admitted = []
        try:
            for _ in range(40):
                admitted.append(await other.admit(ask(secret)))
            return True
        except ServiceError:
            return False
        finally:
            for a in admitted:
                await other.account(a, used(), False)

    deadline = time.monotonic() + 10
    while not await all_forty_fit():
        assert time.monotonic() < deadline, "the dead edge's slots were not released"
        await asyncio.sleep(0.1)
    await other.close()
    await sidecar.stop()


async def test_revocation_ends_a_held_lease_within_two_seconds(tmp_path):
    sidecar = await Sidecar(tmp_path, lease_seconds=30, dev={"rpm": 100_000}).start()
    admission = GatekeeperAdmission(sidecar.target)
    secret = sidecar.secrets["dev"]
    for _ in range(20):
        await one_request(admission, secret)
    assert (await admission.admit(ask(secret))).lease is not None  # held, and valid for 30 s
    keys_file = KeysFile.load(sidecar.keys_path)
    keys_file.keys = [dataclasses.replace(k, enabled=k.name != "dev" and k.enabled) for k in keys_file.keys]
    keys_file.save(sidecar.keys_path)
    revoked_at = time.monotonic()
    while True:
        try:
            await one_request(admission, secret)
        except ServiceError as exc:
            assert exc.http.status == 401
            break
        assert time.monotonic() - revoked_at < 2.0, "still admitted 2 s after the revocation"
        await asyncio.sleep(0.25)  # slowly: the held lease would last longer than 2 s at this rate
    await admission.close()
    await sidecar.stop()


async def test_made_up_keys_are_forgotten_so_the_book_stays_bounded():
    async def renew(key, request):  # pragma: no cover - never asked: no key here holds a lease
        raise AssertionError

    book = LeaseBook(renew, lambda returned: None, fail_open=False)
    for i in range(2000):
        assert book.draw(f"sk-made-up-{i}", "m", "chat.completions", 1) is None
    assert len(book) == 2000
    assert await until(lambda: len(book) == 0, timeout=15), len(book)
    book.close()


def start_sidecar_process(tmp: Path, keys_path: Path) -> tuple[subprocess.Popen, str]:
    target = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "MODELPLEX_KEYS_FILE": str(keys_path),
        "MODELPLEX_GATEKEEPER_LISTEN": target,
        "MODELPLEX_GATEKEEPER_USAGE_FILE": str(tmp / "usage.jsonl"),
        "MODELPLEX_GATEKEEPER_LEASE_SECONDS": "0.5",
        "MODELPLEX_GATEKEEPER_METRICS_PORT": "0",
    }
    proc = subprocess.Popen([sys.executable, "-m", "modelplex_gatekeeper"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, target


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_a_sidecar_killed_mid_load_is_the_configured_policy_within_one_lease_period(tmp_path, policy):
    secrets = write_keys(tmp_path / "keys.yaml", dev={"rpm": 100_000, "max_concurrent": 100})
    proc, target = start_sidecar_process(tmp_path, tmp_path / "keys.yaml")
    admission = GatekeeperAdmission(target, timeout_seconds=0.5, fail_open=policy == "open")
    secret = secrets["dev"]
    outcomes: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                await one_request(admission, secret)
                outcomes.append((time.monotonic(), 200))
            except ServiceError as exc:
                outcomes.append((time.monotonic(), exc.http.status))
                assert exc.http.status != 503 or int(exc.headers["retry-after"]) >= 1
            await asyncio.sleep(0.005)

    try:
        deadline = time.monotonic() + 30
        while True:  # the sidecar starts serving
            try:
                await one_request(admission, secret)
                break
            except ServiceError:
                assert time.monotonic() < deadline, "the gatekeeper did not start"
                await asyncio.sleep(0.1)
        loads = [asyncio.create_task(load()) for _ in range(4)]
        assert await until(lambda: len(outcomes) > 50)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*loads)
    finally:
        proc.kill()
        await admission.close()

    before = [status for at, status in outcomes if at < killed]
    settled = [status for at, status in outcomes if at > killed + 0.5 + 0.5]  # one lease period, and slack
    assert set(before) == {200}
    assert settled, "requests kept being answered after the kill"
    if policy == "open":
        assert set(settled) == {200}, set(settled)
    else:
        assert set(settled) == {503}, set(settled)
