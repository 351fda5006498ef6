"""A batch's durable state: its job in the kit's job queue, and its Batch object and parts in the object store.

The job (``BatchJob``, modelplex_kit.jobqueue: SQLite locally, Redis across replicas) is what workers claim
under a lease and what a killed worker's successor re-claims. The Batch object the API returns lives beside
the batch's work in the object store (``batches/<scope>/<id>/``): ``batch.json``; ``cancel``, a marker the
cancel endpoint writes and the running worker notices; and ``parts/<first line>.jsonl``, one object per
chunk of finished lines, each line tagged with its index, so a resumed worker skips every line already
written and the output never repeats a ``custom_id``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from modelplex_edge.admission import Admitted
from modelplex_edge.endpoints.files.store import read_small, scope_key
from modelplex_edge.settings import EdgeSettings
from modelplex_kit import jobqueue
from modelplex_kit.objectstore import ObjectStore
from modelplex_kit.priority import BATCH_CREATE_ENDPOINT, BATCH_LINE_PREFIX

#: The Batch statuses after which nothing changes.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: The endpoint name a batch is created under, and the prefix of its lines' names (see modelplex_kit.priority).
CREATE_ENDPOINT, LINE_PREFIX = BATCH_CREATE_ENDPOINT, BATCH_LINE_PREFIX


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


@dataclass(slots=True, kw_only=True)
class BatchJob(jobqueue.JobRecord):
    """A queued batch: what a worker needs to run and meter it (never the key)."""

    #: The creating request's admission, for metering each line: the ticket names the key.
    principal_id: str = ""
    project: str = ""
    ticket: str = ""
    #: Estimated tokens of its input (bytes / 4): counted against the project's enqueued-token limit.
    tokens: int = 0
    #: The key's model globs, one a line: a line naming another model is refused as the key would be.
    models: str = "*"
    #: output_expires_after.seconds: how long the output and error files live (0: the files' default).
    output_expiry_seconds: int = 0

    def admitted(self, endpoint: str) -> Admitted:
        return Admitted(
            self.principal_id,
            endpoint=LINE_PREFIX + endpoint,
            ticket=self.ticket,
            project=self.project,
            models=tuple(self.models.splitlines()),
        )


@dataclass(slots=True)
class BatchUsage:
    """The tokens of a batch's finished lines, summed into the Batch object's ``usage`` as OpenAI reports it."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0

    def add(self, output_line: dict[str, Any]) -> None:
        """One output line's usage: chat and completions name prompt/completion tokens, embeddings prompt
        tokens only, the Responses API input/output tokens."""
        body = (output_line.get("response") or {}).get("body") or {}
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return
        self.input_tokens += int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0)
        self.output_tokens += int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        self.cached_tokens += int(details.get("cached_tokens", 0) or 0)

    def as_openai(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + self.output_tokens,
        }


BATCH_JOBS = jobqueue.JobKind(
    record=BatchJob,
    noun="batch",
    id_param="batch_id",
    gave_up="The batch's worker failed repeatedly.",
    redis_prefix="modelplex:batches:",
)


def build_queue(settings: EdgeSettings, requeue: bool = False) -> jobqueue.JobStore:
    """``requeue``: this process runs the batches (a SQLite file re-queues what it left running)."""
    if settings.batches_store == "redis":
        return jobqueue.RedisJobStore(BATCH_JOBS, settings.batches_redis_url, 3600, socket_timeout=5.0)
    if settings.batches_store == "sqlite":
        return jobqueue.SQLiteJobStore(BATCH_JOBS, Path(settings.batches_sqlite_path), 3600, requeue=requeue)
    return jobqueue.SQLiteJobStore(BATCH_JOBS, Path(":memory:"), 3600)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


@dataclass(frozen=True, slots=True)
class Part:
    """One chunk of finished lines: each ``{"line": i, "ok": bool, "result": {...}}``."""

    first: int
    lines: list[dict[str, Any]]


class BatchObjects:
    """The object-store side of batches: Batch objects, cancel markers, parts."""

    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects

    @staticmethod
    def _dir(scope: str, batch_id: str) -> str:
        return f"batches/{scope_key(scope)}/{batch_id}/"

    async def get(self, scope: str, batch_id: str) -> dict[str, Any] | None:
        if not batch_id.startswith("batch_") or "/" in batch_id or "." in batch_id:
            return None
        raw = await read_small(self._objects, self._dir(scope, batch_id) + "batch.json")
        return None if raw is None else orjson.loads(raw)

    async def put(self, scope: str, batch: dict[str, Any]) -> None:
        await self._objects.put(self._dir(scope, batch["id"]) + "batch.json", _one(orjson.dumps(batch)))

    async def request_cancel(self, scope: str, batch_id: str) -> None:
        await self._objects.put(self._dir(scope, batch_id) + "cancel", _one(b"1"))

    async def cancel_requested(self, scope: str, batch_id: str) -> bool:
        return await self._objects.stat(self._dir(scope, batch_id) + "cancel") is not None

    async def put_part(self, scope: str, batch_id: str, part: Part) -> None:
        data = b"".join(orjson.dumps(line) + b"\n" for line in part.lines)
        await self._objects.put(self._dir(scope, batch_id) + f"parts/{part.first:08d}.jsonl", _one(data))

    async def parts(self, scope: str, batch_id: str) -> AsyncIterator[Part]:
        """The parts written so far, in line order."""
        async for obj in self._objects.list(self._dir(scope, batch_id) + "parts/"):
            raw = await read_small(self._objects, obj.key)
            if raw is not None:
                first = int(obj.key.rsplit("/", 1)[1].split(".")[0])
                yield Part(first, [orjson.loads(line) for line in raw.splitlines() if line])

    async def drop_parts(self, scope: str, batch_id: str) -> None:
        """Once the results are assembled into files, the parts are not needed."""
        async for obj in self._objects.list(self._dir(scope, batch_id) + "parts/"):
            await self._objects.delete(obj.key)
