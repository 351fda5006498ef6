"""Accounts reach Redis in batches, one script call each, and metering stays exact (Issue 17).

The sidecar gets many accounts per stream message; the embedded gatekeeper collects those of one
turn of the event loop. Either way Redis sees one EVALSHA for the batch, and every usage record,
slot and token is accounted as it was one at a time.
"""

from __future__ import annotations

import pytest
import redis

from modelplex.v1 import common_pb2
from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex_gatekeeper.embedded import EmbeddedGatekeeper
from modelplex_gatekeeper.gate import Gate
from modelplex_gatekeeper.keys import KeyRecord, KeyRing, KeysFile
from modelplex_gatekeeper.redis_store import FailoverStore, RedisStore
from modelplex_gatekeeper.servicer import GatekeeperServicer
from modelplex_gatekeeper.settings import GatekeeperSettings
from modelplex_gatekeeper.store import MemoryStore, UsageLog
from tests.support.redis_server import RedisServer

KEY = "sk-batched-accounting-0123456789"
COUNT = 30


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def keys_file(tmp_path, name: str):
    keys = KeysFile()
    keys.add(KEY, KeyRecord(name=name, hash="", project="p", rpm=100_000, tpm=10_000_000, max_concurrent=64))
    keys.save(tmp_path / "keys.yaml")
    return tmp_path / "keys.yaml"


def load_scripts(url: str) -> None:
    """Redis learns the scripts once (a first EVALSHA is refused, then loaded): not part of a batch's cost."""
    from modelplex_gatekeeper.redis_store import ACCOUNT_MANY

    redis.Redis.from_url(url).script_load(ACCOUNT_MANY)


def evalsha_calls(client: redis.Redis) -> int:
    return client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def accounts(tickets: list[str]) -> list[pb.AccountRequest]:
    return [
        pb.AccountRequest(
            ticket=ticket,
            model="m",
            endpoint="chat.completions",
            usage=common_pb2.Usage(prompt_tokens=i, completion_tokens=10, total_tokens=i + 10),
            meta=common_pb2.RequestMeta(request_id=f"req-{i}"),
        )
        for i, ticket in enumerate(tickets)
    ]


def assert_metered_exactly(client: redis.Redis, stream: str, name: str) -> None:
    entries = client.xrange(stream)
    assert [e[1][b"request_id"].decode() for e in entries] == [f"req-{i}" for i in range(COUNT)]
    total = sum(i + 10 for i in range(COUNT))
    assert sum(int(e[1][b"total_tokens"]) for e in entries) == total
    assert sum(int(v) for v in client.hgetall(f"mpx:{{{name}}}:daily").values()) == total
    assert client.zcard(f"mpx:{{{name}}}:slots") == 0  # every request's slot freed


class _Context:
    async def write(self, message) -> None:
        pass


async def _one(batch: pb.GateBatch):
    yield batch


async def test_a_stream_batch_of_accounts_is_one_redis_round_trip(redis_server, tmp_path):
    client = redis.Redis.from_url(redis_server.url)
    stream = f"usage-{tmp_path.name}"
    remote = RedisStore(redis_server.url, 60, stream, 1.0)
    store = FailoverStore(remote, MemoryStore(60, UsageLog(tmp_path / "usage.jsonl")), "open", 1.0)
    gate = Gate(KeyRing(keys_file(tmp_path, "stream-batch")), store)
    tickets = []
    for _ in range(COUNT):
        admitted = await gate.admit(pb.AdmitRequest(api_key=KEY, model="m", endpoint="chat.completions",
                                                    estimated_tokens=50))
        tickets.append(admitted.ticket)
    assert client.zcard("mpx:{stream-batch}:slots") == COUNT
    load_scripts(redis_server.url)
    before = evalsha_calls(client)
    await GatekeeperServicer(gate).Gate(_one(pb.GateBatch(accounts=accounts(tickets))), _Context())
    assert evalsha_calls(client) - before == 1
    assert_metered_exactly(client, stream, "stream-batch")
    await store.close()


async def test_the_embedded_gatekeeper_accounts_one_event_loop_turn_in_one_call(redis_server, tmp_path,
                                                                                monkeypatch):
    client = redis.Redis.from_url(redis_server.url)
    stream = f"usage-{tmp_path.name}"
    monkeypatch.setenv("MODELPLEX_KEYS_FILE", str(keys_file(tmp_path, "embedded-batch")))
    monkeypatch.setenv("MODELPLEX_GATEKEEPER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("MODELPLEX_GATEKEEPER_USAGE_STREAM", stream)
    monkeypatch.setenv("MODELPLEX_GATEKEEPER_USAGE_FILE", str(tmp_path / "usage.jsonl"))
    embedded = EmbeddedGatekeeper(GatekeeperSettings())
    tickets = []
    for _ in range(COUNT):
        admitted = await embedded.admit(pb.AdmitRequest(api_key=KEY, model="m", endpoint="chat.completions"))
        tickets.append(admitted.ticket)
    load_scripts(redis_server.url)
    before = evalsha_calls(client)
    for account in accounts(tickets):  # one turn: nothing here yields to the loop
        await embedded.account(account)
    await embedded.close()  # a clean stop delivers what is queued
    assert evalsha_calls(client) - before == 1
    assert_metered_exactly(client, stream, "embedded-batch")
