"""Background responses: queued by the edge on the durable job queue, run by a worker of the jobs process.

``background: true`` is admitted (the key checked, its tokens reserved) and checked like any request,
stored with ``status: queued`` and queued on modelplex_kit.jobqueue (SQLite beside the response store's
file, or the same Redis, so a killed jobs process's work is taken over by another). A worker of the jobs
process (modelplex_edge.jobs) finds it by polling the queue's depth, claims it under a lease and runs it
through the pipeline with the request's admission ticket, so it is metered to the caller's key as a
foreground response would be; the stored response goes queued -> in_progress -> completed | incomplete |
failed, or cancelled.

Every event of the run is kept in the stored response (bounded), so
``GET /v1/responses/{id}?stream=true&starting_after=N`` replays what a client missed and then follows
the rest, whichever replica it reaches. Cancelling deletes the job: the worker's next renewal fails
and it cancels the backend call, which frees the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from modelplex_edge import pipeline
from modelplex_edge.admission import Admitted, Consumption
from modelplex_edge.endpoints.responses import translate
from modelplex_edge.endpoints.responses.conversation import load_chain
from modelplex_edge.endpoints.responses.events import Event, ResponseEvents, generate_events
from modelplex_edge.endpoints.responses.protocol import CreateResponseRequest
from modelplex_edge.endpoints.responses.store import ResponseStore, StoredResponse
from modelplex_edge.settings import EdgeSettings
from modelplex_edge.sse import event
from modelplex_edge.state import EdgeState
from modelplex_kit import jobqueue
from modelplex_kit.errors import ServiceError
from modelplex_kit.logging import request_id_var
from modelplex_kit.outages import OutageLog

log = logging.getLogger(__name__)

#: Statuses after which nothing changes.
TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
_CANCELLED = translate.Outcome("cancelled")
#: How long a job whose model is unreachable (no catalog yet, its backend down) waits before it is claimed again.
BACKEND_RETRY_SECONDS = 1.0


@dataclass(slots=True, kw_only=True)
class BackgroundJob(jobqueue.JobRecord):
    """One queued background response: what a worker needs to run and account it (never the key).
    Its ``id`` is the response id; its ``principal`` the caller's scope, where the response is stored."""

    #: The catalog model it was admitted for.
    model: str
    #: The request body as the client sent it (JSON), parsed again by the worker.
    request: str
    #: The admission, for accounting: the gatekeeper's ticket names the key, so any edge can account it.
    principal_id: str = ""
    project: str = ""
    ticket: str = ""
    #: The create call's request id (its x-request-id), which the usage record carries.
    request_id: str = ""

    def admitted(self, endpoint: str) -> Admitted:
        return Admitted(
            self.principal_id,
            endpoint=endpoint,
            model=self.model,
            ticket=self.ticket,
            project=self.project,
            response_id=self.id,
        )


RESPONSE_JOBS = jobqueue.JobKind(
    record=BackgroundJob,
    noun="background response",
    id_param="response_id",
    gave_up="The background response failed repeatedly.",
    redis_prefix="modelplex:responses:jobs:",
)


def build_queue(settings: EdgeSettings, requeue: bool = False) -> jobqueue.JobStore:
    """The queue lives where stored responses do, so every process that sees one sees the other (the edge
    and the jobs process; every replica with Redis). ``requeue``: this process runs the jobs (a SQLite file
    re-queues what it left running)."""
    if settings.responses_store == "redis":
        return jobqueue.RedisJobStore(RESPONSE_JOBS, settings.responses_redis_url, 3600, socket_timeout=5.0)
    if settings.responses_store == "sqlite":
        path = Path(settings.responses_sqlite_path)
        path = path.with_name(path.stem + "-background.sqlite3")
        return jobqueue.SQLiteJobStore(RESPONSE_JOBS, path, 3600, requeue=requeue)
    return jobqueue.SQLiteJobStore(RESPONSE_JOBS, Path(":memory:"), 3600)


def limits(settings: EdgeSettings) -> jobqueue.Limits:
    return jobqueue.Limits(settings.responses_background_max_queue, settings.responses_background_max_queue_per_project)


async def enqueue(
    state: EdgeState, call: pipeline.Call, body: CreateResponseRequest, raw_body: bytes, response_id: str, depth: int
) -> dict[str, Any]:
    """Stores the queued response with its first events, then queues the work (the request as sent, parsed
    again by the worker); returns the response."""
    events = ResponseEvents(body, response_id, int(time.time()), call.model.id)
    opened = events.queued()
    queued = opened[0]["response"]
    scope = call.admitted.scope
    record = StoredResponse(response_id, scope, queued, translate.input_items(body), depth, opened)
    await state.responses.put(record)
    admitted = call.admitted
    job = BackgroundJob(
        id=response_id,
        principal=scope,
        model=call.model.id,
        request=raw_body.decode(),
        principal_id=admitted.principal_id,
        project=admitted.project,
        ticket=admitted.ticket,
        request_id=request_id_var.get(),
        created_at=queued["created_at"],
    )
    try:
        await state.background.create(job, limits(state.settings))
    except BaseException:
        await state.responses.delete(scope, response_id)
        raise
    call.defer()  # the worker accounts it, with this admission's ticket
    state.admission.hand_off(call.admitted)  # in the jobs process
    if state.jobs_demand is not None:
        state.jobs_demand.enqueued()  # a jobs process scaled to zero is started now
    return queued


