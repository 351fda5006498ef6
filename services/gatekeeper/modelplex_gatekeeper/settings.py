from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from modelplex_kit.settings import GrpcServiceSettings

#: The keys file `make run` uses, and the CLI's default (relative to the repository root).
DEFAULT_KEYS_FILE = Path(".modelplex/keys.yaml")


class GatekeeperSettings(GrpcServiceSettings):
    """Gatekeeper settings (env prefix ``MODELPLEX_GATEKEEPER_``)."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_GATEKEEPER_", extra="ignore")

    # A unix socket in a pod (unix:///run/modelplex/gatekeeper.sock) or a loopback port.
    listen: str = "127.0.0.1:50070"
    keys_file: Path = Field(
        DEFAULT_KEYS_FILE, validation_alias=AliasChoices("MODELPLEX_KEYS_FILE", "MODELPLEX_GATEKEEPER_KEYS_FILE")
    )
    # `make run` only: a missing keys file is created holding this key (generous limits). Never in a cluster.
    dev_key_if_missing: SecretStr | None = None
    # How often the keys file is checked for changes (edits apply within twice this).
    reload_seconds: float = 0.5
    # Empty: limits live in this process (one replica). Set: shared by every replica through Redis.
    redis_url: str = ""
    # What a decision does while Redis is unreachable: "open" falls back onto this process's own
    # limiter, "closed" answers 503 with Retry-After.
    redis_failure: Literal["open", "closed"] = "open"
    # After a Redis failure, how long decisions skip Redis before trying it again.
    redis_retry_seconds: float = 1.0
    redis_timeout_seconds: float = 0.25
    # Durable usage records: a Redis stream when Redis is used, else this append-only JSONL file.
    usage_file: Path = Path(".modelplex/usage.jsonl")
    usage_stream: str = "modelplex:usage"
    # A concurrency slot whose request never reported back (its edge died) is freed after this long.
    slot_ttl_seconds: float = 900.0
    # How long a quota lease lasts (an allowance of requests, tokens and slots the edge spends
    # in-process). Past it the edge renews or returns it; a dead sidecar shows within this long.
    lease_seconds: float = 1.0
