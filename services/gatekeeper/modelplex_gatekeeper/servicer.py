"""GatekeeperService: one bidirectional stream per edge process carries all its admissions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex.v1 import gatekeeper_pb2_grpc
from modelplex_gatekeeper.gate import Gate

log = logging.getLogger(__name__)


class GatekeeperServicer(gatekeeper_pb2_grpc.GatekeeperServiceServicer):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def Gate(self, batches: AsyncIterator[pb.GateBatch], context: grpc.aio.ServicerContext) -> None:
        # Tickets admitted through this stream and not yet accounted: freed if the stream ends first.
        held: set[str] = set()
        try:
            async for batch in batches:
                for account in batch.accounts:
                    held.discard(account.ticket)
                    await self._account(account)
                if batch.admits:
                    replies = await self._admit_all(batch.admits)
                    held.update(reply.ticket for reply in replies if reply.ticket)
                    await context.write(pb.AdmitReplies(replies=replies))
        finally:
            if held:
                log.warning(
                    "an edge stream ended with requests in flight; releasing their slots", extra={"slots": len(held)}
                )
                await asyncio.gather(*(self.gate.release(t) for t in held), return_exceptions=True)

    async def _admit_all(self, admits) -> list[pb.AdmitReply]:
        if len(admits) == 1:
            return [await self.gate.admit(admits[0])]
        return list(await asyncio.gather(*(self.gate.admit(a) for a in admits)))

    async def _account(self, account: pb.AccountRequest) -> None:
        try:
            await self.gate.account(account)
        except Exception:  # one bad record must not end the edge's stream
            log.exception("accounting failed")
