"""The gatekeeper inside another process (the edge): the same Gate, no gRPC hop."""

from __future__ import annotations

import asyncio

from modelplex_gatekeeper.gate import Gate
from modelplex_gatekeeper.keys import KeyRing, ensure_dev_file
from modelplex_gatekeeper.settings import GatekeeperSettings
from modelplex_gatekeeper.store import build_store


def embedded_gate(settings: GatekeeperSettings | None = None) -> tuple[Gate, asyncio.Task]:
    """A Gate from the gatekeeper's settings, and the task that follows the keys file (call in a running loop)."""
    settings = settings or GatekeeperSettings()
    if settings.dev_key_if_missing is not None:
        ensure_dev_file(settings.keys_file, settings.dev_key_if_missing.get_secret_value())
    keys = KeyRing(settings.keys_file)
    following = asyncio.get_running_loop().create_task(keys.follow(settings.reload_seconds))
    return Gate(keys, build_store(settings)), following
