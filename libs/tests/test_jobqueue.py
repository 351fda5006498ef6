"""The shared job queue over a job type of its own (not videos'): SQLite here, and the same contract in a
real Redis; the columns and hash fields follow the dataclass."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

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


# -- depth: what idle workers and demand reports read ------------------------------------------------------
async def depth_contract(store: jobqueue.JobStore) -> None:
    depth = store.depth
    room = jobqueue.Limits(max_queue=10, max_queue_per_principal=10)
    assert await depth() == jobqueue.QueueDepth(queued=0, running=0)
    for i, principal in enumerate(["alice", "alice", "bob", "carol", "dave"]):
        await store.create(Chore(id=f"d{i}", principal=principal, payload="{}"), room)
    assert await depth() == jobqueue.QueueDepth(queued=5, running=0)  # over every principal
    first, second = await store.claim("w1", 30), await store.claim("w2", 30)
    assert await depth() == jobqueue.QueueDepth(queued=3, running=2)
    await store.release(first.id, "w1")  # back to the queue
    assert await depth() == jobqueue.QueueDepth(queued=4, running=1)
    assert await store.complete(second.id, "w2", 0)
    assert await depth() == jobqueue.QueueDepth(queued=4, running=0)
    third = await store.claim("w3", 30)
    await store.fail(third.id, "w3", "internal_error", "no")
    fourth = await store.claim("w4", 30)
    assert await depth() == jobqueue.QueueDepth(queued=2, running=1)
    await store.delete(fourth.principal, fourth.id)  # cancelled while it runs
    assert await depth() == jobqueue.QueueDepth(queued=2, running=0)
    await store.create(Chore(id="e1", principal="erin", payload="{}"), room)
    assert await depth() == jobqueue.QueueDepth(queued=3, running=0)
    await store.delete("erin", "e1")  # cancelled while queued
    assert await depth() == jobqueue.QueueDepth(queued=2, running=0)
    await store.close()


async def test_the_sqlite_queue_counts_its_depth(tmp_path):
    await depth_contract(jobqueue.SQLiteJobStore(CHORES, tmp_path / "depth.sqlite3", 60))


async def test_the_memory_queue_counts_its_depth():
    await depth_contract(jobqueue.SQLiteJobStore(CHORES, Path(":memory:"), 60))


async def test_the_sqlite_depth_is_an_index_count_not_a_scan(tmp_path):
    store = jobqueue.SQLiteJobStore(CHORES, tmp_path / "plan.sqlite3", 60)
    plan = store._db.execute(
        "EXPLAIN QUERY PLAN SELECT status, COUNT(*) FROM jobs WHERE status IN (?, ?) GROUP BY status",
        (jobqueue.QUEUED, jobqueue.IN_PROGRESS),
    ).fetchall()
    assert "COVERING INDEX jobs_by_status" in " ".join(row["detail"] for row in plan)
    await store.close()


@pytest.mark.integration
async def test_the_redis_queue_counts_its_depth():
    from tests.support.redis_server import RedisServer

    server = RedisServer().start()
    try:
        await depth_contract(jobqueue.RedisJobStore(CHORES, server.url, 60))
    finally:
        server.stop()


async def test_a_store_opened_without_requeue_leaves_running_jobs_to_their_worker(tmp_path):
    """The edge opens the SQLite queue beside the jobs process: its restart must not take the jobs process's
    running jobs from it; the jobs process's own restart re-queues them (their worker was itself)."""
    path = tmp_path / "shared.sqlite3"
    jobs = jobqueue.SQLiteJobStore(CHORES, path, 60)
    await jobs.create(Chore(id="r1", principal="alice", payload="{}"), LIMITS)
    assert (await jobs.claim("w1", 30)).id == "r1"
    edge = jobqueue.SQLiteJobStore(CHORES, path, 60, requeue=False)
    assert (await edge.depth()) == jobqueue.QueueDepth(queued=0, running=1)
    assert await jobs.renew("r1", "w1", 0, 30)  # still w1's
    restarted = jobqueue.SQLiteJobStore(CHORES, path, 60)
    assert (await edge.depth()) == jobqueue.QueueDepth(queued=1, running=0)
    for store in (jobs, edge, restarted):
        await store.close()


async def test_until_claimable_waits_for_queued_work_or_the_look_interval(tmp_path):
    store = jobqueue.SQLiteJobStore(CHORES, tmp_path / "wait.sqlite3", 60)
    started = time.monotonic()
    await jobqueue.until_claimable(store, poll_seconds=0.02, look_seconds=0.3)  # nothing queued: the look
    assert 0.28 <= time.monotonic() - started < 2
    waiting = asyncio.create_task(jobqueue.until_claimable(store, poll_seconds=0.02, look_seconds=60))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await store.create(Chore(id="q1", principal="alice", payload="{}"), LIMITS)
    await asyncio.wait_for(waiting, 2)  # seen at the next poll, not after the look
    await store.close()
