"""Durable video jobs: the record, and the shared job queue (modelplex_kit.jobqueue) bound to it.

A job is visible only to the principal that created it. Workers *claim* a
queued job under a lease they keep renewing; a job whose lease ran out (its
worker died) is claimed again and re-run from the start. Claims are fair: the
next job goes to the principal served longest ago, so one busy project cannot
starve the others. ``store: redis`` (modelplex_videos.redis_store) implements
the same interface for several replicas. The queue itself lives in the kit,
shared with the edge's background responses.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from modelplex_kit import jobqueue
from modelplex_kit.errors import ServiceError
from modelplex_kit.jobqueue import (  # noqa: F401  (re-exported: the videos service's names)
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    MAX_ATTEMPTS,
    QUEUED,
    JobStore,
    Limits,
    idempotency_conflict,
    idempotency_mismatch,
)


@dataclass(slots=True, kw_only=True)
class Job(jobqueue.JobRecord):
    """One video render."""

    model: str
    prompt: str
    width: int
    height: int
    seconds: int
    seed: int
    remixed_from: str = ""
    has_reference: bool = False


VIDEO_JOBS = jobqueue.JobKind(
    record=Job, noun="video", id_param="video_id", gave_up="Video generation failed repeatedly.",
    redis_prefix="modelplex:videos:",
)


def new_job_id() -> str:
    return "video_" + secrets.token_hex(16)


def queue_full(scope: str) -> ServiceError:
    return VIDEO_JOBS.queue_full(scope)


def not_found(video_id: str) -> ServiceError:
    return VIDEO_JOBS.not_found(video_id)


def body_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class SQLiteJobStore(jobqueue.SQLiteJobStore):
    """Video jobs in one SQLite file: for a single videos replica."""

    def __init__(self, path: Path, idempotency_ttl_seconds: int) -> None:
        super().__init__(VIDEO_JOBS, path, idempotency_ttl_seconds)
