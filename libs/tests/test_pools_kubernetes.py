"""Engine replicas discovered from EndpointSlices and InferencePools, against the replaying API server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelplex_kit.kube import api_client, default_namespace
from modelplex_kit.pools.kubernetes import (
    EndpointSliceSource,
    InferencePoolSource,
    WatchTiming,
    ready_endpoints,
    ready_pods,
    replica_source,
    url_port,
)
from tests.support.kube_replay import (
    DROP,
    ENDPOINT_SLICES,
    HOLD,
    INFERENCE_POOLS,
    LIVE,
    PODS,
    Replay,
    event,
    gone,
    serve,
)
from tests.support.ports import free_port
from tests.support.until import until

FAST = WatchTiming(watch_timeout_seconds=240, backoff_max_seconds=0.2)


def endpoint(ip: str, ready: bool | None = True, terminating: bool | None = None) -> dict:
    conditions = {k: v for k, v in (("ready", ready), ("terminating", terminating)) if v is not None}
    return {"addresses": [ip], "conditions": conditions}


def endpoint_slice(name: str, rv: int, *endpoints: dict, service: str = "vllm-llama") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ml", "resourceVersion": str(rv),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}, {"name": "metrics", "port": 9090}],
        "endpoints": list(endpoints),
    }  # fmt: skip


def pod(name: str, rv: int, ip: str, ready: bool = True, deleting: bool = False, labels: dict | None = None) -> dict:
    metadata = {"name": name, "namespace": "ml", "resourceVersion": str(rv), "labels": labels or {"app": "vllm-a"}}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": 8000},
                                                              {"name": "grpc", "containerPort": 8001}]}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


def inference_pool(rv: int, app: str, ports: tuple[int, ...] = (8000,)) -> dict:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "llama-pool", "namespace": "ml", "resourceVersion": str(rv)},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "targetPorts": [{"number": n} for n in ports],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    }


class Snapshots:
    """Reads a source's snapshots in the background; tests wait for the one they expect."""

    def __init__(self, source) -> None:
        self.seen: list[frozenset[str]] = []
        self._iterator = source.__aiter__()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for snapshot in self._iterator:
            self.seen.append(snapshot)

    async def until(self, expected: set[str], seconds: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while not self.seen or self.seen[-1] != frozenset(expected):
            assert asyncio.get_running_loop().time() < deadline, f"waited for {expected}, saw {self.seen}"
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._iterator.aclose()


def _watches(replay: Replay) -> list[dict[str, str]]:
    return [r for r in replay.requests if r.get("watch")]


# ------------------------------------------------------------------ from objects


def test_ready_endpoints_keep_ready_and_not_terminating_at_the_named_port():
    slices = {
        "a": endpoint_slice("a", 1, endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False),
                            endpoint("10.0.0.3", ready=None),  # unknown: the API says to read it as ready
                            endpoint("10.0.0.4", ready=True, terminating=True)),
        "b": endpoint_slice("b", 2, endpoint("10.0.0.1"), endpoint("fd00::5")),  # a replica in two slices
    }  # fmt: skip
    assert ready_endpoints(slices, "http") == {"10.0.0.1:8000", "10.0.0.3:8000", "[fd00::5]:8000"}
    assert ready_endpoints(slices, "9090") == {"10.0.0.1:9090", "10.0.0.3:9090", "[fd00::5]:9090"}
    # Several ports and none named: no guess. A port the slices lack: nothing.
    assert ready_endpoints(slices, "") == frozenset()
    assert ready_endpoints(slices, "grpc") == frozenset() == ready_endpoints(slices, "7777")
    one_port = endpoint_slice("c", 3, endpoint("10.0.0.9"))
    one_port["ports"] = [{"port": 8001}]
    assert ready_endpoints({"c": one_port}, "") == {"10.0.0.9:8001"}


def test_ready_pods_at_the_pool_ports_or_a_named_container_port():
    pool = inference_pool(1, "vllm-a", ports=(8000, 8002))
    pods = {
        "p1": pod("p1", 1, "10.1.0.1"),
        "p2": pod("p2", 2, "10.1.0.2", ready=False),
        "p3": pod("p3", 3, "10.1.0.3", deleting=True),
        "p4": pod("p4", 4, ""),  # scheduled, no IP yet
    }
    assert ready_pods(pods, pool, "") == {"10.1.0.1:8000", "10.1.0.1:8002"}  # each target port a replica
    assert ready_pods(pods, pool, "grpc") == {"10.1.0.1:8001"}  # Triton's gRPC port, by name
    assert ready_pods(pods, pool, "9000") == {"10.1.0.1:9000"}
    assert ready_pods(pods, None, "") == frozenset()


# ------------------------------------------------------------------ against the replay server


