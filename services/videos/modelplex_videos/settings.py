from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelplex_kit.modalities.videos import OPENAI_MAX_PROMPT_CHARS, OPENAI_SECONDS, OPENAI_SIZES
from modelplex_kit.objectstore import ObjectStoreSettings
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.settings import GrpcServiceSettings

_DEFAULT_DATA_DIR = str(Path(tempfile.gettempdir()) / "modelplex-videos")


class VideosSettings(GrpcServiceSettings, ObjectStoreSettings, PoolSettings):
    """Videos backend settings (env prefix ``MODELPLEX_VIDEOS_``); the content store's are ``OBJECT_STORE*``,
    the triton engine's replicas ``UPSTREAM_URL`` and ``POOL_*`` (modelplex_kit.pools)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_VIDEOS_", extra="ignore")

    listen: str = "127.0.0.1:50064"
    # Which adapter renders: one setting, one adapter file.
    # A row of adapters.ENGINES (an unknown name stops startup with the known ones).
    engine: str = "procedural"
    sizes: str = ",".join(OPENAI_SIZES)
    seconds: str = ",".join(str(s) for s in OPENAI_SECONDS)
    # Longest prompt in characters, checked here as well as at the edge (OpenAI's 32000 by default).
    max_prompt_chars: int = Field(OPENAI_MAX_PROMPT_CHARS, ge=1)

    # -- jobs
    # sqlite: one replica, jobs in <data_dir>/jobs.sqlite3. redis: several replicas share redis_url.
    store: Literal["sqlite", "redis"] = "sqlite"
    # Jobs (sqlite), and finished content with the local object store (object_store_dir overrides it).
    data_dir: str = _DEFAULT_DATA_DIR
    redis_url: str = ""
    # Jobs rendered at once by this replica.
    workers: int = Field(2, ge=1)
    # Queued jobs beyond these get 429 with Retry-After.
    max_queue: int = Field(64, ge=1)
    max_queue_per_principal: int = Field(16, ge=1)
    # A worker that stops renewing its claim this long is presumed dead; its job is re-run.
    lease_seconds: float = Field(15.0, gt=0)
    # Idle workers look for new jobs this often.
    poll_seconds: float = Field(0.2, gt=0)
    # After the engine answered UNAVAILABLE (its model not loaded, its server down), a worker puts the job
    # back and waits this long before claiming again: no busy loop against an engine that is down.
    unavailable_backoff_seconds: float = Field(2.0, gt=0)
    # Finished content is deleted this long after completion (the row is kept, marked expired).
    content_ttl_seconds: int = Field(24 * 3600, ge=1)
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=1)
    sweep_seconds: float = Field(60.0, gt=0)

    # -- procedural engine
    fps: int = Field(8, ge=1, le=60)

    # -- triton engine: host:port of Triton's gRPC endpoint (upstream_url, PoolSettings': several,
    # separated by commas, make an engine pool) and the model name there.
    upstream_model: str = ""
    upstream_timeout_seconds: float = 600.0

    def size_list(self) -> list[str]:
        return [s.strip() for s in self.sizes.split(",") if s.strip()]

    def seconds_list(self) -> list[int]:
        return [int(s) for s in self.seconds.split(",") if s.strip()]

    @property
    def content_dir(self) -> Path:
        return Path(self.data_dir) / "content"

    @property
    def sqlite_path(self) -> Path:
        return Path(self.data_dir) / "jobs.sqlite3"
