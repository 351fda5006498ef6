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
        # Leases granted through this stream and not yet returned (ticket -> slots): their slots are
        # freed if the stream ends first (the edge died holding them).
        leases: dict[str, int] = {}
        writing = asyncio.Lock()  # replies and revocations share the stream
        pushes: set[asyncio.Task] = set()

        async def push(names: list[str]) -> None:
            async with writing:
                await context.write(pb.AdmitReplies(revoked=names))

        def revoked(names: list[str]) -> None:
            task = asyncio.get_running_loop().create_task(push(names))
            pushes.add(task)
            task.add_done_callback(pushes.discard)

        self.gate.keys.listen(revoked)
        try:
            async for batch in batches:
                for account in batch.accounts:
                    held.discard(account.ticket)
                    await self._account(account)
                for returned in batch.returns:
                    leases.pop(returned.ticket, None)
                    await self._give_back(returned)
                if batch.admits:
                    replies = await self._admit_all(batch.admits)
                    for reply in replies:
                        if reply.ticket:
                            held.add(reply.ticket)
                        if reply.HasField("lease"):
                            leases[reply.lease.ticket] = reply.lease.slots
                    async with writing:
                        await context.write(pb.AdmitReplies(replies=replies))
        finally:
            self.gate.keys.unlisten(revoked)
            for task in pushes:
                task.cancel()
            if held or leases:
                log.warning(
                    "an edge stream ended with requests in flight or leases held; releasing their slots",
                    extra={"slots": len(held), "leases": len(leases)},
                )
                releases = [self.gate.release(t) for t in held]
                releases += [self.gate.give_back(pb.LeaseReturn(ticket=t, slots=n)) for t, n in leases.items()]
                # Shielded: a stream that ended because its edge died is being cancelled, and a second
                # cancel of this handler must not cancel the releases with it (they would never run).
                await asyncio.shield(asyncio.gather(*releases, return_exceptions=True))

    async def _admit_all(self, admits) -> list[pb.AdmitReply]:
        if len(admits) == 1:
            return [await self.gate.admit(admits[0])]
        return list(await asyncio.gather(*(self.gate.admit(a) for a in admits)))

    async def _account(self, account: pb.AccountRequest) -> None:
        try:
            await self.gate.account(account)
        except Exception:  # one bad record must not end the edge's stream
            log.exception("accounting failed")

    async def _give_back(self, returned: pb.LeaseReturn) -> None:
        try:
            await self.gate.give_back(returned)
        except Exception:  # a lost return only leaves units to come back with time
            log.exception("returning a lease failed")
