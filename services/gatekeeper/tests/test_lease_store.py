"""Leases in the store (memory and a real Redis) and their sizing: reserved at once, given back exactly."""

from __future__ import annotations

import pytest

from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex_gatekeeper.gate import lease_size
from modelplex_gatekeeper.keys import KeyRecord
from modelplex_gatekeeper.redis_store import RedisStore
from modelplex_gatekeeper.store import Allowance, Decision, MemoryStore
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store(request, tmp_path):
    if request.param == "memory":
        made = MemoryStore(60)
    else:
        made = RedisStore(request.getfixturevalue("redis_server").url, 60, f"usage-{tmp_path.name}", 1.0)
    yield made
    await made.close()


def key(name: str, **limits) -> KeyRecord:
    return KeyRecord(name=f"{name}-{id(limits)}", hash="", **limits)


async def test_a_lease_reserves_requests_and_tokens_and_gives_back_what_was_not_used(store):
    k = key("lease", rpm=100, tpm=1000)
    granted = await store.lease(k, Allowance(requests=20, tokens=300), "L1")
    assert granted.allowed and granted.remaining_requests == 80 and granted.remaining_tokens == 700
    await store.give_back(k, "L1", Allowance(requests=5, tokens=100))
    state = await store.peek(k)
    assert state.remaining_requests == 85 and state.remaining_tokens == 800


async def test_a_lease_that_does_not_fit_takes_nothing(store):
    k = key("big", rpm=10)
    assert not (await store.lease(k, Allowance(requests=11), "L1")).allowed
    assert (await store.peek(k)).remaining_requests == 10


async def test_a_leases_slots_count_against_concurrency_until_given_back(store):
    k = key("slots", max_concurrent=4)
    assert (await store.lease(k, Allowance(requests=5, slots=3), "L1")).allowed
    assert (await store.admit(k, 0, "one")).allowed
    refused = await store.admit(k, 0, "two")
    assert not refused.allowed and refused.denied_by == "concurrency" and refused.used == 4
    assert not (await store.lease(k, Allowance(requests=1, slots=1), "L2")).allowed
    # An account naming the lease (a request admitted from it) frees none of its slots.
    await store.account(k, "L1", 0, 0, {"key": k.name})
    assert not (await store.admit(k, 0, "three")).allowed
    await store.give_back(k, "L1", Allowance(slots=3))
    assert (await store.admit(k, 0, "four")).allowed


def test_a_lease_is_sized_from_the_recent_rate_and_a_quarter_of_what_is_left():
    k = KeyRecord(name="k", hash="", rpm=10_000, tpm=1_000_000, max_concurrent=100)
    state = Decision(True, remaining_requests=10_000, remaining_tokens=1_000_000)
    size = lease_size(k, pb.LeaseAsk(recent_requests=100, in_flight=10), 50, state)
    assert size == Allowance(requests=151, tokens=151 * 50, slots=16)
    # Little left of the requests: a quarter of it.
    near = Decision(True, remaining_requests=40, remaining_tokens=1_000_000)
    assert lease_size(k, pb.LeaseAsk(recent_requests=100), 50, near).requests == 10
    # Near a limit (tokens here), or with a daily budget: no lease, every request decided exactly.
    assert lease_size(k, pb.LeaseAsk(recent_requests=100), 50, Decision(True, remaining_requests=10_000,
                                                                         remaining_tokens=150)) is None
    assert lease_size(k, pb.LeaseAsk(), 0, Decision(True, remaining_requests=3)) is None
    daily = KeyRecord(name="d", hash="", daily_tokens=1000)
    assert lease_size(daily, pb.LeaseAsk(recent_requests=5), 10, Decision(True)) is None
    # A limit too small to lease (under 8 in two lease periods): every request decided exactly.
    slow = KeyRecord(name="r", hash="", rpm=200)
    assert lease_size(slow, pb.LeaseAsk(recent_requests=5), 0, Decision(True, remaining_requests=200)) is None
    assert lease_size(slow, pb.LeaseAsk(recent_requests=5), 0, Decision(True, remaining_requests=200), 3.0)
    small = KeyRecord(name="s", hash="", max_concurrent=31)
    assert lease_size(small, pb.LeaseAsk(recent_requests=5), 10, Decision(True)) is None


def test_the_store_interface_does_not_import_the_redis_store():
    """No store <-> redis_store cycle: the interface and memory store stand alone."""
    import subprocess
    import sys

    code = (
        "import sys, modelplex_gatekeeper.store, modelplex_gatekeeper.gate;"
        "assert 'modelplex_gatekeeper.redis_store' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
