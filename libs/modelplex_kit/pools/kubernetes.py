"""Engine replicas found in Kubernetes: a headless Service's EndpointSlices, or an InferencePool's Pods.

Two replica sources (``MODELPLEX_<SVC>_UPSTREAM_DISCOVERY``), each an async iterator of full
snapshots, ``frozenset`` of ``host:port`` of the replicas that are ready now:

- ``endpointslices``: the ``discovery.k8s.io/v1`` EndpointSlices labelled
  ``kubernetes.io/service-name=<UPSTREAM_SERVICE>``; an endpoint counts when its
  ``conditions.ready`` is not false and it is not terminating, at the slice port named (or
  numbered) ``UPSTREAM_PORT`` (empty: the port of ``UPSTREAM_URL``, else the slice's only port).
- ``inferencepool``: the ``inference.networking.k8s.io/v1`` InferencePool
  ``UPSTREAM_INFERENCE_POOL``, watched itself (its selector and ports may change), and the
  Pods its ``spec.selector`` picks: Ready, not being deleted, with an IP. Each of the pool's
  ``targetPorts`` is a replica (as Gateway API Inference Extension's picker counts them), unless
  ``UPSTREAM_PORT`` (or ``UPSTREAM_URL``'s port) names a container port (Triton's ``grpc``) or a number.

``replica_source(settings)`` is what the pools call (``modelplex_kit.pools.sources``) with the
backend's settings (the pools' fields); the Kubernetes-only knobs (``UPSTREAM_NAMESPACE``,
``UPSTREAM_KUBE_API_URL``, watch timeout and backoff) are read under the same prefix.

Both use the kit's list + watch loop (``modelplex_kit.kube``: resume from the last
resourceVersion, relist on 410 Gone, back off on errors) on daemon threads, with the pod's
service account and the pod's namespace (its service-account namespace file, else
``POD_NAMESPACE``). The backend needs a Role with get/list/watch on ``endpointslices`` (and on
``inferencepools`` and ``pods`` for the second); the chart renders it.

This module imports the ``kubernetes`` client: the pools import it only for these two sources.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from kubernetes import client
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelplex_kit.kube import ListWatch, Objects, api_client, default_namespace

log = logging.getLogger(__name__)

POOL_GROUP, POOL_VERSION, POOL_PLURAL = "inference.networking.k8s.io", "v1", "inferencepools"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_POOL = "inferencepool"


class DiscoverySettings(Protocol):
    """What the pools' settings (``PoolSettings``, in each backend's settings) say about discovery."""

    upstream_url: str
    upstream_discovery: str
    upstream_service: str
    upstream_inference_pool: str
    upstream_port: str


class KubernetesSettings(BaseSettings):
    """The knobs only Kubernetes discovery has, read under the backend's own prefix (``MODELPLEX_TEXT_`` ...)."""

    model_config = SettingsConfigDict(extra="ignore")

    # Empty: the pod's own namespace (its service-account namespace file, else POD_NAMESPACE).
    upstream_namespace: str = ""
    # Talk to this URL without credentials (kubectl proxy, tests) instead of the in-cluster API.
    upstream_kube_api_url: str = ""
    # A watch is re-opened (from its last resourceVersion) after this long; errors back off up to the max.
    upstream_watch_timeout_seconds: int = Field(240, gt=0)
    upstream_watch_backoff_max_seconds: float = Field(30.0, gt=0)


def replica_source(
    settings: DiscoverySettings, kube: KubernetesSettings | None = None
) -> EndpointSliceSource | InferencePoolSource:
    """The source ``settings.upstream_discovery`` names; ValueError when a setting it needs is missing.

    ``kube`` defaults to the environment under the prefix of ``settings``' own class.
    """
    if kube is None:
        prefix = getattr(settings, "model_config", {}).get("env_prefix", "")
        kube = KubernetesSettings(_env_prefix=prefix)
    api = api_client(kube.upstream_kube_api_url)
    namespace = kube.upstream_namespace or default_namespace()
    timing = WatchTiming(kube.upstream_watch_timeout_seconds, kube.upstream_watch_backoff_max_seconds)
    # No port named: the configured URL's, if it gives one (the pools' convention).
    port = settings.upstream_port or url_port(settings.upstream_url)
    if settings.upstream_discovery == "endpointslices":
        if not settings.upstream_service:
            raise ValueError("upstream_discovery endpointslices needs upstream_service (the engine Service's name)")
        return EndpointSliceSource(api, namespace, settings.upstream_service, port, timing)
    if settings.upstream_discovery == "inferencepool":
        if not settings.upstream_inference_pool:
            raise ValueError("upstream_discovery inferencepool needs upstream_inference_pool (the pool's name)")
        return InferencePoolSource(api, namespace, settings.upstream_inference_pool, port, timing)
    raise ValueError(f"not a Kubernetes discovery: {settings.upstream_discovery!r}")


