"""Follows the grpc.health status of every backend replica, so the catalog says which models can serve.

A model's backend target names a set of replicas as the edge reaches them: a headless Service's
name (one address per ready pod), a list (``ipv4:10.0.0.1:50051,10.0.0.2:50051``) or one address.
The edge spreads its calls over every address with round_robin and leaves out those whose
grpc.health says NOT_SERVING (services/edge/backends.py), so a model can serve while any one
replica does. The follower therefore resolves the target as the edge's channel does, re-resolves
it every ``resolve_seconds``, and keeps one Health.Watch stream per address: each replica pushes
its changes, which the catalog publishes at once. The model is ready when any replica serves;
unknown (routed) when none serves but one has no grpc.health (not a Modelplex backend); not ready
otherwise, with the first replica's reason. An unreachable replica is retried with a short backoff
so one that comes up is seen within a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplex_catalog.store import CatalogStore
from modelplex_kit.connections import KEEPALIVE
from modelplex_kit.pools.sources import DnsSource, ReplicaSource, StaticSource

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    """What one address's grpc.health last said: ready, not (with why), or unknown (None: no grpc.health)."""

    ready: bool | None
    reason: str = ""


def combined(states: list[ReplicaHealth]) -> ReplicaHealth | None:
    """The target's readiness from its replicas' (None while none has answered)."""
    if not states:
        return None
    if any(s.ready for s in states):
        return ReplicaHealth(True)
    if any(s.ready is None for s in states):
        return ReplicaHealth(None)
    reason = states[0].reason
    return ReplicaHealth(False, reason if len(states) == 1 else f"{reason} (none of {len(states)} replicas serving)")


def replica_addresses(target: str, resolve_seconds: float) -> ReplicaSource:
    """The addresses behind a target, as the edge's channel finds them: ``ipv4:``/``ipv6:`` lists as
    given, ``dns:///host:port`` and ``host:port`` looked up again every ``resolve_seconds`` (the kit's
    DnsSource: every A/AAAA record; a failed lookup keeps the last set, a name gone empties it),
    anything else (``unix:``) one address."""
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        return StaticSource([a for a in rest.split(",") if a])
    if ("://" in target and not target.startswith("dns:")) or target.startswith("unix:"):
        return StaticSource([target])
    host, _, port = target.removeprefix("dns:").lstrip("/").rpartition(":")
    return DnsSource(host.strip("[]"), int(port), resolve_seconds)


def grpc_address(address: str) -> str:
    """One address of a snapshot as a gRPC target of its own."""
    if address.startswith("unix:") or "://" in address:
        return address
    return f"ipv6:{address}" if address.startswith("[") else f"ipv4:{address}"


async def resolve(target: str) -> list[str]:
    """The target's addresses once, each as a gRPC target, in a stable order."""
    async for snapshot in replica_addresses(target, 1.0).snapshots():
        return sorted(grpc_address(a) for a in snapshot)
    return []


class TargetFollower:
    """One backend target: its addresses, one Watch per address, and their combined readiness."""

    def __init__(self, target: str, retry_seconds: float, resolve_seconds: float, mark: Callable) -> None:
        self.target = target
        self._retry, self._resolve_every, self._mark = retry_seconds, resolve_seconds, mark
        self._watches: dict[str, asyncio.Task] = {}
        self._states: dict[str, ReplicaHealth] = {}

    async def run(self) -> None:
        try:
            async for snapshot in replica_addresses(self.target, self._resolve_every).snapshots():
                addresses = sorted(grpc_address(a) for a in snapshot)
                self._reconcile(addresses)
                if not addresses:
                    self._mark(self.target, ReplicaHealth(False, "backend unreachable (no address)"))
            await asyncio.Event().wait()  # a source that ends (a fixed list) has no more changes
        finally:
            self._reconcile([])

    def _reconcile(self, addresses: list[str]) -> None:
        for gone in set(self._watches) - set(addresses):
            self._watches.pop(gone).cancel()
            self._states.pop(gone, None)
        for address in addresses:
            if address not in self._watches:
                self._watches[address] = asyncio.create_task(self._watch(address), name=f"readiness {address}")
        if addresses:
            self._publish()

    def _set(self, address: str, state: ReplicaHealth) -> None:
        if address in self._watches and self._states.get(address) != state:
            self._states[address] = state
            self._publish()

    def _publish(self) -> None:
        states = [self._states[a] for a in sorted(self._watches) if a in self._states]
        state = combined(states)
        if state is not None:
            self._mark(self.target, state)

    async def _watch(self, address: str) -> None:
        backoff = 0.1
        async with grpc.aio.insecure_channel(address, options=self._channel_options()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                answered = False
                try:
                    async for reply in stub.Watch(health_pb2.HealthCheckRequest()):
                        answered, ready = True, reply.status == _SERVING
                        why = "" if ready else "backend " + _status_name(reply.status)
                        self._set(address, ReplicaHealth(ready, why))
                        backoff = 0.1
                except grpc.aio.AioRpcError as exc:
                    # A stream that had answered ended (max connection age, a pod going away):
                    # ask again before calling the replica unreachable, or readiness would flap.
                    if answered:
                        continue
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        # A backend without grpc.health (not a Modelplex one): unknown, so routed.
                        self._set(address, ReplicaHealth(None))
                        backoff = self._retry
                    else:
                        self._set(address, ReplicaHealth(False, f"backend unreachable ({exc.code().name})"))
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


class ReadinessFollower:
    def __init__(self, store: CatalogStore, retry_seconds: float = 1.0, resolve_seconds: float = 5.0) -> None:
        self._store = store
        self._retry, self._resolve = retry_seconds, resolve_seconds
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
            follower = TargetFollower(target, self._retry, self._resolve, self._mark)
            self._tasks[target] = asyncio.create_task(follower.run(), name=f"readiness {target}")

    def _mark(self, target: str, state: ReplicaHealth) -> None:
        if self._store.set_readiness(target, state.ready, state.reason):
            log.info(
                "backend readiness changed", extra={"target": target, "ready": state.ready, "reason": state.reason}
            )


def _status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
