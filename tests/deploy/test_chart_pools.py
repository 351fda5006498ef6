"""Engine pools in the chart: headless engine Services, replicas, the backend's discovery settings and RBAC."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from modelplex_catalog.kube import spec_from_resource
from tests.deploy.test_helm import (
    CHART,
    LLAMA_VLLM,
    NAMESPACE,
    RELEASE,
    SMOLLM2,
    find,
    one,
    render,
    svc_host,
    with_test_key,
)

CRD = yaml.safe_load((CHART / "crds" / "models.modelplex.io.yaml").read_text())
POOLS = helm.values_from_yaml((CHART / "ci" / "pools-values.yaml").read_text())
DISCOVERY = f"{RELEASE}-pool-discovery"


@pytest.fixture(scope="module")
def pools() -> list[dict[str, Any]]:
    return render(POOLS)


def _pod(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return one(objects, kind, name)["spec"]["template"]["spec"]


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0].get("env", [])}


def test_chart_run_engines_scale_to_pool_replicas_behind_headless_services(pools):
    vllm = one(pools, "StatefulSet", f"{RELEASE}-vllm-llama-3-1-8b-instruct")  # cache per replica
    triton = one(pools, "Deployment", f"{RELEASE}-triton-qwen2-5-7b-instruct")
    assert (vllm["spec"]["replicas"], triton["spec"]["replicas"]) == (3, 2)
    for name in ("vllm-llama-3-1-8b-instruct", "triton-qwen2-5-7b-instruct"):
        assert one(pools, "Service", f"{RELEASE}-{name}")["spec"]["clusterIP"] == "None"


def test_backends_are_told_where_their_replicas_are(pools):
    llama = _env(_pod(pools, "Deployment", f"{RELEASE}-text-llama-3-1-8b-instruct"))
    assert llama["MODELPLEX_TEXT_UPSTREAM_DISCOVERY"] == "endpointslices"
    assert llama["MODELPLEX_TEXT_UPSTREAM_SERVICE"] == f"{RELEASE}-vllm-llama-3-1-8b-instruct"
    assert llama["MODELPLEX_TEXT_UPSTREAM_PORT"] == "http"
    # The URL keeps the scheme and path each replica is called with.
    url = llama["MODELPLEX_TEXT_UPSTREAM_URL"]
    assert url.startswith("http://") and url.endswith("/v1")
    qwen = _env(_pod(pools, "Deployment", f"{RELEASE}-text-qwen2-5-7b-instruct"))
    assert qwen["MODELPLEX_TEXT_UPSTREAM_DISCOVERY"] == "endpointslices"
    assert qwen["MODELPLEX_TEXT_UPSTREAM_PORT"] == "grpc"  # Triton's gRPC port, one channel per replica
    assert qwen["MODELPLEX_TEXT_POOL_METRICS_PORT"] == "8002"  # its queue, read by the picker (and KEDA)
    assert "MODELPLEX_TEXT_POOL_METRICS_PORT" not in llama  # vLLM's metrics are on its HTTP port
    gemma = _env(_pod(pools, "Deployment", f"{RELEASE}-text-gemma-3-27b-it"))
    assert gemma["MODELPLEX_TEXT_UPSTREAM_DISCOVERY"] == "inferencepool"
    assert gemma["MODELPLEX_TEXT_UPSTREAM_INFERENCE_POOL"] == "gemma-pool"
    for env in (llama, qwen, gemma):
        assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_a_pool_selector_gets_a_headless_service_of_its_own(pools):
    service = one(pools, "Service", f"{RELEASE}-pool-mistral-7b-instruct")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"app": "vllm-mistral"}
    assert service["spec"]["ports"] == [{"name": "engine", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    env = _env(_pod(pools, "Deployment", f"{RELEASE}-text-mistral-7b-instruct"))
    assert env["MODELPLEX_TEXT_UPSTREAM_SERVICE"] == service["metadata"]["name"]
    assert env["MODELPLEX_TEXT_UPSTREAM_PORT"] == "engine"
    host = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert env["MODELPLEX_TEXT_UPSTREAM_URL"] == f"http://{host}:8000/v1"


def test_discovery_rbac_reads_its_namespace_only(pools):
    read = ["get", "list", "watch"]
    assert one(pools, "Role", DISCOVERY)["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
        {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": read},
        {"apiGroups": [""], "resources": ["pods"], "verbs": read},
    ]
    binding = one(pools, "RoleBinding", DISCOVERY)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": DISCOVERY}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": DISCOVERY, "namespace": NAMESPACE}]
    assert not find(pools, "ClusterRole") and not find(pools, "ClusterRoleBinding")
    for name in ("llama-3-1-8b-instruct", "gemma-3-27b-it"):
        pod = _pod(pools, "Deployment", f"{RELEASE}-text-{name}")
        assert (pod["serviceAccountName"], pod["automountServiceAccountToken"]) == (DISCOVERY, True)
    # Engines never get a token.
    assert _pod(pools, "StatefulSet", f"{RELEASE}-vllm-llama-3-1-8b-instruct")["automountServiceAccountToken"] is False


def test_endpoint_slices_alone_need_no_pod_or_pool_access():
    objects = render({"models": [SMOLLM2, LLAMA_VLLM]})
    assert one(objects, "Role", DISCOVERY)["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    smollm2 = _pod(objects, "Deployment", f"{RELEASE}-text-smollm2-135m-instruct")
    assert smollm2["serviceAccountName"] == RELEASE and "automountServiceAccountToken" not in smollm2
    assert not any(k.endswith("UPSTREAM_DISCOVERY") or k == "POD_NAMESPACE" for k in _env(smollm2))


def test_no_pool_no_discovery_objects():
    objects = render({"models": [SMOLLM2]})
    assert not find(objects, "Role") and not find(objects, "ServiceAccount", DISCOVERY)


def test_the_picker_may_scrape_triton_metrics_from_the_backend(pools):
    policy = one(pools, "NetworkPolicy", f"{RELEASE}-triton-qwen2-5-7b-instruct-ingress")
    from_backend = policy["spec"]["ingress"][0]
    assert {p["port"] for p in from_backend["ports"]} == {"http", "grpc", "metrics"}


def test_models_carry_their_pool_and_the_crd_and_catalog_accept_it():
    objects = render(POOLS | {"catalog": {"source": "kubernetes"}})
    models = {m["spec"]["id"]: m for m in find(objects, "Model")}
    assert models["llama-3.1-8b-instruct"]["spec"]["pool"] == {"replicas": 3}
    assert models["gemma-3-27b-it"]["spec"]["pool"] == {"inferencePool": "gemma-pool"}
    schema = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for model in models.values():
        jsonschema.validate(model, schema)
        spec_from_resource(model)
    assert spec_from_resource(models["mistral-7b-instruct"]).pool.selector == {"app": "vllm-mistral"}
    bad = {**models["gemma-3-27b-it"], "spec": {**models["gemma-3-27b-it"]["spec"], "pool": {"replicas": -1}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _model(**fields: Any) -> dict[str, Any]:
    return {"models": [{"id": "m", "modality": "text", **fields}]}


OPENAI = {"kind": "openai"}
BAD_POOLS = {
    "selector and inferencePool": _model(engine=OPENAI, pool={"selector": {"a": "b"}, "inferencePool": "p", "port": 1}),
    "selector without port": _model(engine=OPENAI, pool={"selector": {"a": "b"}}),
    "selector with a named port": _model(engine=OPENAI, pool={"selector": {"a": "b"}, "port": "http"}),
    "empty selector": _model(engine=OPENAI, pool={"selector": {}, "port": 8000}),
    "unknown pool field": _model(engine=OPENAI, pool={"service": "x"}),
}


@pytest.mark.parametrize("values", BAD_POOLS.values(), ids=BAD_POOLS.keys())
def test_schema_rejects_bad_pools(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


VLLM = {"kind": "openai", "vllm": {"enabled": True, "hfModel": "x/y"}}
RENDER_REFUSES = {
    "a pool on a local engine": (
        _model(engine={"kind": "llamacpp"}, pool={"inferencePool": "p"}),
        "need engine.kind openai or triton",
    ),
    "a selector for a chart-run engine": (
        _model(engine=VLLM, pool={"selector": {"a": "b"}, "port": 8000}),
        "its replicas are pool.replicas",
    ),
    "replicas without a chart-run engine": (
        _model(engine={"kind": "openai", "settings": {"upstream_url": "http://x/v1"}}, pool={"replicas": 2}),
        "pool.replicas scales a chart-managed engine",
    ),
    "replicas sharing one ReadWriteOnce cache": (
        _model(engine={**VLLM, "vllm": {**VLLM["vllm"], "cachePersistence": True}}, pool={"replicas": 2}),
        "Multi-Attach",
    ),
}


@pytest.mark.parametrize(("values", "message"), RENDER_REFUSES.values(), ids=RENDER_REFUSES.keys())
def test_render_refuses(values: dict[str, Any], message: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match=message):
        chart.render(with_test_key(values), name=RELEASE, namespace=NAMESPACE)


def test_keda_scales_every_chart_run_engine_on_the_demand_its_backends_report():
    """The backends' pools report each model's demand (held, in flight, the engines' queues the picker reads) to
    the catalog's scaler under the model id; KEDA asks it there (external-push), no Prometheus in between."""
    objects = render(POOLS | {"autoscaling": {"keda": {"enabled": True, "maxReplicas": 6}}})
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in find(objects, "ScaledObject")}
    assert set(scaled) == {f"{RELEASE}-vllm-llama-3-1-8b-instruct", f"{RELEASE}-triton-qwen2-5-7b-instruct"}
    vllm, triton = scaled[f"{RELEASE}-vllm-llama-3-1-8b-instruct"], scaled[f"{RELEASE}-triton-qwen2-5-7b-instruct"]
    assert vllm["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"  # a cache claim per replica
    assert triton["spec"]["scaleTargetRef"]["kind"] == "Deployment" and triton["spec"]["maxReplicaCount"] == 6
    for model, obj in (("llama-3.1-8b-instruct", vllm), ("qwen2.5-7b-instruct", triton)):
        (trigger,) = obj["spec"]["triggers"]
        assert trigger == {
            "type": "external-push",
            "metadata": {"scalerAddress": f"{RELEASE}-catalog.{NAMESPACE}.svc:50051", "key": model,
                         "targetPerReplica": "16"},
        }
        backend = _env(_pod(objects, "Deployment", f"{RELEASE}-text-{model.replace('.', '-')}"))
        assert backend["MODELPLEX_TEXT_POOL_DEMAND_TARGET"] == f"{svc_host(f'{RELEASE}-catalog')}:50051"
        assert backend["MODELPLEX_TEXT_POOL_DEMAND_KEY"] == model
    # Pods you run (pool.selector, inferencePool) are yours to scale: no ScaledObject, and no reports unless the
    # model scales to zero.
    mistral = _env(_pod(objects, "Deployment", f"{RELEASE}-text-mistral-7b-instruct"))
    assert "MODELPLEX_TEXT_POOL_DEMAND_TARGET" not in mistral


def test_backends_of_remote_engines_share_their_picks_through_the_shared_redis(pools):
    """Several backend replicas of a model agree where prefixes live only if they share their picks
    (modelplex_kit/pools/sync.py): the chart hands them the Redis the edges share, URL or Secret."""
    names = [f"{RELEASE}-text-{m}" for m in ("llama-3-1-8b-instruct", "qwen2-5-7b-instruct")]
    assert all("MODELPLEX_TEXT_POOL_SYNC_URL" not in _env(_pod(pools, "Deployment", n)) for n in names)
    with_url = render(_with_redis(url="redis://redis:6379/0"))
    for name in names:
        assert _env(_pod(with_url, "Deployment", name))["MODELPLEX_TEXT_POOL_SYNC_URL"] == "redis://redis:6379/0"
    with_secret = render(_with_redis(existingSecret="shared-redis"))
    assert _env(_pod(with_secret, "Deployment", names[0]))["MODELPLEX_TEXT_POOL_SYNC_URL"] == {
        "secretKeyRef": {"name": "shared-redis", "key": "redis-url"}
    }


def _with_redis(**redis: str) -> dict[str, Any]:
    values = copy.deepcopy(POOLS)
    values.setdefault("gatekeeper", {}).setdefault("redis", {}).update(redis)
    return values


def test_a_text_models_vllm_publishes_its_kv_events_to_its_own_backends(pools):
    """vLLM's KV-cache events (ZMQ) are what every backend replica's view of the engines' caches is made
    of (modelplex_kit/pools/kv_events.py): the engine publishes them, the backend subscribes to that port,
    and the engine's ingress policy lets only the model's own backends in."""
    vllm = _pod(pools, "StatefulSet", f"{RELEASE}-vllm-llama-3-1-8b-instruct")["containers"][0]
    args = vllm["args"]
    config = yaml.safe_load(args[args.index("--kv-events-config") + 1])
    assert config == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557"}
    assert {"name": "kv-events", "containerPort": 5557, "protocol": "TCP"} in vllm["ports"]
    backend = _env(_pod(pools, "Deployment", f"{RELEASE}-text-llama-3-1-8b-instruct"))
    assert backend["MODELPLEX_TEXT_POOL_KV_EVENTS_PORT"] == "5557"
    policy = one(pools, "NetworkPolicy", f"{RELEASE}-vllm-llama-3-1-8b-instruct-ingress")
    assert {p["port"] for p in policy["spec"]["ingress"][0]["ports"]} == {"http", "kv-events"}
    # Triton publishes no events: its backends place prefixes by their shared picks alone.
    qwen = _env(_pod(pools, "Deployment", f"{RELEASE}-text-qwen2-5-7b-instruct"))
    assert "MODELPLEX_TEXT_POOL_KV_EVENTS_PORT" not in qwen
    # Off for one model, or for every one.
    values = copy.deepcopy(POOLS)
    llama = next(m for m in values["models"] if m["id"] == "llama-3.1-8b-instruct")
    llama["engine"]["vllm"]["kvEvents"] = False
    off = render(values)
    assert (
        "--kv-events-config"
        not in _pod(off, "StatefulSet", f"{RELEASE}-vllm-llama-3-1-8b-instruct")["containers"][0]["args"]
    )
    assert "MODELPLEX_TEXT_POOL_KV_EVENTS_PORT" not in _env(
        _pod(off, "Deployment", f"{RELEASE}-text-llama-3-1-8b-instruct")
    )
