"""Pools of KServe v2 gRPC replicas (Triton, KServe ModelServers): what the Triton adapters use
instead of one ``InferenceServerClient`` (``infer`` for unary calls, ``stream`` for ``stream_infer``).

One gRPC channel per replica. The picker's load is this backend's in-flight count per replica, plus
Triton's own queue (``nv_inference_pending_request_count``) when ``pool_metrics_port`` names the port
its metrics are on (Triton's 8002): the gRPC target does not say where they are.
A call that fails as unavailable (connection refused, the model not loaded there) is retried on
another replica; its failure is mapped once, by ``kserve_v2.upstream_error``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from tritonclient.grpc.aio import InferenceServerClient, InferResult
from tritonclient.utils import InferenceServerException

from modelplex_kit.engine_health import triton_ready
from modelplex_kit.kserve_v2 import upstream_error
from modelplex_kit.pools.load import EngineLoad, parse_engine_load
from modelplex_kit.pools.picker import PickRequest
from modelplex_kit.pools.pool import Pool, ReplicaUnreachable
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.pools.sources import replica_source

T = TypeVar("T")


class TritonReplica:
    def __init__(self, target: str, model: str, metrics_port: int) -> None:
        self.client = InferenceServerClient(target)
        self._model = model
        host = target.rsplit(":", 1)[0]
        self._metrics_url = f"http://{host}:{metrics_port}/metrics" if metrics_port else ""
        self._http: aiohttp.ClientSession | None = None

    async def ready(self) -> bool | None:
        return await triton_ready(self.client, self._model)

    async def engine_load(self) -> EngineLoad | None:
        """Triton's queue from its metrics port (``pool_metrics_port``), else None: in-flight counts only."""
        if not self._metrics_url:
            return None
        if self._http is None:  # made on first use: a session binds to the running event loop
            self._http = aiohttp.ClientSession()
        try:
            async with self._http.get(self._metrics_url) as response:
                text = await response.text(errors="replace") if response.status == 200 else None
        except aiohttp.ClientConnectorError as exc:
            raise ReplicaUnreachable(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise OSError(str(exc)) from exc
        return parse_engine_load(text) if text is not None else None

    async def close(self) -> None:
        await self.client.close()
        if self._http is not None:
            await self._http.close()


class TritonPool:
    def __init__(self, name: str, settings: PoolSettings, model: str) -> None:
        self._model = model
        self.pool: Pool[TritonReplica] = Pool(
            name,
            settings,
            replica_source(settings),
            lambda target: TritonReplica(target, model, settings.pool_metrics_port),
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