async def test_endpoint_slices_adds_removals_not_ready_resume_and_relist():
    a1 = endpoint_slice("vllm-llama-abc", 10, endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False))
    a2 = endpoint_slice("vllm-llama-abc", 11, endpoint("10.0.0.1"), endpoint("10.0.0.2"))
    b = endpoint_slice("vllm-llama-def", 12, endpoint("10.0.0.3"), endpoint("10.0.0.4", ready=False, terminating=True))
    a3 = endpoint_slice("vllm-llama-abc", 14, endpoint("10.0.0.2"))
    relisted = endpoint_slice("vllm-llama-abc", 30, endpoint("10.0.0.1"), endpoint("10.0.0.2"))
    replay = Replay(
        lists=[(10, [a1]), (30, [relisted])],
        streams=[[LIVE, DROP], [LIVE, gone(14)], [HOLD]],
        path=ENDPOINT_SLICES,
        list_kind="EndpointSliceList",
    )
    port = free_port()
    runner = await serve(replay, port)
    source = EndpointSliceSource(api_client(f"http://127.0.0.1:{port}"), "ml", "vllm-llama", "http", FAST)
    snapshots = Snapshots(source)
    try:
        await snapshots.until({"10.0.0.1:8000"})  # the list: the not-ready endpoint is left out
        await replay.live.put(event("MODIFIED", a2))
        await snapshots.until({"10.0.0.1:8000", "10.0.0.2:8000"})  # it turned ready
        await replay.live.put(event("ADDED", b))
        await snapshots.until({"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"})  # a slice added
        await replay.live.put(None)  # the connection drops: the watch resumes from rv 12
        await until(lambda: len(_watches(replay)) == 2, 20, what="the resumed watch")
        await replay.live.put(event("DELETED", endpoint_slice("vllm-llama-def", 13)))
        await snapshots.until({"10.0.0.1:8000", "10.0.0.2:8000"})  # a slice removed
        await replay.live.put(event("MODIFIED", a3))
        await snapshots.until({"10.0.0.2:8000"})  # an endpoint removed
        await replay.live.put(None)  # then 410 Gone: a fresh list
        await snapshots.until({"10.0.0.1:8000", "10.0.0.2:8000"})
        await until(lambda: len(_watches(replay)) == 3, 20, what="the watch after the relist")
        assert [r.get("resourceVersion") for r in _watches(replay)] == ["10", "12", "30"]
        assert len(replay.requests) == 5  # two lists, three watches
        assert {r["labelSelector"] for r in replay.requests} == {"kubernetes.io/service-name=vllm-llama"}
        # Every snapshot differs from the one before it: a change of nothing is not announced.
        assert all(x != y for x, y in zip(snapshots.seen, snapshots.seen[1:], strict=False))
    finally:
        await snapshots.close()
        replay.closing.set()
        await runner.cleanup()


async def test_inference_pool_follows_its_pods_and_its_own_changes():
    pools = Replay(
        lists=[(5, [inference_pool(5, "vllm-a")])],
        streams=[[LIVE]],
        path=INFERENCE_POOLS,
        list_kind="InferencePoolList",
    )
    pods = Replay(
        lists=[
            (100, [pod("a1", 100, "10.1.0.1"), pod("a2", 100, "10.1.0.2", ready=False),
                   pod("a3", 100, "10.1.0.3", deleting=True)]),
            (200, [pod("b1", 200, "10.2.0.1", labels={"app": "vllm-b"})]),
        ],
        streams=[[LIVE], [HOLD]],
        path=PODS,
        list_kind="PodList",
    )  # fmt: skip
    port = free_port()
    runner = await serve([pools, pods], port)
    source = InferencePoolSource(api_client(f"http://127.0.0.1:{port}"), "ml", "llama-pool", "", FAST)
    snapshots = Snapshots(source)
    try:
        await snapshots.until({"10.1.0.1:8000"})  # not ready and terminating pods are left out
        assert snapshots.seen[0] == {"10.1.0.1:8000"}  # no empty snapshot before the pods were listed
        await pods.live.put(event("MODIFIED", pod("a2", 101, "10.1.0.2")))
        await snapshots.until({"10.1.0.1:8000", "10.1.0.2:8000"})  # turned ready
        await pods.live.put(event("DELETED", pod("a1", 102, "10.1.0.1")))
        await snapshots.until({"10.1.0.2:8000"})  # removed
        await pools.live.put(event("MODIFIED", inference_pool(6, "vllm-b")))
        await snapshots.until({"10.2.0.1:8000"})  # a new selector: other pods
        await pools.live.put(event("MODIFIED", inference_pool(7, "vllm-b", ports=(8000, 8001))))
        await snapshots.until({"10.2.0.1:8000", "10.2.0.1:8001"})  # one replica per target port
        await pools.live.put(event("DELETED", inference_pool(8, "vllm-b")))
        await snapshots.until(set())  # no pool, no replicas
        selectors = [r.get("labelSelector") for r in pods.requests]
        assert selectors[0] == "app=vllm-a" and selectors[-1] == "app=vllm-b"
        assert {r.get("fieldSelector") for r in pools.requests} == {"metadata.name=llama-pool"}
    finally:
        await snapshots.close()
        await pods.live.put(None)
        for replay in (pools, pods):
            replay.closing.set()
        await pools.live.put(None)
        await runner.cleanup()


