"""The batch worker: claims a batch from the job queue, validates it, runs its lines, finalizes it.

Runs in the jobs process (modelplex_edge.jobs; ``MODELPLEX_EDGE_BATCHES_WORKERS``), never in the edge, which
only queues. A claimed batch is leased and the lease renewed while it runs; the renewal also notices a cancel
(the ``cancel`` marker). Lines run in chunks of ``batches_chunk_lines``, at most ``batches_line_concurrency``
at once, as calls marked ``x-modelplex-priority: batch``: the backend's scheduler serves interactive work
first (this process cannot see the edge's interactive calls, and waits for none). Each finished chunk is
written as a part before the next starts. A worker that dies (SIGKILL) loses at most its chunk in progress:
its successor skips every line already in a part, so no ``custom_id`` is ever written twice. Idle workers
look at the queue's depth every ``batches_poll_seconds`` and claim when something is queued.

A queue that cannot be reached fails every worker's every poll: that is logged as an outage
(modelplex_kit.outages), once with its traceback, a summary while it lasts, once when a claim works again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from modelplex_edge import json_budget
from modelplex_edge.endpoints.batches import lines
from modelplex_edge.endpoints.batches.records import TERMINAL, BatchJob, BatchObjects, BatchUsage, Part
from modelplex_edge.endpoints.files.store import FileStore
from modelplex_edge.state import EdgeState
from modelplex_kit import jobqueue
from modelplex_kit.errors import ServiceError
from modelplex_kit.looplag import TimeSlice
from modelplex_kit.outages import OutageLog

log = logging.getLogger(__name__)
#: Errors named in a failed validation's ``errors`` (the rest are counted, not listed).
MAX_LISTED_ERRORS = 1000
#: How often idle workers sweep expired files.
SWEEP_SECONDS = 60.0
#: How often a batch whose backend is unreachable tries again (it keeps its claim meanwhile).
BACKEND_RETRY_SECONDS = 1.0


class _Gone(Exception):
    """The lease passed to another worker (this one was presumed dead)."""


class _Stop(Exception):
    """The batch must stop taking lines: cancelled or out of its window."""


class BatchWorker:
    def __init__(self, state: EdgeState) -> None:
        self._state, self._settings = state, state.settings
        self._queue: jobqueue.JobStore = state.batches
        self._objects = BatchObjects(state.objects)
        self._files = FileStore(state.objects)
        self.worker_id = uuid.uuid4().hex[:12]
        self.count = self._settings.batches_workers
        #: Batches running in this process now.
        self.running = 0
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        #: Claims that failed (the queue's store unreachable), shared by this process's workers.
        self.queue_outage = OutageLog.of_queue(log, "batch queue", self._settings.outage_summary_seconds)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(f"{self.worker_id}-{i}")) for i in range(self.count)]
        self._tasks.append(asyncio.create_task(self._sweep()))

    async def stop(self) -> None:
        """Running batches go back to the queue at once; their finished parts are kept, so the next worker
        resumes after them."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sweep(self) -> None:
        while True:
            try:
                await self._files.sweep(int(time.time()))
            except Exception:
                log.warning("file expiry sweep failed", exc_info=True)
            await asyncio.sleep(SWEEP_SECONDS)

    async def _work(self, worker: str) -> None:
        await self._state.catalog.ready.wait()
        while True:
            try:
                job = await self._queue.claim(worker, self._settings.batches_lease_seconds)
            except Exception as exc:
                self.queue_outage.failed(f"claim failed ({type(exc).__name__})", "claims failed", exc_info=True)
                job = None
            else:
                self.queue_outage.recovered()
            if job is None:
                # A job whose worker died is running, not queued: a claim every quarter lease finds it.
                lease = self._settings.batches_lease_seconds
                await jobqueue.until_claimable(self._queue, self._settings.batches_poll_seconds, lease / 4)
                continue
            self.running += 1
            try:
                await self._run(job, worker)
            except Exception:
                log.exception("batch bookkeeping failed", extra={"batch_id": job.id})
            finally:
                self.running -= 1

    async def _run(self, job: BatchJob, worker: str) -> None:
        log.info("running batch", extra={"batch_id": job.id, "attempt": job.attempts})
        run = _Run(self, job, worker)
        work = asyncio.create_task(run.process())
        heartbeat = asyncio.create_task(run.heartbeat())
        try:
            await asyncio.wait((work, heartbeat), return_when=asyncio.FIRST_COMPLETED)
        finally:
            heartbeat.cancel()
            if not work.done():  # the lease was lost: another worker has it
                work.cancel()
            await asyncio.gather(work, heartbeat, return_exceptions=True)
            if self._stopping and work.cancelled():
                await self._queue.release(job.id, worker)
        if work.cancelled():
            return
        if (error := work.exception()) is not None:
            log.error("batch failed", exc_info=error, extra={"batch_id": job.id})
            await run.fail_internal(error)
        await self._queue.complete(job.id, worker, 0)


