"""/v1/batches: create, retrieve, list (paginated), cancel. Run by endpoints.batches.worker.

A batch is visible to the keys of the project that created it and to no other (404). Creating one checks
the key (its lines are metered to it later, outside its RPM/TPM), the input file (this project's, purpose
``batch``) and the project's enqueued batch tokens (a 429 beyond ``MODELPLEX_EDGE_BATCHES_MAX_ENQUEUED_TOKENS``
while earlier batches run; a 400 for a batch larger than the whole limit); the lines are validated by the
worker (``validating``).
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from fastapi import APIRouter, Request
from starlette.responses import Response

from modelplex_edge import pipeline
from modelplex_edge.admission import Admitted
from modelplex_edge.endpoints.batches.lines import ROUTES
from modelplex_edge.endpoints.batches.protocol import CreateBatchRequest, ListBatchesQuery
from modelplex_edge.endpoints.batches.records import CREATE_ENDPOINT, TERMINAL, BatchJob, BatchObjects, new_batch_id
from modelplex_edge.endpoints.files.store import FileStore
from modelplex_edge.responses import json_response
from modelplex_edge.state import EdgeState
from modelplex_kit import jobqueue
from modelplex_kit.errors import ServiceError, invalid
from modelplex_kit.modalities import text

router = APIRouter()
ENDPOINT = pipeline.Endpoint(CREATE_ENDPOINT, text.MODALITY)
#: A project's batch-token limit frees up as its batches finish: worth retrying after this long.
RETRY_AFTER_SECONDS = 60


def _state(http: Request) -> EdgeState:
    return http.app.state.edge


def _not_found(batch_id: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"No batch found with id '{batch_id}'.", param="batch_id")


def _respond(admitted: Admitted, body: Any) -> Response:
    return json_response(body, headers=admitted.headers or None)


async def _enqueued_tokens(queue: jobqueue.JobStore, scope: str) -> int:
    """Estimated tokens of the scope's batches not finished yet."""
    total, after = 0, ""
    while True:
        jobs, more = await queue.list(scope, after, 100, "asc")
        total += sum(job.tokens for job in jobs if job.status in (jobqueue.QUEUED, jobqueue.IN_PROGRESS))
        if not more or not jobs:
            return total
        after = jobs[-1].id


def _limits(state: EdgeState) -> jobqueue.Limits:
    return jobqueue.Limits(state.settings.batches_max_queue, state.settings.batches_max_queue)


@router.post("/v1/batches")
async def create_batch(http: Request) -> Response:
    body = await pipeline.parse(http, ENDPOINT, CreateBatchRequest)
    admitted = await pipeline.identify(http, ENDPOINT)
    state, scope = _state(http), admitted.scope
    state.admission.hand_off(admitted)  # its lines are accounted with its ticket by the jobs process
    if body.endpoint not in ROUTES:
        raise invalid(f"Invalid value for 'endpoint': batches of '{body.endpoint}' are not served yet.", "endpoint")
    source = await FileStore(state.objects).get(scope, body.input_file_id)
    if source is None:
        raise invalid(f"No such File object: {body.input_file_id}.", "input_file_id")
    if source.purpose != "batch":
        raise invalid(
            f"File {body.input_file_id} has purpose '{source.purpose}'; a batch needs 'batch'.", "input_file_id"
        )
    tokens, limit = source.bytes // 4 + 1, state.settings.batches_max_enqueued_tokens
    if tokens > limit:
        raise invalid(
            f"The input file holds about {tokens} tokens; a batch may enqueue at most {limit}.", "input_file_id"
        )
    enqueued = await _enqueued_tokens(state.batches, scope)
    if enqueued + tokens > limit:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Enqueued token limit reached: this project's unfinished batches hold about {enqueued} tokens, "
            f"this one about {tokens}, and the limit is {limit}. Retry once earlier batches finish.",
            code="token_limit_exceeded",
            headers={"retry-after": str(RETRY_AFTER_SECONDS)},
        )
    now = int(time.time())
    batch: dict[str, Any] = {
        "id": new_batch_id(),
        "object": "batch",
        "endpoint": body.endpoint,
        "input_file_id": body.input_file_id,
        "completion_window": body.completion_window,
        "status": "validating",
        "created_at": now,
        "expires_at": now + state.settings.batches_window_seconds,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.metadata,
    }
    objects = BatchObjects(state.objects)
    await objects.put(scope, batch)
    job = BatchJob(
        id=batch["id"],
        principal=scope,
        principal_id=admitted.principal_id,
        project=admitted.project,
        ticket=admitted.ticket,
        tokens=tokens,
        models="\n".join(admitted.models),
        output_expiry_seconds=body.output_expires_after.seconds if body.output_expires_after else 0,
        created_at=now,
    )
    await state.batches.create(job, _limits(state))  # 429 when the queue is full (the record stays unlisted)
    if state.jobs_demand is not None:
        state.jobs_demand.enqueued()  # a jobs process scaled to zero is started now
    return _respond(admitted, batch)


async def _current(state: EdgeState, scope: str, batch_id: str) -> dict[str, Any] | None:
    """The Batch object; one whose job the queue gave up on (its workers kept dying) is failed now."""
    objects = BatchObjects(state.objects)
    batch = await objects.get(scope, batch_id)
    if batch is None or batch["status"] in TERMINAL:
        return batch
    job = await state.batches.get(scope, batch_id)
    if job is not None and job.status == jobqueue.FAILED:
        error = {"code": job.error_code or "internal_error", "message": job.error_message, "param": None, "line": None}
        batch = {
            **batch,
            "status": "failed",
            "failed_at": job.completed_at or int(time.time()),
            "errors": {"object": "list", "data": [error]},
        }
        await objects.put(scope, batch)
    return batch


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, http: Request) -> Response:
    admitted = await pipeline.identify(http, ENDPOINT)
    batch = await _current(_state(http), admitted.scope, batch_id)
    if batch is None:
        raise _not_found(batch_id)
    return _respond(admitted, batch)


@router.get("/v1/batches")
async def list_batches(http: Request) -> Response:
    query = await pipeline.query(http, ENDPOINT, ListBatchesQuery)
    admitted = await pipeline.identify(http, ENDPOINT)
    state = _state(http)
    try:
        jobs, more = await state.batches.list(admitted.scope, query.after or "", query.limit, "desc")
    except ServiceError as exc:  # an unknown cursor
        raise invalid(exc.message, "after") from None
    data = [batch for job in jobs if (batch := await _current(state, admitted.scope, job.id)) is not None]
    body = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }
    return _respond(admitted, body)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, http: Request) -> Response:
    """Stops new lines within seconds (the worker's next renewal); the finished lines' results are kept
    and the batch ends ``cancelled`` with them. A finished batch is returned as it is."""
    admitted = await pipeline.identify(http, ENDPOINT)
    state, scope = _state(http), admitted.scope
    objects = BatchObjects(state.objects)
    batch = await objects.get(scope, batch_id)
    if batch is None:
        raise _not_found(batch_id)
    if batch["status"] in TERMINAL or batch["status"] == "cancelling":
        return _respond(admitted, batch)
    await objects.request_cancel(scope, batch_id)
    batch = {**batch, "status": "cancelling", "cancelling_at": int(time.time())}
    await objects.put(scope, batch)  # a queued batch is finalized cancelled by the next worker to claim it
    return _respond(admitted, batch)
