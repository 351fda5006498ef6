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

# How long the slots of a stream that ended wait for its edge to reconnect and resume them. Long enough
# for a reconnect (milliseconds); short, because an edge that died leaves its slots taken until then.
RESUME_WINDOW_SECONDS = 10.0


class GatekeeperServicer(gatekeeper_pb2_grpc.GatekeeperServiceServicer):
    def __init__(self, gate: Gate, resume_window_seconds: float = RESUME_WINDOW_SECONDS) -> None:
        self.gate = gate
        self._resume_window = resume_window_seconds
        # Tickets of ended streams, waiting to be resumed or accounted before their slots are released.
        self._orphans: dict[str, asyncio.TimerHandle] = {}
        # Which stream's held set holds each ticket: a ticket resumed elsewhere leaves its old stream's.
        self._holder: dict[str, set[str]] = {}

    async def Gate(self, batches: AsyncIterator[pb.GateBatch], context: grpc.aio.ServicerContext) -> None:
        # Tickets admitted through (or resumed on) this stream and not yet accounted.
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
                for ticket in batch.resumed:
                    self._hold(ticket, held)
                if batch.accounts:
                    for account in batch.accounts:
                        self._forget(account.ticket)
                    await self._account_all(batch.accounts)
                for returned in batch.returns:
                    leases.pop(returned.ticket, None)
                    await self._give_back(returned)
                if batch.admits:
                    replies = await self._admit_all(batch.admits)
                    for reply in replies:
                        if reply.ticket:
                            self._hold(reply.ticket, held)
                        if reply.HasField("lease"):
                            leases[reply.lease.ticket] = reply.lease.slots
                    async with writing:
                        await context.write(pb.AdmitReplies(replies=replies))
        finally:
            self.gate.keys.unlisten(revoked)
            for task in pushes:
                task.cancel()
            self._orphan(held)
            if leases:
                # A lease is not resumed on the edge's next stream (the edge drops its leases with the
                # stream): its slots are released at once.
                log.warning("an edge stream ended holding leases; releasing their slots", extra={"leases": len(leases)})
                returns = [self.gate.give_back(pb.LeaseReturn(ticket=t, slots=n)) for t, n in leases.items()]
                # Shielded: a stream that ended because its edge died is being cancelled, and a second
                # cancel of this handler must not cancel the returns with it (they would never run).
                await asyncio.shield(asyncio.gather(*returns, return_exceptions=True))

    def _hold(self, ticket: str, held: set[str]) -> None:
        self._forget(ticket)
        held.add(ticket)
        self._holder[ticket] = held

    def _forget(self, ticket: str) -> None:
        """The ticket is no stream's any more (accounted, or about to be held by another stream)."""
        timer = self._orphans.pop(ticket, None)
        if timer is not None:
            timer.cancel()
        holder = self._holder.pop(ticket, None)
        if holder is not None:
            holder.discard(ticket)

    def _orphan(self, held: set[str]) -> None:
        """A stream ended with requests in flight: their slots are released unless its edge resumes them
        (a connection aged out or broke) within the window; an edge that died never does."""
        if not held:
            return
        log.info(
            "an edge stream ended with requests in flight; their slots are kept for the edge to resume",
            extra={"slots": len(held), "window_seconds": self._resume_window},
        )
        loop = asyncio.get_running_loop()
        for ticket in list(held):
            self._holder.pop(ticket, None)
            self._orphans[ticket] = loop.call_later(self._resume_window, self._release, ticket)
        held.clear()

    def _release(self, ticket: str) -> None:
        if self._orphans.pop(ticket, None) is None:
            return
        log.warning("an edge never resumed a request in flight; releasing its slot")
        task = asyncio.ensure_future(self.gate.release(ticket))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _admit_all(self, admits) -> list[pb.AdmitReply]:
        if len(admits) == 1:
            return [await self.gate.admit(admits[0])]
        return list(await asyncio.gather(*(self.gate.admit(a) for a in admits)))

    async def _account_all(self, accounts) -> None:
        """The batch's accounts in one store call (with Redis, one round trip instead of one each)."""
        try:
            await self.gate.account_many(accounts)
        except Exception:  # a failed batch must not end the edge's stream
            log.exception("accounting failed", extra={"accounts": len(accounts)})

    async def _give_back(self, returned: pb.LeaseReturn) -> None:
        try:
            await self.gate.give_back(returned)
        except Exception:  # a lost return only leaves units to come back with time
            log.exception("returning a lease failed")
