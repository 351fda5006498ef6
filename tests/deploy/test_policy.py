"""Every object the chart (each value set) and every kustomize overlay render: valid for a pinned
Kubernetes version (kubernetes-validate's offline schemas, strict: unknown fields fail), and held to
the deployment policy. Engine exceptions are the documented ones (values.yaml, deploy/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.test_helm import CHART, CI_VALUES, render
from tests.deploy.test_kustomize import KUSTOMIZE, OVERLAYS, build, kubectl_path

# The oldest Kubernetes the deployment supports (gRPC probes need 1.27; pinned schemas ship
# with kubernetes-validate, so no network).
KUBERNETES_VERSION = "1.30.0"
MODEL_CRD = yaml.safe_load((CHART / "crds" / "models.modelplex.io.yaml").read_text())
# Engine images that need a writable root filesystem (documented in values.yaml / README).
WRITABLE_ROOT = {"vllm", "triton"}
# Only a laptop's configuration may carry a well-known key.
LOCAL = {"overlay:local-cpu"}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
# Objects of operators the chart can target (opt-in): their CRDs are not Kubernetes' own.
OPERATOR_KINDS = {"PodMonitor": "monitoring.coreos.com/v1", "ScaledObject": "keda.sh/v1alpha1"}


def _chart_sets() -> dict[str, list[dict[str, Any]]]:
    sets = {"chart:defaults": render()}
    for path in CI_VALUES:
        sets[f"chart:{path.name}"] = render(helm.values_from_yaml(path.read_text()))
    sets["chart:catalog-kubernetes"] = render({"catalog": {"source": "kubernetes"}})
    return sets


def _overlay_sets() -> dict[str, list[dict[str, Any]]]:
    kubectl = kubectl_path()
    return {f"overlay:{name}": build(kubectl, KUSTOMIZE / "overlays" / name) for name in OVERLAYS}


RENDERED = _chart_sets() | _overlay_sets()


def test_every_value_set_and_overlay_is_covered() -> None:
    names = {Path(n.split(":", 1)[1]).stem for n in RENDERED}
    assert {"cpu-values", "gpu-values", "gpu-ops-values", "external-values", "redis-values", "defaults"} <= names
    assert "pools-values" in names
    assert {"local-cpu", "gpu"} <= names


def _objects():
    for name, objects in RENDERED.items():
        for obj in objects:
            yield name, obj


def _pods(objects: list[dict[str, Any]]):
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield obj, obj["spec"]["template"]["spec"]


def _component(obj: dict[str, Any]) -> str:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_objects_validate_against_kubernetes_schemas(name: str) -> None:
    for obj in RENDERED[name]:
        if obj["kind"] in OPERATOR_KINDS:  # no upstream schema: the operator's CRD validates it
            assert obj["apiVersion"] == OPERATOR_KINDS[obj["kind"]], obj["kind"]
            continue
        if obj["kind"] == "Model":  # ours: validated against the CRD's schema
            jsonschema.validate(obj, MODEL_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_validation_can_fail() -> None:
    """The validator is not a no-op: an unknown field and a wrong type are refused."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_pods_are_hardened(name: str) -> None:
    for obj, pod in _pods(RENDERED[name]):
        where = f"{name}: {obj['metadata']['name']}"
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            assert sc.get("privileged") in (None, False), f"{where}/{c['name']}"
            if _component(obj) not in WRITABLE_ROOT:
                assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_resources_and_probes_are_set(name: str) -> None:
    for obj, pod in _pods(RENDERED[name]):
        for c in pod["containers"]:
            where = f"{name}: {obj['metadata']['name']}/{c['name']}"
            resources = c.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where
            assert "readinessProbe" in c and "livenessProbe" in c, where


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_images_are_pinned(name: str) -> None:
    for obj, pod in _pods(RENDERED[name]):
        for c in pod["containers"] + pod.get("initContainers", []):
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert (tag and tag != "latest") or "@sha256:" in image, f"{name}: {obj['metadata']['name']} {image}"


