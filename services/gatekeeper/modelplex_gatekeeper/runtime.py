"""The gatekeeper's parts from its settings: the keys (following their file), the store, the Gate.

The sidecar (``__main__``) and the embedded mode (``embedded``) both start from here, so the
store modules need not know about settings (and ``store`` never imports ``redis_store``).
"""

from __future__ import annotations

import asyncio

from modelplex_gatekeeper.gate import Gate
from modelplex_gatekeeper.keys import KeyRing, ensure_dev_file
from modelplex_gatekeeper.redis_store import FailoverStore, RedisStore
from modelplex_gatekeeper.settings import GatekeeperSettings
from modelplex_gatekeeper.store import MemoryStore, Store, UsageLog


def build_store(settings: GatekeeperSettings) -> Store:
    """The store the settings ask for: memory, or Redis with this process's memory as the outage fallback."""
    local = MemoryStore(settings.slot_ttl_seconds, UsageLog(settings.usage_file))
    if not settings.redis_url:
        return local
    remote = RedisStore(
        settings.redis_url, settings.slot_ttl_seconds, settings.usage_stream, settings.redis_timeout_seconds
    )
    return FailoverStore(remote, local, settings.redis_failure, settings.redis_retry_seconds)


class Gatekeeper:
    """A running gatekeeper: its Gate, and the task that follows the keys file. Start inside a running loop."""

    def __init__(self, settings: GatekeeperSettings) -> None:
        if settings.dev_key_if_missing is not None:
            ensure_dev_file(settings.keys_file, settings.dev_key_if_missing.get_secret_value())
        self.keys = KeyRing(settings.keys_file)
        self.gate = Gate(self.keys, build_store(settings), lease_seconds=settings.lease_seconds)
        self._following = asyncio.get_running_loop().create_task(self.keys.follow(settings.reload_seconds))

    async def close(self) -> None:
        self._following.cancel()
        await self.gate.store.close()
