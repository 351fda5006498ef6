"""Where a pool's replicas come from.

A ``ReplicaSource`` yields full snapshots of the READY replicas, as ``host:port`` strings, each
time the set changes (the first one as soon as it is known). A snapshot replaces the previous one
whole; an HTTP pool turns each ``host:port`` into a base URL with the scheme and path of the
configured ``upstream_url``. A source whose iterator ends has no more changes: the pool keeps the
last snapshot. Sources retry their own failures (a watch that breaks, a name that does not
resolve) and keep the last snapshot meanwhile.

Kubernetes sources (``endpointslices``, ``inferencepool``) live in ``modelplex_kit.pools.kubernetes``,
imported only when named, which must expose ``replica_source(settings: PoolSettings) -> ReplicaSource``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from modelplex_kit.pools.settings import PoolSettings

log = logging.getLogger(__name__)


class ReplicaSource(Protocol):
    def snapshots(self) -> AsyncIterator[frozenset[str]]:
        """Full sets of ready ``host:port``s, each time the set changes."""
        ...


@dataclass(frozen=True, slots=True)
class UrlTemplate:
    """The scheme and path of the configured URL, to make a replica's ``host:port`` a base URL."""

    scheme: str
    path: str

    def base_url(self, hostport: str) -> str:
        return f"{self.scheme}://{hostport}{self.path}"


def upstream_urls(upstream_url: str) -> list[str]:
    """The comma-separated list of base URLs, blanks dropped, trailing slashes removed."""
    return [url.strip().rstrip("/") for url in upstream_url.split(",") if url.strip()]


def url_template(upstream_url: str) -> UrlTemplate:
    first = urlsplit(upstream_urls(upstream_url)[0])
    return UrlTemplate(first.scheme or "http", first.path.rstrip("/"))


def hostport(url: str) -> str:
    parts = urlsplit(url if "//" in url else f"//{url}")
    default = 443 if parts.scheme == "https" else 80
    return _join(parts.hostname or "", parts.port or default)


class StaticSource:
    """A fixed list (the catalog's, ``make run``'s, the tests'): one snapshot, never changed."""

    def __init__(self, hostports: list[str]) -> None:
        self._replicas = frozenset(hostports)

    async def snapshots(self) -> AsyncIterator[frozenset[str]]:
        yield self._replicas


class DnsSource:
    """The addresses a name resolves to (a headless Service's ready pods), re-resolved periodically.

    A failed lookup keeps the last snapshot: a DNS hiccup must not empty the pool. A name that
    resolves to nothing (NXDOMAIN for a headless Service with no ready pod) does empty it.
    """

    def __init__(self, host: str, port: int, interval_seconds: float) -> None:
        self._host, self._port, self._interval = host, port, interval_seconds

    async def snapshots(self) -> AsyncIterator[frozenset[str]]:
        last: frozenset[str] | None = None
        while True:
            current = await self._resolve()
            if current is not None and current != last:
                last = current
                yield current
            await asyncio.sleep(self._interval)

    async def _resolve(self) -> frozenset[str] | None:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return frozenset()
            log.warning("pool dns lookup failed: %s", exc)
            return None
        return frozenset(_join(info[4][0], info[4][1]) for info in infos)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def replica_source(settings: PoolSettings) -> ReplicaSource:
    """The source ``upstream_discovery`` names."""
    urls = upstream_urls(settings.upstream_url)
    match settings.upstream_discovery:
        case "static":
            return StaticSource([hostport(url) for url in urls])
        case "dns":
            parts = urlsplit(urls[0])
            port = parts.port or (443 if parts.scheme == "https" else 80)
            return DnsSource(parts.hostname or "", port, settings.dns_interval_seconds)
        case _:  # endpointslices, inferencepool
            from modelplex_kit.pools import kubernetes  # only where it runs: it needs the API server

            return kubernetes.replica_source(settings)