async def cancel(state: EdgeState, record: StoredResponse, endpoint: str) -> dict[str, Any]:
    """Cancels a queued or running background response; a finished one is returned as it is."""
    if record.response["status"] in TERMINAL:
        return record.response
    job = await state.background.delete(record.scope, record.id)
    if job is not None and job.status == jobqueue.QUEUED:
        # Never claimed: no worker will account it, so its reservation is released here.
        await state.admission.account(job.admitted(endpoint), Consumption(), failed=True)
    cancelled = {**record.response, "status": "cancelled"}
    await state.responses.put(dataclasses.replace(record, response=cancelled))
    return cancelled


async def replay(
    store: ResponseStore, scope: str, response_id: str, after: int, poll_seconds: float
) -> AsyncIterator[bytes]:
    """The events after sequence number ``after``, then the rest as they are stored, to the terminal one."""
    sent = after
    while True:
        record = await store.get(scope, response_id)
        if record is None:  # deleted meanwhile
            return
        for each in record.events:
            if each["sequence_number"] > sent:
                sent = each["sequence_number"]
                yield event(each, each["type"])
        if record.response["status"] in TERMINAL:
            return
        await asyncio.sleep(poll_seconds)


class _Gone(Exception):
    """The job was deleted (cancelled) or its lease passed to another worker."""


class _NotYet(Exception):
    """The model cannot be resolved yet (no catalog yet, its backend not up): the job goes back to the queue."""


class EventLog:
    """A running background response's events and status, written to its stored record now and then."""

    def __init__(self, store: ResponseStore, record: StoredResponse, settings: EdgeSettings) -> None:
        self._store, self.record = store, record
        self._max = settings.responses_background_max_events
        self._every = settings.responses_background_flush_seconds
        self._written = 0.0
        self.events: list[Event] = list(record.events)
        self.response = record.response

    async def append(self, each: Event) -> None:
        closing = each["type"] in ("response.completed", "response.incomplete", "response.failed", "error")
        if len(self.events) < self._max or closing:  # beyond the bound deltas are dropped, never the end
            self.events.append(each)
        if "response" in each:
            self.response = each["response"]
        if time.monotonic() - self._written >= self._every:
            await self.write()

    async def finish(self, final: dict[str, Any]) -> None:
        self.response = final
        await self.write()

    async def write(self) -> None:
        self._written = time.monotonic()
        self.record = dataclasses.replace(self.record, response=self.response, events=list(self.events))
        await self._store.put(self.record)


