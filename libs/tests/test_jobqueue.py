"""The shared job queue over a job type of its own (not videos'): SQLite here, and the same contract in a
real Redis; the columns and hash fields follow the dataclass."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from modelplex_kit import jobqueue
from modelplex_kit.errors import ServiceError


@dataclass(slots=True, kw_only=True)
class Chore(jobqueue.JobRecord):
    payload: str
    urgent: bool = False
    weight: int = 0


CHORES = jobqueue.JobKind(
    record=Chore, noun="chore", id_param="chore_id", gave_up="The chore failed repeatedly.", redis_prefix="test:chores:"
)
LIMITS = jobqueue.Limits(max_queue=2, max_queue_per_principal=2)


def test_a_record_without_the_job_fields_is_refused():
    @dataclass
    class Bare:
        id: str

    with pytest.raises(TypeError, match="principal"):
        jobqueue.JobKind(record=Bare, noun="x", id_param="x", gave_up="x", redis_prefix="x:")


async def contract(store: jobqueue.JobStore) -> None:
    await store.create(Chore(id="c1", principal="alice", payload='{"x": 1}', urgent=True, weight=7), LIMITS)
    await store.create(Chore(id="c2", principal="alice", payload="{}"), LIMITS)
    with pytest.raises(ServiceError) as full:
        await store.create(Chore(id="c3", principal="alice", payload="{}"), LIMITS)
    assert full.value.http.status == 429 and full.value.headers["retry-after"]
    assert await store.get("bob", "c1") is None  # another principal's job is invisible

    claimed = await store.claim("w1", lease_seconds=0.2)
    assert claimed == Chore(
        id="c1", principal="alice", payload='{"x": 1}', urgent=True, weight=7, status=jobqueue.IN_PROGRESS,
        created_at=claimed.created_at, attempts=1,
    )  # its own fields, typed, come back
    assert await store.renew("c1", "w1", 10, lease_seconds=0.2)
    assert not await store.renew("c1", "w2", 10, lease_seconds=0.2)  # not w2's

    # w1 dies: once its lease lapses the job is claimed again and re-run (Redis measures the lapse by the
    # claimant's lease setting, which replicas share)
    deadline = time.monotonic() + 20
    while (again := await store.claim("w2", lease_seconds=0.2)) is None or again.id != "c1":
        assert time.monotonic() < deadline, "the lapsed job was not claimed again"
        if again is not None:  # c2 first: put it back
            await store.release(again.id, "w2")
        await asyncio.sleep(0.05)
    assert again.attempts == 2 and not await store.renew("c1", "w1", 0, 30)
    assert await store.renew("c1", "w2", 0, 30)

    # An engine that is down: the job goes back each time, and that is no attempt (before, MAX_ATTEMPTS
    # releases failed it with `gave_up` while nothing had died)
    for _ in range(jobqueue.MAX_ATTEMPTS + 2):
        waiting = await store.claim("w3", lease_seconds=30)
        assert waiting is not None and waiting.id == "c2" and waiting.attempts == 1
        await store.release("c2", "w3")
    assert (await store.get("alice", "c2")).status == jobqueue.QUEUED

    deleted = await store.delete("alice", "c1")  # deleting is cancelling: the worker's renewal fails
    assert deleted is not None and not await store.renew("c1", "w2", 0, 30)
    assert await store.complete("c1", "w2", 0) is False
    await store.close()


async def test_the_sqlite_queue_keeps_any_job_type(tmp_path):
    await contract(jobqueue.SQLiteJobStore(CHORES, tmp_path / "chores.sqlite3", 60))


@pytest.mark.integration
async def test_the_redis_queue_keeps_any_job_type():
    from tests.support.redis_server import RedisServer

    server = RedisServer().start()
    try:
        await contract(jobqueue.RedisJobStore(CHORES, server.url, 60))
    finally:
        server.stop()


@dataclass(slots=True, kw_only=True)
class LaterChore(Chore):
    """Chore with a field added in a later release."""

    priority: int = 5


async def test_a_field_added_later_becomes_a_column_of_an_existing_file(tmp_path):
    path = tmp_path / "chores.sqlite3"
    old = jobqueue.SQLiteJobStore(CHORES, path, idempotency_ttl_seconds=60)
    await old.create(Chore(id="c1", principal="alice", payload="{}"), LIMITS)
    later = jobqueue.JobKind(
        record=LaterChore, noun="chore", id_param="chore_id", gave_up="x", redis_prefix="test:later:"
    )
    new = jobqueue.SQLiteJobStore(later, path, idempotency_ttl_seconds=60)
    assert (await new.get("alice", "c1")).priority == 5  # old rows read the field's default
    await new.create(LaterChore(id="c2", principal="alice", payload="{}", priority=9), LIMITS)
    assert (await new.get("alice", "c2")).priority == 9
