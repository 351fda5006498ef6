"""Follows every backend's grpc.health status, so the catalog says which models can serve.

One Health.Watch stream per distinct backend target: the backend pushes each
change (SERVING while its engine is ready), so the catalog publishes it at once
instead of on the next poll. An unreachable backend (no ready pod behind a
headless Service, a crashed process) is not ready; the stream is retried with a
short backoff so a backend that comes up is seen within a second.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplex_catalog.store import CatalogStore
from modelplex_kit.connections import KEEPALIVE

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING


class ReadinessFollower:
    def __init__(self, store: CatalogStore, retry_seconds: float = 1.0) -> None:
        self._store = store
        self._retry = retry_seconds
        self._tasks: dict[str, asyncio.Task] = {}

    async def run(self) -> None:
        """Keeps one follower per backend target of the current catalog."""
        try:
            async for view in self._store.views():
                self._reconcile({model.backend_target for model in view.models})
        finally:
            self._reconcile(set())

    def _reconcile(self, targets: set[str]) -> None:
        gone = set(self._tasks) - targets
        for target in gone:
            self._tasks.pop(target).cancel()
        self._store.forget_readiness(gone)
        for target in targets - set(self._tasks):
            self._tasks[target] = asyncio.create_task(self._follow(target), name=f"readiness {target}")

    async def _follow(self, target: str) -> None:
        backoff = 0.1
        async with grpc.aio.insecure_channel(target, options=self._channel_options()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                answered = False
                try:
                    async for reply in stub.Watch(health_pb2.HealthCheckRequest()):
                        answered, ready = True, reply.status == _SERVING
                        self._mark(target, ready, "" if ready else "backend " + _status_name(reply.status))
                        backoff = 0.1
                except grpc.aio.AioRpcError as exc:
                    # A stream that had answered ended (max connection age, a pod going away):
                    # ask again before calling the backend unreachable, or readiness would flap.
                    if answered:
                        continue
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        # A backend without grpc.health (not a Modelplex one): unknown, so routed.
                        self._mark(target, None, "")
                        backoff = self._retry
                    else:
                        self._mark(target, False, f"backend unreachable ({exc.code().name})")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._retry)

    def _channel_options(self) -> list[tuple[str, int]]:
        # gRPC's own reconnect backoff grows to minutes; a backend that starts must be seen at once.
        retry_ms = int(self._retry * 1000)
        return [
            ("grpc.initial_reconnect_backoff_ms", min(100, retry_ms)),
            ("grpc.min_reconnect_backoff_ms", min(100, retry_ms)),
            ("grpc.max_reconnect_backoff_ms", retry_ms),
            # Pings the backends accept (one policy, in the kit): a backend gone silently is seen in seconds.
            *KEEPALIVE.client_options(),
        ]

    def _mark(self, target: str, ready: bool | None, reason: str) -> None:
        if self._store.set_readiness(target, ready, reason):
            log.info("backend readiness changed", extra={"target": target, "ready": ready, "reason": reason})


def _status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
