"""Video jobs in Redis, for several videos replicas sharing one queue (``store: redis``).

The queue is modelplex_kit.jobqueue.RedisJobStore (its docstring has the key layout), under the prefix
``modelplex:videos:``.
"""

from __future__ import annotations

from modelplex_kit import jobqueue
from modelplex_videos.jobs import VIDEO_JOBS


class RedisJobStore(jobqueue.RedisJobStore):
    def __init__(self, url: str, idempotency_ttl_seconds: int) -> None:
        if not url:
            raise SystemExit("videos: store redis needs redis_url (e.g. redis://redis:6379/0)")
        super().__init__(VIDEO_JOBS, url, idempotency_ttl_seconds)