# Services of engine replicas: their backends' pools pick a replica per request from the EndpointSlices.
ENGINE_COMPONENTS = {"vllm", "triton", "pool"}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_grpc_and_engine_services_are_headless(name: str) -> None:
    for obj in RENDERED[name]:
        if obj["kind"] != "Service":
            continue
        grpc = any(p.get("name") == "grpc" or p.get("appProtocol") == "grpc" for p in obj["spec"]["ports"])
        # The edge balances per call over every pod (round_robin over DNS), a backend's pool over every
        # engine replica: a ClusterIP would spread connections, not calls.
        if grpc or _component(obj) in ENGINE_COMPONENTS:
            assert obj["spec"].get("clusterIP") == "None", f"{name}: {obj['metadata']['name']}"


def _names(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_api_access_is_namespaced_read_only_and_only_where_used(name: str) -> None:
    """No cluster-wide RBAC; a token only in pods whose ServiceAccount is bound to a Role; discovery reads."""
    objects = RENDERED[name]
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")], name
    roles, bindings = _names(objects, "Role"), _names(objects, "RoleBinding")
    bound = {s["name"]: roles[b["roleRef"]["name"]] for b in bindings.values() for s in b["subjects"]}
    for obj, pod in _pods(objects):
        where = f"{name}: {obj['metadata']['name']}"
        account = pod.get("serviceAccountName", "default")
        if pod.get("automountServiceAccountToken"):
            assert account in bound, f"{where}: a token for an account no Role is bound to"
        env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
        discovery = next((e["value"] for k, e in env.items() if k.endswith("_UPSTREAM_DISCOVERY")), "static")
        if discovery in ("endpointslices", "inferencepool"):
            assert pod.get("automountServiceAccountToken") is True, where
            assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", where
            rules = {(g, r): set(rule["verbs"]) for rule in bound[account]["rules"]
                     for g in rule["apiGroups"] for r in rule["resources"]}  # fmt: skip
            wanted = {("discovery.k8s.io", "endpointslices")}
            if discovery == "inferencepool":
                wanted |= {("inference.networking.k8s.io", "inferencepools"), ("", "pods")}
            assert wanted <= set(rules), f"{where}: {sorted(rules)}"
    for role in roles.values():
        if _component(role) == "pool-discovery":
            for rule in role["rules"]:
                assert set(rule["verbs"]) == {"get", "list", "watch"}, f"{name}: {rule}"
                assert set(rule["resources"]) <= {"endpointslices", "inferencepools", "pods"}, f"{name}: {rule}"


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_discovered_services_are_rendered_headless_with_the_named_port(name: str) -> None:
    services = _names(RENDERED[name], "Service")
    for obj, pod in _pods(RENDERED[name]):
        env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
        prefix = next((k.removesuffix("UPSTREAM_DISCOVERY") for k in env if k.endswith("_UPSTREAM_DISCOVERY")), "")
        if env.get(f"{prefix}UPSTREAM_DISCOVERY") != "endpointslices":
            continue
        service = services[env[f"{prefix}UPSTREAM_SERVICE"]]
        assert service["spec"]["clusterIP"] == "None", f"{name}: {obj['metadata']['name']}"
        assert env[f"{prefix}UPSTREAM_PORT"] in {p["name"] for p in service["spec"]["ports"]}, obj["metadata"]["name"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", []) if "value" in e}


# Workloads nothing routes requests to (no Service): no preStop delay to wait out, no request to drain (the jobs
# process puts what it runs back on its queues on SIGTERM).
UNROUTED = {"jobs"}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_grace_covers_the_longest_backend_call(name: str) -> None:
    for obj, pod in _pods(RENDERED[name]):
        env = _env(pod["containers"][0])
        if "MODELPLEX_GRACE_SECONDS" not in env:
            continue
        grace = float(env["MODELPLEX_GRACE_SECONDS"])
        assert pod["terminationGracePeriodSeconds"] >= grace, f"{name}: {obj['metadata']['name']}"
        if _component(obj) in UNROUTED:
            continue
        assert grace >= 600, f"{name}: {obj['metadata']['name']}: the edge allows backend calls of 600 s"
        pre_stop = pod["containers"][0]["lifecycle"]["preStop"]
        assert pre_stop, f"{name}: {obj['metadata']['name']}"


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_engines_drain_before_they_go(name: str) -> None:
    """Scale-down (KEDA, to zero too) and rollouts: a vLLM/Triton replica keeps serving while its endpoint turns
    terminating, then finishes what is in flight; the kubelet waits for both."""
    for obj, pod in _pods(RENDERED[name]):
        if _component(obj) not in {"vllm", "triton"}:
            continue
        engine = pod["containers"][0]
        sleep = engine["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep" and int(sleep[1]) > 0, f"{name}: {obj['metadata']['name']}"
        args = engine.get("args", [])
        if _component(obj) == "vllm":
            timeout = int(args[args.index("--shutdown-timeout") + 1])
        else:
            timeout = int(next(a for a in args if a.startswith("--exit-timeout-secs=")).split("=")[1])
        assert timeout >= 600, f"{name}: {obj['metadata']['name']}: the longest request (the edge's deadline)"
        assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + timeout, f"{name}: {obj['metadata']['name']}"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_every_workload_has_a_network_policy_when_enabled(name: str) -> None:
    objects = RENDERED[name]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    if not policies:
        # The chart walls backends off by default (a no-op where the CNI ignores NetworkPolicy); only the
        # laptop overlay goes without.
        assert name in {"overlay:local-cpu"}
        return
    for obj, _pod in _pods(objects):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert any(_selects(p["spec"]["podSelector"], labels) for p in policies), f"{name}: {obj['metadata']['name']}"


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_no_well_known_keys_outside_a_laptop(name: str) -> None:
    text = yaml.safe_dump_all(RENDERED[name])
    for placeholder in ("sk-modelplex-dev-change-me", "sk-modelplex-dev-local"):
        if name not in LOCAL:
            assert placeholder not in text, name
    if name.startswith("overlay:") and name not in LOCAL:
        assert not [o for o in RENDERED[name] if o["kind"] == "Secret"], name


# ------------------------------------------------------------------ engines (defects 6 and 7)

VLLM = {
    "id": "llama",
    "modality": "text",
    "engine": {"kind": "openai", "vllm": {"enabled": True, "hfModel": "meta-llama/Llama-3.1-8B-Instruct"}},
    "capabilities": ["chat"],
}


def _vllm(objects: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and _component(o) == "vllm")


def _with_vllm(**vllm: Any) -> dict[str, Any]:
    model = {**VLLM, "engine": {**VLLM["engine"], "vllm": {**VLLM["engine"]["vllm"], **vllm}}}
    return {"models": [model]}


def test_vllm_emptydir_cache_is_bounded_and_requested() -> None:
    pod = _vllm(render(_with_vllm()))["spec"]["template"]["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["emptyDir"]["sizeLimit"] == "100Gi"
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "100Gi"
    env = _env(pod["containers"][0])
    assert env["HOME"].startswith("/cache/")  # not root: every cache on the writable volume


def test_vllm_replicas_cannot_share_a_readwriteonce_cache() -> None:
    with pytest.raises(helm.HelmValuesError):  # the schema, per model
        render(_with_vllm(replicaCount=2, cachePersistence=True))
    with pytest.raises(helm.HelmValuesError):
        render(_with_vllm(replicaCount=2, cachePersistence=True, cacheAccessModes=["ReadWriteOnce"]))
    shared = render(_with_vllm(replicaCount=2, cachePersistence=True, cacheAccessModes=["ReadWriteMany"]))
    claim = next(o for o in shared if o["kind"] == "PersistentVolumeClaim" and _component(o) == "vllm")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # The chart-wide default (ReadWriteOnce) with replicas: refused at render with what to do.
    values = _with_vllm(replicaCount=2) | {"engines": {"vllm": {"cache": {"persistence": True}}}}
    with pytest.raises(helm.HelmRenderError, match="Multi-Attach"):
        render(values)
    assert render(_with_vllm(replicaCount=1, cachePersistence=True))  # one replica: fine


def test_engine_pods_run_as_non_root_with_documented_exceptions() -> None:
    gpu = render(helm.values_from_yaml((CHART / "ci" / "gpu-values.yaml").read_text()))
    for component in ("vllm", "triton"):
        pod = next(o for o in gpu if o["kind"] == "Deployment" and _component(o) == component)["spec"]["template"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] > 0
        assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False  # the exception


# ------------------------------------------------------------------ observability, autoscaling, GPU knobs

def _ops() -> list[dict[str, Any]]:
    return RENDERED["chart:gpu-ops-values.yaml"]


def test_edge_scales_on_requests_in_flight() -> None:
    (hpa,) = [o for o in _ops() if o["kind"] == "HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "modelplex_num_requests_running"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "48"}
    cpu = render({"edge": {"autoscaling": {"enabled": True, "metric": "cpu"}}})
    (hpa,) = [o for o in cpu if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_keda_scales_each_vllm_engine_through_the_catalogs_scaler() -> None:
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in _ops() if o["kind"] == "ScaledObject"}
    vllm = _vllm(_ops())
    (trigger,) = scaled[vllm["metadata"]["name"]]["spec"]["triggers"]
    assert trigger["type"] == "external-push"
    assert trigger["metadata"]["key"] == "llama-3.1-8b-instruct"
    assert trigger["metadata"]["scalerAddress"] == "modelplex-catalog.mpx.svc:50051"
    # The engines' replicas are KEDA's: an upgrade does not reset them.
    assert "replicas" not in vllm["spec"]
    # The scale-to-zero model, and the jobs Deployment, go down to zero; the other model keeps its minimum.
    assert scaled[vllm["metadata"]["name"]]["spec"]["minReplicaCount"] == 1
    assert scaled["modelplex-vllm-qwen2-5-7b-instruct"]["spec"]["minReplicaCount"] == 0
    assert scaled["modelplex-jobs"]["spec"]["minReplicaCount"] == 0
    # KEDA may add replicas: a shared ReadWriteOnce cache is refused.
    values = helm.values_from_yaml((CHART / "ci" / "gpu-ops-values.yaml").read_text())
    values["engines"]["vllm"] = {"cache": {"persistence": True}}
    with pytest.raises(helm.HelmRenderError, match="Multi-Attach"):
        render(values)


def test_pod_monitor_comes_with_a_network_policy_rule_for_prometheus() -> None:
    (monitor,) = [o for o in _ops() if o["kind"] == "PodMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics", "http", "jobs-http"}
    policies = [o for o in _ops() if o["kind"] == "NetworkPolicy"]
    prometheus = {"kubernetes.io/metadata.name": "monitoring"}
    assert any(
        peer.get("namespaceSelector", {}).get("matchLabels") == prometheus
        for p in policies
        for rule in p["spec"].get("ingress", [])
        for peer in rule.get("from", [])
    )
    with pytest.raises(helm.HelmRenderError, match="metricsFrom"):
        render({"networkPolicy": {"enabled": True}, "monitoring": {"podMonitor": {"enabled": True}}})


def test_gpu_scheduling_knobs() -> None:
    pod = _vllm(_ops())["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "modelplex-gpu"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == 1
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert pod["nodeSelector"] and pod["tolerations"]


@pytest.mark.parametrize(
    "values",
    [
        {"edge": {"autoscaling": {"metric": "memory"}}},
        {"autoscaling": {"keda": {"prometheusAddress": "http://prometheus:9090"}}},  # no Prometheus any more
        {"autoscaling": {"keda": {"targetPerReplica": 0}}},
        {"jobs": {"autoscaling": {"targetPerReplica": -1}}},
        {"jobs": {"workers": 4}},
        {"engines": {"drainSeconds": -1}},
        {"networkPolicy": {"kedaFrom": [{}]}},
        {"monitoring": {"podMonitor": {"interval": "often"}}},
        {"monitoring": {"serviceMonitor": {"enabled": True}}},
        {"models": [{**VLLM, "engine": {**VLLM["engine"], "vllm": {"enabled": True, "gpuResourceName": "a100"}}}]},
    ],
)
def test_schema_rejects_bad_ops_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_vllm_cache_per_replica_is_a_statefulset_with_claim_templates() -> None:
    objects = render(_with_vllm(replicaCount=3, cachePersistence=True, cachePerReplica=True))
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    (sts,) = [o for o in objects if o["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == sts["metadata"]["name"]
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "cache" and template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert all(v["name"] != "cache" for v in sts["spec"]["template"]["spec"]["volumes"])
    assert "cache" in {m["name"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    for obj in objects:
        if obj["kind"] == "StatefulSet":
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    keda = render(
        _with_vllm(cachePersistence=True, cachePerReplica=True) | {"autoscaling": {"keda": {"enabled": True}}}
    )
    (scaled,) = [o for o in keda if o["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