def url_port(upstream_url: str) -> str:
    """The explicit port of the (first) configured URL, or ""."""
    first = upstream_url.split(",")[0].strip()
    if not first:
        return ""
    try:
        port = urlsplit(first if "//" in first else f"//{first}").port
    except ValueError:
        return ""
    return str(port) if port else ""


@dataclass(frozen=True)
class WatchTiming:
    watch_timeout_seconds: int = 240
    backoff_max_seconds: float = 30.0


# ----------------------------------------------------------------- snapshots from objects


def host_port(address: str, port: int) -> str:
    """``10.0.0.7:8000``; IPv6 in brackets, as URLs and gRPC targets want it."""
    try:
        if ipaddress.ip_address(address).version == 6:
            return f"[{address}]:{port}"
    except ValueError:  # a hostname (EndpointSlices of addressType FQDN)
        pass
    return f"{address}:{port}"


def _slice_port(ports: list[dict[str, Any]], wanted: str) -> int | None:
    if wanted.isdigit():
        return int(wanted) if any(p.get("port") == int(wanted) for p in ports) else None
    named = [p for p in ports if (p.get("name") or "") == wanted] if wanted else ports
    if len(named) != 1 or named[0].get("port") is None:
        return None  # no such port, or several and none named: never guess which one serves
    return int(named[0]["port"])


def ready_endpoints(slices: Objects, port: str) -> frozenset[str]:
    """The serving endpoints of a Service's EndpointSlices at ``port`` (a name, a number or empty)."""
    found = set()
    for endpoint_slice in slices.values():
        number = _slice_port(endpoint_slice.get("ports") or [], port)
        if number is None:
            continue
        for endpoint in endpoint_slice.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            # ready unset means unknown, which the API says to read as ready; terminating unset: not.
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            addresses = endpoint.get("addresses") or []
            if addresses:  # several addresses of one endpoint are the same replica: take the first
                found.add(host_port(addresses[0], number))
    return frozenset(found)