class _Run:
    """One claim of one batch, from its current state to the end (or until its lease is lost)."""

    def __init__(self, worker: BatchWorker, job: BatchJob, worker_name: str) -> None:
        self._w, self.job, self._name = worker, job, worker_name
        self._state, self._settings = worker._state, worker._settings
        self._objects, self._files = worker._objects, worker._files
        self.cancelled = False
        self.batch: dict[str, Any] = {}
        self.done: set[int] = set()
        self.counts = {"completed": 0, "failed": 0}
        self.usage = BatchUsage()

    async def heartbeat(self) -> None:
        every = min(self._settings.batches_renew_seconds, self._settings.batches_lease_seconds / 3)
        while True:
            await asyncio.sleep(every)
            lease = self._settings.batches_lease_seconds
            if not await self._w._queue.renew(self.job.id, self._name, len(self.done), lease):
                raise _Gone(self.job.id)
            if not self.cancelled and await self._objects.cancel_requested(self.job.principal, self.job.id):
                self.cancelled = True

    # -- the batch's life ----------------------------------------------------------------------
    async def process(self) -> None:
        scope = self.job.principal
        batch = await self._objects.get(scope, self.job.id)
        if batch is None or batch["status"] in TERMINAL:
            return
        self.batch = batch
        if await self._objects.cancel_requested(scope, self.job.id):
            await self.finalize("cancelled")
            return
        if time.time() >= batch["expires_at"]:
            await self.finalize("expired")
            return
        try:
            if batch["status"] == "validating" and not await self._until_reachable(self.validate):
                return
            async for part in self._objects.parts(scope, self.job.id):
                for each in part.lines:
                    self._count(each)
            await self._until_reachable(self.run_lines)
        except _Stop:
            pass
        if self.cancelled:
            await self.finalize("cancelled")
        elif time.time() >= batch["expires_at"]:
            await self.finalize("expired")
        else:
            await self.finalize("completed")

    async def _until_reachable(self, step: Callable[[], Awaitable[Any]]) -> Any:
        """Runs ``step`` again while a model it needs is unreachable (its backend down, no catalog yet),
        keeping the claim: released and re-claimed, the job would count a worker death each time."""
        while True:
            try:
                return await step()
            except lines.NotYet:
                log.info("batch waits for its backend", extra={"batch_id": self.job.id})
                if self._must_stop():
                    raise _Stop() from None
                await asyncio.sleep(BACKEND_RETRY_SECONDS)

    def _input(self) -> AsyncIterator[lines.RawLine]:
        content = self._files.content(self.job.principal, self.batch["input_file_id"])
        return lines.read_lines(content, self._settings.max_body_bytes)

    async def validate(self) -> bool:
        """Checks every line; a batch with any invalid line is failed with ``errors`` naming them."""
        endpoint, seen, errors, total, models = self.batch["endpoint"], set(), [], 0, []
        step = TimeSlice()  # a file of many lines is checked without holding the edge's loop
        async for raw in self._input():
            total += 1
            await step.pause()
            try:
                checked = await self._parse(raw, endpoint)
                if checked.line.custom_id in seen:
                    errors.append(_duplicate(raw.number))
                    del errors[MAX_LISTED_ERRORS:]
                    continue
                seen.add(checked.line.custom_id)
                lines.check_line(self._state, self.job, checked, endpoint)
                if not models:
                    models.append(getattr(checked.body, "model", ""))
            except ServiceError as exc:
                errors.append(_line_error(raw.number, exc))
                del errors[MAX_LISTED_ERRORS:]  # bounded, however many lines are wrong
        if total == 0:
            errors.append(_batch_error("empty_file", "The input file has no lines."))
        if total > self._settings.batches_max_lines:
            limit = self._settings.batches_max_lines
            errors.append(_batch_error("too_many_lines", f"The input file has {total} lines; at most {limit}."))
        now = int(time.time())
        if errors:
            await self._save(
                status="failed",
                failed_at=now,
                errors={"object": "list", "data": errors},
                request_counts={"total": total, "completed": 0, "failed": 0},
            )
            return False
        await self._save(
            status="in_progress",
            in_progress_at=now,
            request_counts={"total": total, "completed": 0, "failed": 0},
            model=models[0],  # the model of the first line, as OpenAI reports one per batch
        )
        return True

    async def run_lines(self) -> None:
        endpoint, chunk = self.batch["endpoint"], []
        async for raw in self._input():
            if raw.index in self.done:
                continue
            chunk.append(raw)
            if len(chunk) >= self._settings.batches_chunk_lines:
                await self._run_chunk(endpoint, chunk)
                chunk = []
        if chunk:
            await self._run_chunk(endpoint, chunk)

    async def _run_chunk(self, endpoint: str, chunk: list[lines.RawLine]) -> None:
        slots = asyncio.Semaphore(self._settings.batches_line_concurrency)
        finished: list[dict[str, Any]] = []

        async def one(raw: lines.RawLine) -> None:
            async with slots:
                if self._must_stop():
                    return
                checked = await self._parse(raw, endpoint)
                ok, result = await lines.run_line(self._state, self.job, endpoint, checked)
                finished.append({"line": raw.index, "ok": ok, "result": result})

        results = await asyncio.gather(*(one(raw) for raw in chunk), return_exceptions=True)
        if finished:  # durable before anything else is said about them
            finished.sort(key=lambda each: each["line"])
            await self._objects.put_part(self.job.principal, self.job.id, Part(finished[0]["line"], finished))
            for each in finished:
                self._count(each)
            await self._save_counts()
        for result in results:
            if isinstance(result, BaseException):
                raise result  # NotYet: the batch is retried later, after the lines already written
        if self._must_stop():
            raise _Stop()

    def _count(self, finished: dict[str, Any]) -> None:
        """One finished line (from a part written now or by an earlier worker) in the counts and the usage."""
        self.done.add(finished["line"])
        self.counts["completed" if finished["ok"] else "failed"] += 1
        self.usage.add(finished["result"])

    def _must_stop(self) -> bool:
        return self.cancelled or time.time() >= self.batch["expires_at"]

    async def _parse(self, raw: lines.RawLine, endpoint: str) -> lines.Checked:
        """The line checked, within the JSON budget of any request body."""
        await json_budget.check(raw.data, self._settings.max_json_weight)
        return lines.parse_line(raw, endpoint, self._settings.max_body_bytes)

    # -- records -------------------------------------------------------------------------------
    async def _save(self, **changes: Any) -> None:
        """Writes the Batch object; a cancel written meanwhile by the API is kept."""
        current = await self._objects.get(self.job.principal, self.job.id) or self.batch
        self.batch = {**current, **changes}
        if current.get("status") == "cancelling" and changes.get("status") in ("in_progress", "finalizing"):
            self.batch["status"] = "cancelling"
        await self._objects.put(self.job.principal, self.batch)

    async def _save_counts(self) -> None:
        total = self.batch.get("request_counts", {}).get("total", 0)
        await self._save(request_counts={"total": total, **self.counts}, usage=self.usage.as_openai())

    async def finalize(self, status: str) -> None:
        """Assembles the parts into the output and error files and writes the final Batch object."""
        scope, now = self.job.principal, int(time.time())
        if status == "completed":
            await self._save(status="finalizing", finalizing_at=now)
        expires_at = now + (self.job.output_expiry_seconds or self._settings.files_default_expiry_seconds)
        output_id = await self._assemble(True, "output", expires_at)
        error_id = await self._assemble(False, "error", expires_at)
        final: dict[str, Any] = {"status": status, f"{status}_at": int(time.time())}
        if output_id:
            final["output_file_id"] = output_id
        if error_id:
            final["error_file_id"] = error_id
        total = self.batch.get("request_counts", {}).get("total", 0)
        final["request_counts"] = {"total": total, **self.counts}
        final["usage"] = self.usage.as_openai()
        current = await self._objects.get(scope, self.job.id) or self.batch
        self.batch = {**current, **final}
        await self._objects.put(scope, self.batch)
        await self._objects.drop_parts(scope, self.job.id)
        log.info("batch finished", extra={"batch_id": self.job.id, "status": status})

    async def _assemble(self, ok: bool, kind: str, expires_at: int) -> str:
        """One results file (the lines that succeeded, or those that failed), in input order; "" if none."""
        counts = {"output": self.counts["completed"], "error": self.counts["failed"]}
        if not counts[kind]:
            return ""
        scope, batch_id = self.job.principal, self.job.id

        async def content() -> AsyncIterator[bytes]:
            async for part in self._objects.parts(scope, batch_id):
                data = b"".join(orjson.dumps(each["result"]) + b"\n" for each in part.lines if each["ok"] == ok)
                if data:
                    yield data

        # The id is the batch's own: a finalize re-run after a crash replaces the file, never adds one.
        file_id = f"file-{batch_id.removeprefix('batch_')}{kind}"
        await self._files.put(
            scope,
            content(),
            filename=f"{batch_id}_{kind}.jsonl",
            purpose="batch_output",
            expires_at=expires_at,
            file_id=file_id,
        )
        return file_id

    async def fail_internal(self, cause: BaseException) -> None:
        if isinstance(cause, KeyError):  # the object store lost it: the input file was deleted meanwhile
            error = _batch_error("input_file_deleted", "The batch's input file was deleted before it finished.")
        else:
            error = _batch_error("internal_error", "The batch failed on the server.")
        self.batch = self.batch or (await self._objects.get(self.job.principal, self.job.id)) or {}
        if self.batch and self.batch.get("status") not in TERMINAL:
            await self._save(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [error]})


def _batch_error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": None}


def _duplicate(number: int) -> dict[str, Any]:
    return {
        "code": "duplicate_custom_id",
        "message": "The custom_id of this line is used by an earlier line.",
        "param": "custom_id",
        "line": number,
    }


def _line_error(number: int, exc: ServiceError) -> dict[str, Any]:
    envelope = exc.envelope()["error"]
    return {
        "code": envelope.get("code") or "invalid_request",
        "message": envelope["message"],
        "param": exc.param,
        "line": number,
    }
