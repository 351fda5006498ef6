"""Quota leases end to end: two edges, each with its sidecar, sharing one real Redis."""

from __future__ import annotations

import asyncio
import math
import signal
import time

import httpx
import pytest
import redis

from modelplex_gatekeeper.keys import new_key
from tests.e2e.gatekeeper_stack import start_engine, start_hanging, start_stack, write_catalog, write_keys
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

LIMIT = 300  # per minute: 5 a second, enough to be leased (10 per lease at most)
KEYS = {"busy": {"key": new_key(), "rpm": LIMIT, "max_concurrent": 200}}
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
HEADERS = {"Authorization": f"Bearer {KEYS['busy']['key']}"}


@pytest.fixture(scope="module")
async def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gatekeeper-leases")
    server = RedisServer(tmp).start()
    engine, engine_port = start_engine()
    hanging, hanging_target = await start_hanging()
    keys_file = tmp / "keys.yaml"
    write_keys(keys_file, KEYS)
    catalog = write_catalog(tmp, engine_port, hanging_target)
    stacks = {}
    for name in ("a", "b"):
        env = {"MODELPLEX_GATEKEEPER_REDIS_URL": server.url,
               "MODELPLEX_GATEKEEPER_USAGE_FILE": str(tmp / f"usage-{name}.jsonl")}
        stacks[name] = await asyncio.to_thread(start_stack, catalog, keys_file, tmp / name, env)
    yield server, stacks
    for stack in stacks.values():
        await asyncio.to_thread(stack.stop)
    await hanging.stop(0)
    engine.terminate()
    engine.wait()
    server.stop()


async def test_two_edges_under_a_burst_admit_the_limit_plus_the_stated_tolerance_and_meter_all(pair):
    server, stacks = pair
    limits = httpx.Limits(max_connections=32)
    timeout = httpx.Timeout(30, pool=None)  # a loaded machine queues the burst: waiting for a connection is fine
    clients = {name: httpx.AsyncClient(base_url=s.base_url, timeout=timeout, limits=limits)
               for name, s in stacks.items()}
    start = time.monotonic()
    names = [name for _ in range(LIMIT) for name in ("a", "b")]  # twice the limit, interleaved
    responses = await asyncio.gather(
        *(clients[name].post("/chat/completions", json=CHAT, headers=HEADERS) for name in names)
    )
    elapsed = time.monotonic() - start
    for client in clients.values():
        await client.aclose()
    admitted = sum(r.status_code == 200 for r in responses)
    assert {r.status_code for r in responses} == {200, 429}
    # The README's bound: GCRA's refill while the burst runs (5 a second), plus one lease period's
    # worth (a leased unit is used at most 1 s after it was reserved). Below: units still leased to
    # the other edge when the burst ended (at most 10 per edge).
    assert LIMIT - 2 * 10 <= admitted <= LIMIT + math.ceil(5 * elapsed) + 5, (admitted, elapsed)
    by_edge = {e: sum(r.status_code == 200 for r, n in zip(responses, names, strict=True) if n == e) for e in "ab"}
    assert all(by_edge.values()), by_edge
    # Every admitted request is metered once its edge has stopped cleanly (the last batch goes out).
    for stack in stacks.values():
        edge = stack.process("edge").popen
        edge.send_signal(signal.SIGTERM)
        await asyncio.to_thread(edge.wait, 30)
    usage = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 10
    while usage.xlen("modelplex:usage") < admitted and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert usage.xlen("modelplex:usage") == admitted
