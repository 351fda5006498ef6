"""Demand for a scaling target, pushed to the scaler KEDA asks (``modelplex_catalog.scaler``).

A process that sees demand for a target (a backend: requests it holds for a cold start, runs, and its
engines' queues; an edge or the jobs process: queued and running jobs) reports it under the target's
key (a catalog model id, or ``jobs``) every ``interval_seconds``, and at once when ``poke()`` is called:
the first request held for a model scaled to zero pokes, so KEDA's ``StreamIsActive`` hears of it in
milliseconds rather than at its next poll. Reports are coalesced (a burst of pokes is one or two calls)
and never block the caller; a scaler that cannot be reached is logged as an outage and retried at the
next tick. Each report lapses after three intervals, so a reporter that died stops counting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from modelplex.v1 import demand_pb2, demand_pb2_grpc
from modelplex_kit.connections import KEEPALIVE
from modelplex_kit.outages import OutageLog

log = logging.getLogger(__name__)

#: A report stands this many intervals without another.
_TTL_INTERVALS = 3
#: One report's deadline: a scaler slower than this is down for this tick.
_REPORT_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Demand:
    #: Requests waiting for a replica to start (none is ready).
    held: int = 0
    #: Requests (or jobs) running on the target.
    in_flight: int = 0
    #: Work waiting in the target's own queues (engines' waiting requests, queued jobs).
    queued: int = 0

    @property
    def total(self) -> int:
        return self.held + self.in_flight + self.queued


def reporter_id() -> str:
    """This process, unique across restarts (a restarted pod keeps its hostname)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class DemandReporter:
    """Reports ``read()`` under ``key`` to the scaler at ``target``; an empty target reports nothing."""

    def __init__(
        self,
        target: str,
        key: str,
        read: Callable[[], Demand],
        interval_seconds: float = 2.0,
        outage_summary_seconds: float = 60.0,
    ) -> None:
        self._target, self._key, self._read = target, key, read
        self._interval = interval_seconds
        self._reporter = reporter_id()
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._outage = OutageLog(log, f"demand reports to {target}", summary_seconds=outage_summary_seconds)

    @property
    def enabled(self) -> bool:
        return bool(self._target)

    def start(self) -> None:
        """On the serving event loop (a call from a coroutine)."""
        if self.enabled and self._task is None:
            self._channel = grpc.aio.insecure_channel(self._target, options=KEEPALIVE.client_options())
            self._task = asyncio.create_task(self._run())

    def poke(self) -> None:
        """Report now (coalesced with any report already due)."""
        self._poked.set()

    async def close(self) -> None:
        """Withdraws this reporter's figures (a scaled-in replica's demand must not linger) and stops."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
            await self._send(Demand(), ttl_seconds=0.0)
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._interval)
            self._poked.clear()
            try:
                await self._send(self._read(), ttl_seconds=self._interval * _TTL_INTERVALS)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                self._outage.failed(f"report failed ({type(exc).__name__})", "reports failed")
            else:
                self._outage.recovered()

    async def _send(self, demand: Demand, ttl_seconds: float) -> None:
        assert self._channel is not None
        stub = demand_pb2_grpc.DemandServiceStub(self._channel)
        report = demand_pb2.DemandReport(
            key=self._key,
            reporter=self._reporter,
            held=demand.held,
            in_flight=demand.in_flight,
            queued=demand.queued,
            ttl_seconds=ttl_seconds,
        )
        await stub.Report(report, timeout=_REPORT_TIMEOUT_S)