def pool_selector(pool: dict[str, Any] | None) -> str:
    """The InferencePool's Pod selector as a label selector string; empty when it selects nothing."""
    labels = ((((pool or {}).get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _pod_is_ready(pod: dict[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False  # terminating: it drains, it takes no new requests
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ready and bool(status.get("podIP"))


def _pod_ports(pod: dict[str, Any], pool: dict[str, Any], wanted: str) -> list[int]:
    if wanted.isdigit():
        return [int(wanted)]
    if wanted:
        containers = (pod.get("spec") or {}).get("containers") or []
        return [p["containerPort"] for c in containers for p in c.get("ports") or [] if p.get("name") == wanted][:1]
    return [p["number"] for p in (pool.get("spec") or {}).get("targetPorts") or [] if p.get("number")]


def ready_pods(pods: Objects, pool: dict[str, Any] | None, port: str) -> frozenset[str]:
    """``podIP:port`` of each Ready pod the pool selects, for each of its ports."""
    if pool is None:
        return frozenset()
    return frozenset(
        host_port(pod["status"]["podIP"], number)
        for pod in pods.values()
        if _pod_is_ready(pod)
        for number in _pod_ports(pod, pool, port)
    )


# ----------------------------------------------------------------- the sources


class _Watches:
    """List + watch loops feeding one asyncio queue, closed together."""

    def __init__(self, timing: WatchTiming) -> None:
        self._timing = timing
        self._loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Objects]] = asyncio.Queue()
        self._running: dict[str, ListWatch] = {}

    def start(self, tag: str, lister: Callable[..., Any]) -> None:
        self.stop(tag)

        def emit(objects: Objects) -> None:  # on the watch's thread
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (tag, objects))

        watch = ListWatch(lister, emit, tag, self._timing.watch_timeout_seconds, self._timing.backoff_max_seconds)
        self._running[tag] = watch
        watch.start()

    def stop(self, tag: str) -> None:
        watch = self._running.pop(tag, None)
        if watch is not None:
            watch.close()

    def close(self) -> None:
        for tag in list(self._running):
            self.stop(tag)


class EndpointSliceSource:
    """The ready endpoints of one Service, from its EndpointSlices."""

    def __init__(
        self, api: client.ApiClient, namespace: str, service: str, port: str = "", timing: WatchTiming = WatchTiming()
    ) -> None:
        self._lister = functools.partial(
            client.DiscoveryV1Api(api).list_namespaced_endpoint_slice,
            namespace,
            label_selector=f"{SERVICE_NAME_LABEL}={service}",
        )
        self._port, self._timing = port, timing

    def __aiter__(self) -> AsyncIterator[frozenset[str]]:
        return self.snapshots()

    async def snapshots(self) -> AsyncIterator[frozenset[str]]:
        """Every change of the ready set, starting with the first list's (possibly empty)."""
        watches = _Watches(self._timing)
        watches.start("endpointslices", self._lister)
        last: frozenset[str] | None = None
        try:
            while True:
                _, slices = await _latest(watches.queue)
                current = ready_endpoints(slices, self._port)
                if current != last:
                    last = current
                    yield current
        finally:
            watches.close()


class InferencePoolSource:
    """The ready Pods an InferencePool selects, following changes of the pool itself."""

    def __init__(
        self, api: client.ApiClient, namespace: str, pool: str, port: str = "", timing: WatchTiming = WatchTiming()
    ) -> None:
        self._pool_lister = functools.partial(
            client.CustomObjectsApi(api).list_namespaced_custom_object,
            POOL_GROUP,
            POOL_VERSION,
            namespace,
            POOL_PLURAL,
            field_selector=f"metadata.name={pool}",
        )
        self._pods = functools.partial(client.CoreV1Api(api).list_namespaced_pod, namespace)
        self._name, self._port, self._timing = pool, port, timing

    def __aiter__(self) -> AsyncIterator[frozenset[str]]:
        return self.snapshots()

    async def snapshots(self) -> AsyncIterator[frozenset[str]]:
        """Every change of the ready set; empty while the pool does not exist or selects nothing."""
        watches = _Watches(self._timing)
        watches.start(_POOL, self._pool_lister)
        pool: dict[str, Any] | None = None
        selector, pods_tag, pods, pods_listed = "", "", {}, False
        generation = 0
        last: frozenset[str] | None = None
        try:
            while True:
                tag, objects = await watches.queue.get()
                if tag == _POOL:
                    pool = objects.get(self._name)
                    if pool_selector(pool) != selector:  # a new selector: a new pod watch, from a fresh list
                        watches.stop(pods_tag)
                        generation += 1
                        selector, pods_tag, pods, pods_listed = pool_selector(pool), f"pods#{generation}", {}, False
                        self._watch_pods(watches, pods_tag, selector)
                elif tag == pods_tag:
                    pods, pods_listed = objects, True
                else:
                    continue  # the last word of a pod watch already replaced
                if selector and not pods_listed:
                    continue  # its pods' first list is on its way: no empty snapshot meanwhile
                current = ready_pods(pods, pool, self._port)
                if current != last:
                    last = current
                    yield current
        finally:
            watches.close()

    def _watch_pods(self, watches: _Watches, tag: str, selector: str) -> None:
        if selector:
            watches.start(tag, functools.partial(self._pods, label_selector=selector))
        else:  # an empty selector would pick every pod of the namespace
            log.warning("InferencePool missing or selects no pods", extra={"pool": self._name})


async def _latest(queue: asyncio.Queue[tuple[str, Objects]]) -> tuple[str, Objects]:
    """The newest of what is queued: each item is a full set, so older ones say nothing more."""
    item = await queue.get()
    while not queue.empty():
        item = queue.get_nowait()
    return item
