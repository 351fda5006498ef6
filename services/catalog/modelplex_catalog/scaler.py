"""The scaler KEDA asks: its external scaler contract (``externalscaler.ExternalScaler``) over the demand
that backends, edges and the jobs process report (``modelplex.v1.DemandService``, ``modelplex_kit.demand``).

A ScaledObject names what it scales by its trigger's metadata::

    triggers:
      - type: external-push
        metadata:
          scalerAddress: modelplex-catalog.<namespace>.svc:50051
          key: <catalog model id, or "jobs">
          targetPerReplica: "16"

- ``IsActive`` / ``StreamIsActive``: the key has demand (a request held for a cold start, one in flight,
  work queued). The stream sends the current answer at once and then every change as it is reported: the
  first request held for a model at zero replicas reaches KEDA within milliseconds, not at its next poll.
- ``GetMetricSpec``: one metric, ``demand``, with ``targetPerReplica`` (default 8) as its target size.
- ``GetMetrics``: held + in flight (summed over reporters) + queued (the largest report: every reporter of a
  key sees the same engines' queues and the same job queues).

Scale-down is the HPA's and KEDA's (``cooldownPeriod``); an engine replica leaving is drained by its pod's
``preStop`` while the backends' pools stop picking it (its endpoint turns terminating).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from externalscaler import externalscaler_pb2, externalscaler_pb2_grpc
from modelplex.v1 import demand_pb2, demand_pb2_grpc
from modelplex_kit.demand import Demand

log = logging.getLogger(__name__)

METRIC = "demand"
KEY_FIELD, TARGET_FIELD = "key", "targetPerReplica"
DEFAULT_TARGET_PER_REPLICA = 8.0
#: How often an open StreamIsActive looks again without a report (a reporter's figures lapsing).
_LAPSE_CHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class _Report:
    demand: Demand
    expires_at: float


class DemandBoard:
    """The latest report of every reporter, per key; watchers of a key are woken by each report for it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._reports: dict[str, dict[str, _Report]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._clock = clock

    def report(self, key: str, reporter: str, demand: Demand, ttl_seconds: float) -> None:
        reports = self._reports.setdefault(key, {})
        if ttl_seconds <= 0:
            reports.pop(reporter, None)
        else:
            reports[reporter] = _Report(demand, self._clock() + ttl_seconds)
        event = self._changed.get(key)
        if event is not None:
            event.set()

    def demand(self, key: str) -> Demand:
        now = self._clock()
        reports = self._reports.get(key, {})
        for reporter in [r for r, report in reports.items() if report.expires_at <= now]:
            del reports[reporter]
        live = [report.demand for report in reports.values()]
        return Demand(
            held=sum(d.held for d in live),
            in_flight=sum(d.in_flight for d in live),
            queued=max((d.queued for d in live), default=0),
        )

    def changed(self, key: str) -> asyncio.Event:
        return self._changed.setdefault(key, asyncio.Event())


class _Refused(Exception):
    pass


def _target_per_replica(ref: externalscaler_pb2.ScaledObjectRef) -> float:
    raw = ref.scalerMetadata.get(TARGET_FIELD, "")
    try:
        value = float(raw) if raw else DEFAULT_TARGET_PER_REPLICA
    except ValueError:
        raise _Refused(f"{TARGET_FIELD} must be a number, got {raw!r}") from None
    if value <= 0:
        raise _Refused(f"{TARGET_FIELD} must be positive, got {raw!r}")
    return value


class ExternalScalerServicer(externalscaler_pb2_grpc.ExternalScalerServicer):
    def __init__(self, board: DemandBoard) -> None:
        self._board = board

    async def _key_or_abort(self, ref: externalscaler_pb2.ScaledObjectRef, context: grpc.aio.ServicerContext) -> str:
        key = ref.scalerMetadata.get(KEY_FIELD, "")
        if not key:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"trigger metadata needs {KEY_FIELD!r} (a model id, or 'jobs'); "
                f"ScaledObject {ref.namespace}/{ref.name}",
            )
        return key

    async def IsActive(self, request, context):
        key = await self._key_or_abort(request, context)
        return externalscaler_pb2.IsActiveResponse(result=self._board.demand(key).total > 0)

    async def StreamIsActive(self, request, context) -> AsyncIterator[externalscaler_pb2.IsActiveResponse]:
        key = await self._key_or_abort(request, context)
        changed = self._board.changed(key)
        last: bool | None = None
        while True:
            changed.clear()
            active = self._board.demand(key).total > 0
            if active != last:
                last = active
                yield externalscaler_pb2.IsActiveResponse(result=active)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), _LAPSE_CHECK_S)

    async def GetMetricSpec(self, request, context):
        await self._key_or_abort(request, context)
        try:
            target = _target_per_replica(request)
        except _Refused as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        spec = externalscaler_pb2.MetricSpec(
            metricName=METRIC, targetSize=max(1, round(target)), targetSizeFloat=target
        )
        return externalscaler_pb2.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(self, request, context):
        key = await self._key_or_abort(request.scaledObjectRef, context)
        total = self._board.demand(key).total
        value = externalscaler_pb2.MetricValue(
            metricName=request.metricName or METRIC, metricValue=total, metricValueFloat=float(total)
        )
        return externalscaler_pb2.GetMetricsResponse(metricValues=[value])


class DemandServicer(demand_pb2_grpc.DemandServiceServicer):
    def __init__(self, board: DemandBoard) -> None:
        self._board = board

    async def Report(self, request, context):
        if not request.key or not request.reporter:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a demand report names its key and reporter")
        demand = Demand(held=max(0, request.held), in_flight=max(0, request.in_flight), queued=max(0, request.queued))
        self._board.report(request.key, request.reporter, demand, request.ttl_seconds)
        return demand_pb2.DemandReportResponse()


def register(server: grpc.aio.Server, board: DemandBoard) -> list[str]:
    """Adds both services; returns their names (for health and reflection)."""
    externalscaler_pb2_grpc.add_ExternalScalerServicer_to_server(ExternalScalerServicer(board), server)
    demand_pb2_grpc.add_DemandServiceServicer_to_server(DemandServicer(board), server)
    return [
        externalscaler_pb2.DESCRIPTOR.services_by_name["ExternalScaler"].full_name,
        demand_pb2.DESCRIPTOR.services_by_name["DemandService"].full_name,
    ]