class BackgroundWorker:
    """The jobs process's workers: each claims a job, runs it, and renews its lease while it runs."""

    def __init__(self, state: EdgeState, endpoint: pipeline.Endpoint) -> None:
        self._state, self._queue, self._settings = state, state.background, state.settings
        self._endpoint = endpoint
        self.worker_id = uuid.uuid4().hex[:12]
        self.count = self._settings.responses_background_workers
        #: Background responses running in this process now.
        self.running = 0
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        #: Claims that failed (the queue's store unreachable), shared by this process's workers: an outage is
        #: logged once with its traceback, summarised while it lasts, and once when a claim works again.
        self.queue_outage = OutageLog.of_queue(log, "background queue", self._settings.outage_summary_seconds)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(f"{self.worker_id}-{i}")) for i in range(self.count)]

    async def stop(self) -> None:
        """Running jobs go back to the queue, unaccounted: another jobs process (or this one restarted) re-runs
        them and accounts them once. (A killed process's jobs are re-run once their lease lapses.)"""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self, worker: str) -> None:
        lease, poll = (
            self._settings.responses_background_lease_seconds,
            self._settings.responses_background_poll_seconds,
        )
        await self._state.catalog.ready.wait()  # models resolved before any is: work is not failed for it
        while True:
            try:
                job = await self._queue.claim(worker, lease)
            except Exception as exc:  # the queue is unreachable: try again later
                self.queue_outage.failed(f"claim failed ({type(exc).__name__})", "claims failed", exc_info=True)
                job = None
            else:
                self.queue_outage.recovered()
            if job is None:
                # A job whose worker died is running, not queued: a claim every quarter lease finds it.
                await jobqueue.until_claimable(self._queue, poll, lease / 4)
                continue
            self.running += 1
            try:
                await self._run(job, worker)
            except Exception:
                log.exception("background response bookkeeping failed", extra={"response_id": job.id})
            finally:
                self.running -= 1

    async def _run(self, job: BackgroundJob, worker: str) -> None:
        log.info("running background response", extra={"response_id": job.id, "attempt": job.attempts})
        work = asyncio.create_task(self._respond(job))
        heartbeat = asyncio.create_task(self._heartbeat(job, worker))
        try:
            await asyncio.wait((work, heartbeat), return_when=asyncio.FIRST_COMPLETED)
        finally:
            heartbeat.cancel()
            if not work.done():  # cancelled (or the lease lost): cancelling the call frees the engine
                work.cancel()
            await asyncio.gather(work, heartbeat, return_exceptions=True)
            if self._stopping and work.cancelled():  # back to the queue now rather than after the lease
                await self._queue.release(job.id, worker)
        if not work.cancelled() and isinstance(work.exception(), _NotYet):
            await self._queue.release(job.id, worker)
            await asyncio.sleep(BACKEND_RETRY_SECONDS)
            return
        if work.cancelled():
            if await self._queue.get(job.principal, job.id) is None:  # cancelled, not taken over
                await self._settle_cancelled(job)
            return
        if (error := work.exception()) is not None:
            log.error("background response failed", exc_info=error, extra={"response_id": job.id})
        if await self._queue.complete(job.id, worker, 0):
            await self._queue.delete(job.principal, job.id)  # its record says all; the queue forgets it

    async def _settle_cancelled(self, job: BackgroundJob) -> None:
        """The cancel wrote ``cancelled``; a progress write of ours may have landed after it: write it again."""
        log.info("background response cancelled", extra={"response_id": job.id})
        record = await self._state.responses.get(job.principal, job.id)
        if record is not None and record.response["status"] != "cancelled":
            cancelled = {**record.response, "status": "cancelled"}
            await self._state.responses.put(dataclasses.replace(record, response=cancelled))

    async def _heartbeat(self, job: BackgroundJob, worker: str) -> None:
        lease, every = (
            self._settings.responses_background_lease_seconds,
            self._settings.responses_background_renew_seconds,
        )
        while True:
            await asyncio.sleep(min(every, lease / 3))
            if not await self._queue.renew(job.id, worker, 0, lease):
                raise _Gone(job.id)

    async def _respond(self, job: BackgroundJob) -> None:
        request_id_var.set(job.request_id)  # this task's own context: logs and the usage record name it
        store, settings = self._state.responses, self._settings
        record = await store.get(job.principal, job.id)
        if record is None or record.response["status"] in TERMINAL:  # deleted or cancelled meanwhile
            return
        body = CreateResponseRequest.model_validate_json(job.request)
        # A re-run (the last worker died) starts over after the events of the queued response.
        progress = EventLog(store, dataclasses.replace(record, events=record.events[:2]), settings)
        events = ResponseEvents(body, job.id, record.response["created_at"], job.model)
        events.sequence = len(progress.events)
        try:
            call = pipeline.background_call(self._state, self._endpoint, job.model, job.admitted(self._endpoint.name))
        except ServiceError as exc:
            if exc.status == grpc.StatusCode.UNAVAILABLE:
                raise _NotYet(job.id) from exc
            await _failed(progress, events, exc)
            return
        self._state.admission.take_over(call.admitted)  # this process accounts it now
        try:
            async with call:
                try:
                    chain = await load_chain(
                        store, job.principal, body.previous_response_id, settings, *translate.chain_room(body)
                    )
                    prompt = translate.Prompt(body, [*chain.items, *body.items])
                    prompt.fit(call.model.context_length)
                    meta = call.meta(body.safety_identifier or body.user)
                    stream = await call.stream(
                        "GenerateStream", translate.to_proto(body, prompt.items, call.model.id, meta)
                    )
                    async for each in generate_events(events, stream, progress.finish):
                        await progress.append(each)
                except asyncio.CancelledError:
                    if self._stopping:  # re-run elsewhere, which accounts it: not accounted twice
                        call.defer()
                        self._state.admission.hand_off(call.admitted)
                    raise
        except ServiceError as exc:  # before the stream opened (the engine refused, the chain is gone)
            await _failed(progress, events, exc)
        except Exception:  # never left queued or in_progress forever
            log.exception("background response failed", extra={"response_id": job.id})
            await _failed(progress, events, _internal())


def _internal() -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, "The server had an error while generating the response.")


async def _failed(progress: EventLog, events: ResponseEvents, error: ServiceError) -> None:
    closing, final = events.failure(error, None)
    for each in closing:
        await progress.append(each)
    await progress.finish(final)