@pytest.mark.parametrize("status", [403, 500])
async def test_api_errors_back_off_until_the_api_answers(status):
    from aiohttp import web

    calls = []

    async def flaky(request):
        calls.append(request.query.get("watch"))
        if len(calls) < 3:  # e.g. the Role not bound yet, or the API server restarting
            return web.json_response({"kind": "Status", "code": status}, status=status)
        if request.query.get("watch"):
            await asyncio.sleep(30)
        body = {"metadata": {"resourceVersion": "5"}, "items": [endpoint_slice("s", 5, endpoint("10.0.0.9"))]}
        return web.json_response(body)

    app = web.Application()
    app.router.add_get(ENDPOINT_SLICES.format(namespace="ml"), flaky)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    snapshots = Snapshots(EndpointSliceSource(api_client(f"http://127.0.0.1:{port}"), "ml", "vllm-llama", "http", FAST))
    try:
        await snapshots.until({"10.0.0.9:8000"})
        assert snapshots.seen == [{"10.0.0.9:8000"}]  # nothing, not an empty pool, while the API failed
        assert calls[:3] == [None, None, None]
    finally:
        await snapshots.close()
        await runner.cleanup()


# ------------------------------------------------------------------ settings


class TextPoolSettings(BaseSettings):
    """Shaped like a backend's settings with the pools' fields (PoolSettings) under its own prefix."""

    model_config = SettingsConfigDict(env_prefix="MODELPLEX_TEXT_", extra="ignore")
    upstream_url: str = ""
    upstream_discovery: str = "static"
    upstream_service: str = ""
    upstream_inference_pool: str = ""
    upstream_port: str = ""


def test_the_source_is_picked_from_the_backends_settings(monkeypatch):
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_DISCOVERY", "endpointslices")
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_SERVICE", "modelplex-vllm-llama")
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_PORT", "http")
    # The Kubernetes-only knobs come from the same prefix.
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_NAMESPACE", "ml")
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_KUBE_API_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_WATCH_TIMEOUT_SECONDS", "30")
    source = replica_source(TextPoolSettings())
    assert isinstance(source, EndpointSliceSource)
    assert (source._port, source._timing.watch_timeout_seconds) == ("http", 30)
    assert source._lister.args == ("ml",)
    assert source._lister.keywords == {"label_selector": "kubernetes.io/service-name=modelplex-vllm-llama"}
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_DISCOVERY", "inferencepool")
    with pytest.raises(ValueError, match="upstream_inference_pool"):
        replica_source(TextPoolSettings())
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_INFERENCE_POOL", "llama-pool")
    monkeypatch.delenv("MODELPLEX_TEXT_UPSTREAM_PORT")
    monkeypatch.setenv("MODELPLEX_TEXT_UPSTREAM_URL", "triton-pool:8001")
    source = replica_source(TextPoolSettings())
    assert isinstance(source, InferencePoolSource) and source._port == "8001"  # no port named: the URL's


def test_url_port_and_namespace():
    assert url_port("http://svc:8000/v1,http://other:9000/v1") == "8000"
    assert url_port("http://llama-pool/v1") == url_port("") == ""
    assert url_port("triton:8001") == "8001"


def test_namespace_outside_a_pod_comes_from_pod_namespace(monkeypatch):
    # No service-account namespace file here (not in a pod).
    monkeypatch.setenv("POD_NAMESPACE", "ml-prod")
    assert default_namespace() == "ml-prod"
    monkeypatch.delenv("POD_NAMESPACE")
    assert default_namespace() == "default"


async def test_a_silent_watch_is_abandoned_and_resumed():
    """A watch that outlives its timeoutSeconds without a byte (a half-open connection) is read again."""
    replay = Replay(
        lists=[(10, [endpoint_slice("s", 10, endpoint("10.0.0.1"))])],
        streams=[[HOLD], [HOLD]],  # the server never ends them, nor writes
        path=ENDPOINT_SLICES,
        list_kind="EndpointSliceList",
    )
    port = free_port()
    runner = await serve(replay, port)
    timing = WatchTiming(watch_timeout_seconds=1, backoff_max_seconds=0.2)
    snapshots = Snapshots(EndpointSliceSource(api_client(f"http://127.0.0.1:{port}"), "ml", "svc", "http", timing))
    try:
        await snapshots.until({"10.0.0.1:8000"})
        await until(lambda: len(_watches(replay)) >= 2, 30, what="a new watch after the silent one")
        assert [r["resourceVersion"] for r in _watches(replay)][:2] == ["10", "10"]
        assert [r["timeoutSeconds"] for r in _watches(replay)][:2] == ["1", "1"]
    finally:
        await snapshots.close()
        replay.closing.set()
        await runner.cleanup()
