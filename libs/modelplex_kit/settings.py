"""Typed settings from the environment, one object per service.

Each service subclasses :class:`ServiceSettings` with its own ``env_prefix``;
the fields every service shares are read without the service prefix so one
variable (``MODELPLEX_LOG_LEVEL``) configures the whole stack.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _shared(name: str) -> AliasChoices:
    return AliasChoices(f"MODELPLEX_{name}")


class ServiceSettings(BaseSettings):
    """Settings every Modelplex process understands."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    log_level: str = Field("info", validation_alias=_shared("LOG_LEVEL"))
    log_format: Literal["json", "text"] = Field("json", validation_alias=_shared("LOG_FORMAT"))
    # none: tracing context is still propagated, spans are not exported.
    otel_exporter: Literal["none", "console", "otlp"] = Field("none", validation_alias=_shared("OTEL_EXPORTER"))
    # Port for a separate Prometheus endpoint (gRPC services); 0 disables it.
    metrics_port: int = Field(0, validation_alias=_shared("METRICS_PORT"))
    # Seconds a SIGTERM'd server keeps serving in-flight calls before exiting.
    grace_seconds: float = Field(10.0, validation_alias=_shared("GRACE_SECONDS"))


class GrpcServiceSettings(ServiceSettings):
    """Settings of a gRPC service; subclasses set ``env_prefix`` and a default port."""

    listen: str = "127.0.0.1:50051"
    # Server-side cap on one message; text prompts and images fit well inside.
    max_message_bytes: int = 32 * 1024 * 1024
    # Clients are asked to reconnect after this long (0: never), so edges using round-robin over a
    # headless Service discover backend pods that started after them.
    max_connection_age_seconds: float = Field(300.0, validation_alias=_shared("MAX_CONNECTION_AGE_SECONDS"))
    # How long calls already on an aged-out connection may still run: at least the longest call (the
    # edge's backend deadline, MODELPLEX_EDGE_BACKEND_TIMEOUT_SECONDS), so ageing never ends a call within
    # its deadline. Not the drain grace: see modelplex_kit.connections.
    max_connection_age_grace_seconds: float = Field(
        600.0, ge=0, validation_alias=_shared("MAX_CONNECTION_AGE_GRACE_SECONDS")
    )
    # How often a remote engine's readiness is checked (see grpc_server.serve's ``ready``).
    ready_poll_seconds: float = Field(2.0, gt=0, validation_alias=_shared("READY_POLL_SECONDS"))
    # glibc malloc, set at startup by grpc_server.run (modelplex_kit.memory; 0: glibc's default):
    # arenas (MALLOC_ARENA_MAX; glibc's is 8 per core), so memory freed by one thread is reused by
    # the others, and a fixed mmap threshold, so a request's large buffers go back to the OS.
    malloc_arenas: int = Field(2, ge=0, validation_alias=_shared("MALLOC_ARENAS"))
    malloc_mmap_threshold_bytes: int = Field(1 << 20, ge=0, validation_alias=_shared("MALLOC_MMAP_THRESHOLD_BYTES"))
