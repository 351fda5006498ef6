"""Who may wait for a llama.cpp sequence slot (issue 22, defect 4: a full queue answered late).

Fakes and an injected clock, no model: the start rate, each class's place in the queue, the admission decision, the
engine's ``_run`` refusing at once what could not start within the wait bound instead of queueing it, and the
scheduler refusing, as soon as the first starts show the rate, what a cold engine had queued but cannot start in time.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading

import grpc
import llama_cpp
import pytest

from modelplex_kit.drain import RETRY_AFTER_UNKNOWN_S
from modelplex_kit.errors import ServiceError
from modelplex_text.adapters.llamacpp import LlamaCppEngine
from modelplex_text.adapters.llamacpp_batch import BatchScheduler, Failed, Sequence, Started, _Slot
from modelplex_text.adapters.llamacpp_queue import AT_CAPACITY, QueueBounds, QueuePosition, StartRate, Waiter, position
from modelplex_text.choices import ChoiceEnd

BOUNDS = QueueBounds(max_queue=64, max_wait=30.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def observed(per_second: float, clock: Clock | None = None) -> StartRate:
    """A start rate that saw ``per_second`` starts per second of backlog (3 starts over 3 / per_second s)."""
    clock = clock or Clock()
    rate = StartRate(clock)
    rate.admitted(0, still_waiting=True)  # every slot busy, sequences left waiting
    clock.now += 3 / per_second
    rate.admitted(3, still_waiting=True)
    assert rate.per_second == pytest.approx(per_second)
    return rate


# -- the start rate -------------------------------------------------------------------
def test_starts_into_free_slots_and_idle_time_say_nothing_about_the_drain():
    clock = Clock()
    rate = StartRate(clock)
    for _ in range(5):  # light load: each request starts in the pass that saw it, nothing left waiting
        clock.now += 10
        rate.admitted(1, still_waiting=False)
    assert rate.per_second is None  # cold: nothing is known, so admission stays permissive
    clock.now += 10
    rate.admitted(0, still_waiting=True)  # a backlog forms ...
    clock.now += 2
    rate.admitted(1, still_waiting=True)  # ... and drains one start in 2 s
    assert rate.per_second == pytest.approx(0.5)
    clock.now += 1
    rate.admitted(1, still_waiting=False)  # the backlog's last start ends it: 2 starts in 3 s (the newest weigh more)
    assert rate.per_second == pytest.approx(2 / 3, rel=0.05)
    measured = rate.per_second
    clock.now += 3600  # an hour idle (no backlog): the rate stands, it is not decayed by idleness
    rate.admitted(1, still_waiting=False)
    assert rate.per_second == measured


def test_a_backlog_that_does_not_drain_pulls_the_rate_down():
    clock = Clock()
    rate = observed(1.5, clock)
    before = rate.per_second
    for _ in range(20):  # 20 s of passes (every 0.1 s), every slot held, no start
        for _ in range(10):
            clock.now += 0.1
            rate.admitted(0, still_waiting=True)
    assert rate.per_second < before / 4


# -- each class's place ---------------------------------------------------------------
def test_interactive_work_waits_only_behind_interactive_work_that_no_batch_slot_can_take():
    # 5 interactive and 20 batch sequences waiting, 3 slots running batch work (interactive work takes those next).
    counts = {"interactive_waiting": 5, "batch_waiting": 20, "batch_running": 3}
    assert position(**counts, batch=False) == QueuePosition(waiting=25, ahead=2)
    assert position(**counts, batch=True) == QueuePosition(waiting=25, ahead=25)
    assert position(interactive_waiting=2, batch_waiting=9, batch_running=8, batch=False).ahead == 0


# -- the decision -----------------------------------------------------------------------
def test_only_what_can_start_within_the_wait_is_queued_and_the_rest_is_told_when_to_retry():
    # The figures: ~45 starts in a 30 s wait.
    rate = 1.5
    assert BOUNDS.refusal(QueuePosition(waiting=44, ahead=44), rate) is None  # starts at 45 / 1.5 = 30 s
    refused = BOUNDS.refusal(QueuePosition(waiting=50, ahead=50), rate)
    assert refused is not None and refused.status == grpc.StatusCode.UNAVAILABLE
    assert refused.headers["retry-after"] == str(math.ceil((51 - 45) / rate))  # until 45 are ahead again


def test_a_burst_of_150_gets_its_refusals_at_once_and_every_queued_request_starts_in_time():
    rate, queued, refused = 1.5, 0, 0
    for _ in range(150):
        at = position(interactive_waiting=queued, batch_waiting=0, batch_running=0, batch=False)
        if BOUNDS.refusal(at, rate) is None:
            queued += 1
        else:
            refused += 1
    assert (queued, refused) == (45, 105)  # was 64 queued, of which ~19 got their 503 after 30 s
    assert queued / rate <= BOUNDS.max_wait  # the last one queued starts within the wait


def test_a_cold_engine_admits_up_to_max_queue_and_the_cap_always_holds():
    assert BOUNDS.refusal(QueuePosition(waiting=63, ahead=63), None) is None  # no rate observed: permissive
    for rate in (None, 100.0):
        full = BOUNDS.refusal(QueuePosition(waiting=64, ahead=0), rate)
        assert full is not None and full.status == grpc.StatusCode.UNAVAILABLE
    assert BOUNDS.refusal(QueuePosition(64, 0), None).headers["retry-after"] == str(RETRY_AFTER_UNKNOWN_S)
    assert BOUNDS.refusal(QueuePosition(64, 0), 0.5).headers["retry-after"] == "2"  # one to drain, at 0.5/s


def test_the_next_in_line_is_always_queued_so_a_low_rate_is_measured_again():
    assert BOUNDS.refusal(QueuePosition(waiting=3, ahead=0), 0.001) is None  # batch work it will pass: waiting 3
    assert BOUNDS.refusal(QueuePosition(waiting=1, ahead=1), 0.001) is not None


# -- the engine ---------------------------------------------------------------------------
class FakeScheduler:
    """What ``LlamaCppEngine._run`` uses of the BatchScheduler: a sequence submitted starts and ends at once."""

    def __init__(self, at: QueuePosition, start_rate: StartRate) -> None:
        self.at, self.start_rate = at, start_rate
        self.submitted: list[Sequence] = []

    def position(self, *, batch: bool) -> QueuePosition:
        return self.at

    def waiting(self) -> int:
        return self.at.waiting

    def submit(self, seq: Sequence) -> None:
        self.submitted.append(seq)
        seq.emit(Started(0))
        seq.emit(ChoiceEnd("stop", 0))


class Matcher:
    closed = False

    def close(self) -> None:
        self.closed = True


def engine_over(scheduler: FakeScheduler) -> LlamaCppEngine:
    engine = object.__new__(LlamaCppEngine)  # no model: only what _run uses
    engine._scheduler = scheduler
    engine._queue = BOUNDS
    return engine


def sequence(queue: asyncio.Queue, matcher: Matcher | None = None) -> Sequence:
    return Sequence(
        tokens=[1], max_new=4, sampler=None, stop_text=None, matcher=matcher, deadline=None,
        emit=queue.put_nowait, context=lambda f, *a, **k: f(*a, **k),
    )


async def run(engine: LlamaCppEngine, seq: Sequence, queue: asyncio.Queue) -> list:
    return [piece async for piece in engine._run(seq, queue)]


async def test_the_engine_refuses_at_once_a_request_that_could_not_start_within_the_wait():
    # 50 waiting ahead, under max_queue (64), but the engine starts 1.5 a second: the 51st starts after 34 s,
    # beyond the 30 s wait. It used to be queued and get its 503 after waiting 30 s.
    scheduler = FakeScheduler(QueuePosition(waiting=50, ahead=50), observed(1.5))
    queue: asyncio.Queue = asyncio.Queue()
    matcher = Matcher()
    with pytest.raises(ServiceError) as refused:
        await run(engine_over(scheduler), sequence(queue, matcher), queue)
    assert refused.value.status == grpc.StatusCode.UNAVAILABLE
    assert refused.value.headers["retry-after"] == "4"
    assert scheduler.submitted == [], "queued a request that could not start within the wait"
    assert matcher.closed


async def test_the_engine_queues_what_can_start_in_time_or_when_no_rate_is_known():
    for at, rate in ((QueuePosition(44, 44), observed(1.5)), (QueuePosition(63, 63), StartRate(Clock()))):
        scheduler = FakeScheduler(at, rate)
        queue: asyncio.Queue = asyncio.Queue()
        seq = sequence(queue)
        assert await run(engine_over(scheduler), seq, queue) == [ChoiceEnd("stop", 0)]
        assert scheduler.submitted == [seq]


# -- a cold engine's first burst ---------------------------------------------------------
def test_one_slot_freeing_after_a_burst_is_not_the_rate_until_each_slot_has_turned_over():
    # 8 slots filled at once by a burst free at about the same moment: the first start, 5 s in, shows how long one
    # request ran (1 / 5 s), not how fast 8 slots drain (8 / 5 s). Taken as the rate, it would refuse 4 in 5 of what
    # could start in time.
    clock = Clock()
    rate = StartRate(clock, known_after=8)
    rate.admitted(8, still_waiting=True)  # the burst fills every slot, the rest wait
    clock.now += 5.0
    rate.admitted(1, still_waiting=True)
    assert rate.per_second is None
    clock.now += 0.2
    rate.admitted(7, still_waiting=True)
    assert rate.per_second == pytest.approx(8 / 5.2, rel=0.05)


def test_the_back_of_a_line_that_can_no_longer_start_in_time_is_late_never_one_ahead_of_a_waiter_that_stays():
    bounds, now = QueueBounds(max_queue=64, max_wait=30.0), 1020.0  # 10 s left to those queued at 1000
    line = [Waiter(ahead, 1000.0) for ahead in range(12)]
    late = bounds.late(line, 1.0, now)  # 10 starts in 10 s: ahead 0..9 start in time
    assert len(late) == 2 and all(error.status == grpc.StatusCode.UNAVAILABLE for error in late)
    # Retry-After: until a new request behind `ahead` would start within a whole wait: at once here.
    assert [error.headers["retry-after"] for error in late] == ["1", "1"]
    assert bounds.late(line, None, now) == []  # no rate known: nothing is judged
    # One behind them, queued later, still starts in time: it stays, and so does everyone ahead of it.
    assert bounds.late([*line, Waiter(12, 1015.0)], 1.0, now) == []
    # A preempted sequence (its client already reads it) and the next in line are never refused, nor anyone ahead.
    assert len(bounds.late([Waiter(0, 1000.0), Waiter(1, None), Waiter(40, 1000.0)], 1.0, now)) == 1  # the last
    assert len(bounds.late([Waiter(1, None), Waiter(40, 1000.0), Waiter(41, 1000.0)], 1.0, now)) == 2
    assert bounds.late([Waiter(0, 1000.0)], 0.001, now) == []
    assert bounds.late([Waiter(50, 1000.0)], 1.0, now)[0].headers["retry-after"] == "21"  # 51 - 30 at 1/s


class Clocked:
    """The scheduler's queue half, without llama.cpp: its lines and slots, its start rate and the refusals, driven by
    hand (a pass is a call to ``_admit``), on an injected clock."""

    @staticmethod
    def scheduler(clock: Clock, *, parallel: int, bounds: QueueBounds, monkeypatch) -> BatchScheduler:
        monkeypatch.setattr(llama_cpp, "llama_memory_seq_rm", lambda *args: True)
        scheduler = object.__new__(BatchScheduler)
        scheduler._memory = None
        scheduler._slots = [_Slot(i) for i in range(parallel)]
        scheduler._waiting = collections.deque()
        scheduler._waiting_batch = collections.deque()
        scheduler._cv = threading.Condition()
        scheduler._bounds = bounds
        scheduler._clock = clock
        scheduler.start_rate = StartRate(clock, known_after=parallel)
        return scheduler


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_cold_engines_first_burst_is_refused_as_soon_as_the_first_starts_show_the_rate(monkeypatch):
    """Issue 22, defect 4: 150 concurrent streams on a cold engine. No start rate is known yet, so 64 are queued
    (max_queue) and 86 refused at once; the engine then drains ~1.5 a second, so of the 64, 8 + ~45 start within the
    30 s wait. The rest used to wait the whole 30 s for their 503: now they get it as soon as the slots' first
    turnover shows the rate, 5 s in, and the ones nearer the front keep waiting and all start in time."""
    clock = Clock()
    scheduler = Clocked.scheduler(clock, parallel=8, bounds=BOUNDS, monkeypatch=monkeypatch)
    engine = engine_over(scheduler)
    requests = []
    for _ in range(150):
        queue: asyncio.Queue = asyncio.Queue()
        seq = sequence(queue)
        requests.append((seq, asyncio.create_task(run(engine, seq, queue))))
    await settle()
    submitted_at = clock.now

    def refused() -> list[tuple[int, ServiceError]]:
        return [(i, task.exception()) for i, (_, task) in enumerate(requests) if task.done() and task.exception()]

    def started() -> list[int]:
        return [i for i, (seq, _) in enumerate(requests) if seq.cached_tokens is not None]

    assert [i for i, _ in refused()] == list(range(64, 150))  # the cap: refused at submit
    scheduler._admit()  # the first pass: 8 slots filled, 56 wait; no rate known
    assert started() == list(range(8)) and scheduler.waiting() == 56

    def finish(count: int) -> None:
        """``count`` running sequences end, freeing their slots."""
        for slot in [slot for slot in scheduler._slots if slot.seq is not None][:count]:
            slot.seq.emit(ChoiceEnd("stop", 0))
            slot.seq = None

    clock.now += 5.0
    finish(1)  # one slot frees: how long one request ran, not how fast 8 slots drain
    scheduler._admit()
    await settle()
    assert len(refused()) == 86, "refused waiting requests on one slot's turnover"

    clock.now += 0.2
    finish(7)  # each slot has turned over: 8 starts in 5.2 s, ~1.57 a second, 24.8 s of the wait left
    scheduler._admit()
    await settle()
    at_first_rate = [(i, error) for i, error in refused() if i < 64]
    # The back of the queue, which cannot start in the 24.8 s left (~38 starts), is refused now, 5.2 s after
    # submitting instead of 30 s, with a Retry-After from the rate, and without any real time passing.
    assert [i for i, _ in at_first_rate] == list(range(54, 64)), "late requests still wait for the wait bound's 503"
    assert all(error.status == grpc.StatusCode.UNAVAILABLE for _, error in at_first_rate)
    assert {error.headers["retry-after"] for _, error in at_first_rate} <= {"1", "2"}
    assert scheduler.waiting() == 38
    assert all(seq.matcher is None for seq, _ in requests[54:64])

    while scheduler.waiting():  # the drain goes on at ~1.6 a second: every one kept starts within its wait
        clock.now += 0.6
        finish(1)
        scheduler._admit()
        assert clock.now - submitted_at <= BOUNDS.max_wait
    finish(8)
    await settle()
    assert started() == list(range(54))
    assert all(task.done() for _, task in requests)
    assert [i for i, _ in refused()] == list(range(54, 150))
    # Every refusal was the immediate one; none the wait bound's late "busy" 503.
    assert {error.message for _, error in refused()} == {AT_CAPACITY}
    assert all(task.result() == [ChoiceEnd("stop", 0)] for _, task in requests[:54])


def test_each_line_refuses_its_back_as_position_counts_it(monkeypatch):
    """Interactive work counts only the interactive sequences ahead of it, less the slots batch work holds; batch
    work counts every interactive sequence still waiting, and those ahead in its own line."""
    clock = Clock()
    scheduler = Clocked.scheduler(clock, parallel=3, bounds=BOUNDS, monkeypatch=monkeypatch)
    scheduler.start_rate = observed(1.0, clock)  # 1 start a second
    events: list = []

    def queued(*, batch: bool, since: float) -> Sequence:
        seq = sequence(asyncio.Queue(), Matcher())
        seq.emit, seq.batch, seq.queued_at = events.append, batch, since
        return seq

    for slot in scheduler._slots:  # every slot runs batch work
        slot.seq = queued(batch=True, since=990.0)
        slot.seq.cached_tokens = 0
    interactive = [queued(batch=False, since=1000.0) for _ in range(15)]
    batch_late = [queued(batch=True, since=1000.0) for _ in range(3)]
    scheduler._waiting.extend(interactive)
    scheduler._waiting_batch.extend(batch_late)
    clock.now = 1020.0  # 10 s left to those queued at 1000: 10 starts

    scheduler._refuse_late()
    # Interactive: ahead = index - 3 (the running batch slots), so indexes 0..12 (ahead <= 9) start in time.
    assert list(scheduler._waiting) == interactive[:13]
    # Batch: ahead = 13 interactive + its index: none in time.
    assert list(scheduler._waiting_batch) == []
    assert len(events) == 5 and all(isinstance(event, Failed) for event in events)
    assert all(seq.matcher is None for seq in interactive[13:] + batch_late)  # released

    # Batch work queued later, that still starts in time, keeps those ahead of it in its line waiting.
    events.clear()
    batch_in_time = [queued(batch=True, since=1019.0) for _ in range(2)]
    scheduler._waiting_batch.extend([*batch_late, *batch_in_time])
    scheduler._refuse_late()
    assert list(scheduler._waiting_batch) == [*batch_late, *batch_in_time] and events == []
