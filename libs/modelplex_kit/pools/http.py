"""Pools of OpenAI-compatible HTTP replicas (vLLM pods, llama.cpp servers): what every backend's
``openai`` adapter calls instead of one ``OpenAIUpstream``.

Each replica has its own ``OpenAIUpstream`` (its own keep-alive connection pool), its load is read
from its ``/metrics`` and the calls keep ``OpenAIUpstream``'s shape (``call``, ``events``) with the
request's ``PickRequest`` added. One configured URL is a pool of one: today's single upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aiohttp

from modelplex_kit.errors import adapter_load_error, upstream_http_error
from modelplex_kit.openai_upstream import OpenAIUpstream
from modelplex_kit.pools.adapters import AdapterRef
from modelplex_kit.pools.load import EngineLoad, parse_engine_load
from modelplex_kit.pools.picker import CacheUse, PickRequest
from modelplex_kit.pools.pool import Pool, ReplicaUnreachable
from modelplex_kit.pools.settings import PoolSettings
from modelplex_kit.pools.sources import replica_source, url_template

T = TypeVar("T")


def cache_use_of(answer: dict[str, Any]) -> CacheUse | None:
    """What an OpenAI answer (or a stream's usage event) says the engine found in its prefix cache:
    vLLM's ``usage.prompt_tokens_details.cached_tokens``. None where the engine does not say
    (llama.cpp's server; vLLM without prompt-token details): the picker then learns nothing."""
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    prompt = usage.get("prompt_tokens")
    if not isinstance(cached, int) or not isinstance(prompt, int) or prompt <= 0:
        return None
    return CacheUse(prompt_tokens=prompt, cached_tokens=cached)


class HttpReplica:
    def __init__(self, upstream: OpenAIUpstream) -> None:
        self.upstream = upstream

    async def ready(self) -> bool | None:
        return await self.upstream.readiness()

    async def engine_load(self) -> EngineLoad | None:
        try:
            text = await self.upstream.metrics()
        except aiohttp.ClientConnectorError as exc:  # refused, unresolved: nothing listens there
            raise ReplicaUnreachable(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise OSError(str(exc)) from exc
        return parse_engine_load(text) if text is not None else None

    async def tokenize(self, body: dict[str, Any], timeout_seconds: float) -> list[int] | None:
        return await self.upstream.tokenize(body, timeout_seconds)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        """vLLM's runtime LoRA loading; a refusal is mapped by ``errors.adapter_load_error``."""
        body = {"lora_name": adapter.name, "lora_path": adapter.source}
        status, answer = await self.upstream.manage("load_lora_adapter", body)
        if (error := adapter_load_error(adapter.name, status, answer)) is not None:
            raise error

    async def unload_adapter(self, name: str) -> None:
        status, answer = await self.upstream.manage("unload_lora_adapter", {"lora_name": name})
        if status >= 300 and status != 404:  # 404: not loaded there, which is what was wanted
            raise upstream_http_error(status, answer)

    async def close(self) -> None:
        await self.upstream.close()


class OpenAIPool:
    def __init__(
        self,
        name: str,
        settings: PoolSettings,
        api_key: str = "",
        *,
        max_connections: int = 256,
        timeout_seconds: float = 600.0,
        what: str = "model server",
    ) -> None:
        template = url_template(settings.upstream_url)

        def replica(hostport: str) -> HttpReplica:
            upstream = OpenAIUpstream(
                template.base_url(hostport),
                api_key,
                max_connections=max_connections,
                timeout_seconds=timeout_seconds,
                what=what,
            )
            return HttpReplica(upstream)

        self.pool: Pool[HttpReplica] = Pool(name, settings, replica_source(settings), replica)

    async def call(
        self, path: str, body: dict[str, Any], *, param: str | None = None, pick: PickRequest | None = None
    ) -> dict[str, Any]:
        """``OpenAIUpstream.call`` on the picked replica, retried on another one if it fails."""
        return await self.pool.call(
            pick or PickRequest(), lambda r: r.upstream.call(path, body, param=param), cache_use_of
        )

    def events(self, path: str, body: dict[str, Any], *, pick: PickRequest | None = None) -> AsyncIterator[dict]:
        """``OpenAIUpstream.events`` on the picked replica, retried elsewhere until the first event arrives."""
        return self.pool.stream(pick or PickRequest(), lambda r: r.upstream.events(path, body), cache_use_of)

    def stream(
        self, open_: Callable[[OpenAIUpstream], AsyncIterator[T]], *, pick: PickRequest | None = None
    ) -> AsyncIterator[T]:
        """Any call of an adapter's own shape (a multipart upload, say) on the picked replica's
        upstream, retried elsewhere until its first item."""
        return self.pool.stream(pick or PickRequest(), lambda r: open_(r.upstream))

    async def ready(self) -> bool:
        return await self.pool.ready()

    async def close(self) -> None:
        await self.pool.close()
