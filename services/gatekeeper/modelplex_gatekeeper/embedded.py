"""The gatekeeper inside another process (the edge): the same decisions, no gRPC hop.

The edge uses only this facade (admit, account, close), never the Gate's or the store's insides.
"""

from __future__ import annotations

import asyncio

from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex_gatekeeper.runtime import Gatekeeper
from modelplex_gatekeeper.settings import GatekeeperSettings


class EmbeddedGatekeeper:
    """Configured by the gatekeeper's own settings (MODELPLEX_KEYS_FILE, MODELPLEX_GATEKEEPER_*).

    Accounts to Redis run in the background so that its round trip never delays a response, and
    those of one turn of the event loop go in one call (one round trip for all of them); in memory
    they are immediate. Construct inside a running loop.
    """

    def __init__(self, settings: GatekeeperSettings | None = None) -> None:
        self._gatekeeper = Gatekeeper(settings or GatekeeperSettings())
        self._gate = self._gatekeeper.gate
        self._accounts: set[asyncio.Task] = set()
        self._queued: list[pb.AccountRequest] = []
        self._flush: asyncio.Handle | None = None

    async def admit(self, request: pb.AdmitRequest) -> pb.AdmitReply:
        return await self._gate.admit(request)

    async def account(self, request: pb.AccountRequest) -> None:
        if not self._gate.remote:
            await self._gate.account(request)
            return
        self._queued.append(request)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._send_queued)

    def _send_queued(self) -> None:
        """Sends this turn's accounts as one batch, in the background."""
        self._flush = None
        batch, self._queued = self._queued, []
        task = asyncio.create_task(self._gate.account_many(batch))
        self._accounts.add(task)
        task.add_done_callback(self._accounts.discard)

    async def close(self) -> None:
        """Sends what is queued, waits for the accounts still on their way, then closes the store
        (nothing metered is lost)."""
        if self._flush is not None:
            self._flush.cancel()
            self._send_queued()
        await asyncio.gather(*self._accounts, return_exceptions=True)
        await self._gatekeeper.close()
