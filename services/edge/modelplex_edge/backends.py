"""gRPC channels and stubs to the backends, one channel per target, shared.

Which stub a target gets comes from the modality registry, so a new modality
needs no code here.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from modelplex_kit.connections import KEEPALIVE
from modelplex_kit.modalities import Modality
from modelplex_kit.priority import PRIORITY_HEADER
from modelplex_kit.telemetry import outgoing_metadata

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Spread calls over every backend pod behind a headless Service, leaving out those whose
    # grpc.health says NOT_SERVING (a pod still loading its engine, or draining): the catalog
    # calls a model ready while any of its backend replicas serves (catalog/readiness.py).
    (
        "grpc.service_config",
        json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}),
    ),
    # The keepalive every Modelplex server is configured to accept (one policy, in the kit).
    *KEEPALIVE.client_options(),
]


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(grpc_target(target), options=_CHANNEL_OPTIONS)


def grpc_target(target: str) -> str:
    """A catalog's backend target as gRPC reads it: ``host:port`` is a DNS name (every address it
    resolves to); a target with a scheme (``dns:///``, ``ipv4:a,b``, ``unix:``) is taken as given."""
    explicit = "://" in target or target.partition(":")[0] in ("dns", "ipv4", "ipv6", "unix", "unix-abstract")
    return target if explicit else f"dns:///{target}"


class Backends:
    def __init__(self, timeout_seconds: float) -> None:
        self.timeout = timeout_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}

    def stub(self, modality: Modality, target: str) -> Any:
        key = (modality.name, target)
        stub = self._stubs.get(key)
        if stub is None:
            if target not in self._channels:
                self._channels[target] = channel(target)
            stub = self._stubs[key] = modality.stub(self._channels[target])
        return stub

    def call_options(self, request_id: str, priority: str = "") -> dict[str, Any]:
        """Metadata and deadline of a backend call. ``priority`` (BATCH) travels as metadata, one header
        for every modality: an engine that schedules serves interactive work first."""
        metadata = outgoing_metadata(request_id)
        if priority:
            metadata = (*metadata, (PRIORITY_HEADER, priority))
        return {"metadata": metadata, "timeout": self.timeout}

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels.values()))
