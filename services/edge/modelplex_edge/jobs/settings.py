"""The jobs process's own settings (env prefix ``MODELPLEX_JOBS_``); the rest it shares with the edge
(``EdgeSettings``: stores, catalog and gatekeeper targets, backend timeouts, worker counts and leases)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Beside the edge's 8080 (`make run` serves both on loopback).
DEFAULT_PORT = 8081


class JobsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLEX_JOBS_", extra="ignore")

    # /healthz, /readyz (ready once the catalog is known) and /metrics (Prometheus).
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    # The scaler that demand is reported to (modelplex_kit.demand; the catalog's gRPC address), under the key
    # "jobs": queued jobs over both queues and the jobs running here. Empty: nothing is reported.
    demand_target: str = ""
    # How often demand is reported, and the queues' depths sampled for it (and for /metrics).
    demand_interval_seconds: float = Field(2.0, gt=0)
