"""Pools of KServe v2 gRPC replicas (Triton, KServe ModelServers): what the Triton adapters use
instead of one ``InferenceServerClient`` (``infer`` for unary calls, ``stream`` for ``stream_infer``).

One gRPC channel per replica; the picker's load is this backend's in-flight count per replica
(Triton publishes its queue on a separate metrics port, which the configured target does not name).
A call that fails as unavailable (connection refused, the model not loaded there) is retried on
another replica; its failure is mapped once, by ``kserve_v2.upstream_error``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from tritonclient.grpc.aio import InferenceServerClient, InferResult
from tritonclient.utils import InferenceServerException

from modelplex_kit.engine_health import triton_ready
from modelplex_kit.kserve_v2 import upstream_error
from modelplex_kit.pools.load import EngineLoad
from modelplex_kit.pools.picker import PickRequest
from modelplex_kit.pools.pool import Pool
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.pools.sources import replica_source

T = TypeVar("T")


class TritonReplica:
    def __init__(self, target: str, model: str) -> None:
        self.client = InferenceServerClient(target)
        self._model = model

    async def ready(self) -> bool | None:
        return await triton_ready(self.client, self._model)

    async def engine_load(self) -> EngineLoad | None:
        return None  # in-flight counts only

    async def close(self) -> None:
        await self.client.close()


class TritonPool:
    def __init__(self, name: str, settings: PoolSettings, model: str) -> None:
        self._model = model
        self.pool: Pool[TritonReplica] = Pool(
            name, settings, replica_source(settings), lambda target: TritonReplica(target, model)
        )

    async def infer(self, *args: Any, param: str | None = None, **kwargs: Any) -> InferResult:
        """``InferenceServerClient.infer`` on the least loaded replica; failures as ServiceErrors."""

        async def send(replica: TritonReplica) -> InferResult:
            try:
                return await replica.client.infer(*args, **kwargs)
            except InferenceServerException as exc:
                raise upstream_error(exc, self._model, param) from exc

        return await self.pool.call(PickRequest(), send)

    async def call(self, send: Callable[[InferenceServerClient], Awaitable[T]]) -> T:
        """Any unary call of the adapter's own on the least loaded replica's channel; ``send`` maps its failures."""
        return await self.pool.call(PickRequest(), lambda replica: send(replica.client))

    def stream(
        self, open_: Callable[[InferenceServerClient], AsyncIterator[T]], *, pick: PickRequest | None = None
    ) -> AsyncIterator[T]:
        """A streamed call (``stream_infer``) of the adapter's own on the picked replica's channel,
        retried on another until its first item; ``open_`` maps its own failures."""
        return self.pool.stream(pick or PickRequest(), lambda replica: open_(replica.client))

    async def ready(self) -> bool:
        return await self.pool.ready()

    async def close(self) -> None:
        await self.pool.close()
