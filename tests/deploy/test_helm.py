"""The Helm chart, rendered and linted by the real Helm engine (helm-python-sdk, Helm v4).

No cluster and no network: Chart.render is Helm's offline template engine.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from modelplex_edge.endpoints import BODY_LIMITS
from modelplex_edge.settings import EdgeSettings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "modelplex"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "modelplex"
NAMESPACE = "mpx"

SMOLLM2 = {
    "id": "smollm2-135m-instruct",
    "aliases": ["smollm2"],
    "modality": "text",
    "engine": {"kind": "llamacpp"},
    "capabilities": ["chat", "completions"],
    "contextLength": 8192,
}
LLAMA_VLLM = {
    "id": "llama-3.1-8b-instruct",
    "modality": "text",
    "engine": {
        "kind": "openai",
        "vllm": {"enabled": True, "hfModel": "meta-llama/Llama-3.1-8B-Instruct", "gpus": 2},
    },
    "capabilities": ["chat"],
}


def svc_host(name: str) -> str:
    return f"{name}.{NAMESPACE}.svc.cluster.local"


# The chart refuses to render without a key; tests that do not test keys let it generate one.
TEST_KEY = {"edge": {"devApiKey": {"generate": True}}}


def with_test_key(values: dict[str, Any] | None) -> dict[str, Any]:
    values = dict(values or {})
    if "devApiKey" not in values.get("edge", {}):
        edge = dict(values.get("edge", {}))
        edge["devApiKey"] = TEST_KEY["edge"]["devApiKey"]
        values["edge"] = edge
    return values


def render(values: dict[str, Any] | None = None, test_key: bool = True) -> list[dict[str, Any]]:
    """Render the chart; return every Kubernetes object."""
    if test_key:
        values = with_test_key(values)
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in manifests.items():
        if not path.endswith((".yaml", ".yml")):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, got {[o['metadata']['name'] for o in find(objects, kind)]}"
    return found[0]


def container(deployment: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def catalog(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    cm = one(objects, "ConfigMap", f"{RELEASE}-catalog")
    doc = yaml.safe_load(cm["data"]["catalog.yaml"])
    return {m["id"]: m for m in doc["models"]}


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render()


# ------------------------------------------------------------------ lint


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_lint_passes(values_file: Path | None) -> None:
    values = helm.values_from_yaml(values_file.read_text()) if values_file else TEST_KEY
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_ci_values_render(values_file: Path) -> None:
    objects = render(helm.values_from_yaml(values_file.read_text()))
    assert find(objects, "Deployment", f"{RELEASE}-edge")
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "duplicate objects"


def test_chart_metadata() -> None:
    with helm.Chart.load(CHART) as chart:
        assert chart.metadata["apiVersion"] == "v2"
        assert chart.name == "modelplex"
        assert chart.schema is not None


def test_unknown_engine_is_refused_naming_the_known_ones() -> None:
    """Checked against backends.<modality>.engines when rendering (the schema names no modality)."""
    with pytest.raises(helm.HelmRenderError, match=r"engine\.kind must be one of llamacpp, openai, triton"):
        render({"models": [{"id": "x", "engine": {"kind": "bogus"}}]})


# ------------------------------------------------------------------ defaults


def test_default_objects(default_objects: list[dict[str, Any]]) -> None:
    deployments = {o["metadata"]["name"] for o in find(default_objects, "Deployment")}
    assert deployments == {
        f"{RELEASE}-edge",
        f"{RELEASE}-catalog",
        f"{RELEASE}-text-smollm2-135m-instruct",
    }
    services = {o["metadata"]["name"] for o in find(default_objects, "Service")}
    assert services == deployments
    assert find(default_objects, "ConfigMap", f"{RELEASE}-catalog")
    assert find(default_objects, "Secret", f"{RELEASE}-dev-api-key")
    assert find(default_objects, "PodDisruptionBudget", f"{RELEASE}-edge")
    assert not find(default_objects, "Ingress")
    # Backends are walled off by default (a no-op where the CNI ignores NetworkPolicy).
    policies = {o["metadata"]["name"] for o in find(default_objects, "NetworkPolicy")}
    assert {f"{RELEASE}-{name}-ingress" for name in ("edge", "catalog", "text")} <= policies
    # Nothing asks for a GPU by default.
    for d in find(default_objects, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})


def test_catalog_configmap(default_objects: list[dict[str, Any]]) -> None:
    models = catalog(default_objects)
    assert set(models) == {"smollm2-135m-instruct"}
    smol = models["smollm2-135m-instruct"]
    assert smol["backend"] == f"{svc_host(f'{RELEASE}-text-smollm2-135m-instruct')}:50061"
    assert smol["modality"] == "text"
    assert smol["aliases"] == ["smollm2"]
    assert smol["engine"]["kind"] == "llamacpp"
    # The chart's per-engine defaults and the model's own settings, merged into one dict.
    assert smol["engine"]["settings"] == {"default_temperature": 0.2, "default_top_p": 0.9, "threads": 2}
    assert smol["context_length"] == 8192
    assert isinstance(smol["created"], int)
    assert "chat" in smol["capabilities"]
    svc = one(default_objects, "Service", f"{RELEASE}-text-smollm2-135m-instruct")
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == 50061


def test_catalog_deployment(default_objects: list[dict[str, Any]]) -> None:
    dep = one(default_objects, "Deployment", f"{RELEASE}-catalog")
    c = container(dep)
    assert c["command"] == ["python", "-m", "modelplex_catalog"]
    e = env(c)
    assert e["MODELPLEX_CATALOG"] == "/etc/modelplex/catalog.yaml"
    assert e["MODELPLEX_CATALOG_LISTEN"] == "0.0.0.0:50051"
    assert e["MODELPLEX_METRICS_PORT"] == "9090"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "catalog")
    # A directory mount: subPath mounts never see ConfigMap updates (hot reload).
    assert mount["mountPath"] == "/etc/modelplex" and "subPath" not in mount
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "catalog")
    assert volume["configMap"]["name"] == f"{RELEASE}-catalog"


def test_edge_deployment(default_objects: list[dict[str, Any]]) -> None:
    dep = one(default_objects, "Deployment", f"{RELEASE}-edge")
    c = container(dep, "edge")
    assert c["command"] == ["python", "-m", "modelplex_edge"]
    assert c["ports"][0]["containerPort"] == 8080
    e = env(c)
    assert e["MODELPLEX_EDGE_PORT"] == "8080"
    assert e["MODELPLEX_EDGE_CATALOG_TARGET"] == f"{svc_host(f'{RELEASE}-catalog')}:50051"
    assert e["MODELPLEX_DEV_API_KEY"]["secretKeyRef"]["name"] == f"{RELEASE}-dev-api-key"
    assert e["MODELPLEX_EDGE_CORS_ORIGINS"] == ""
    assert int(e["MODELPLEX_EDGE_MAX_BODY_BYTES"]) > 0
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    secret = one(default_objects, "Secret", f"{RELEASE}-dev-api-key")
    assert base64.b64decode(secret["data"]["api-key"]).startswith(b"sk-modelplex-dev-")


def test_backend_probes_are_grpc(default_objects: list[dict[str, Any]]) -> None:
    for name, port in [("catalog", 50051), ("text-smollm2-135m-instruct", 50061)]:
        c = container(one(default_objects, "Deployment", f"{RELEASE}-{name}"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, (name, probe)


def test_text_backend_llamacpp(default_objects: list[dict[str, Any]]) -> None:
    dep = one(default_objects, "Deployment", f"{RELEASE}-text-smollm2-135m-instruct")
    c = container(dep)
    assert c["command"] == ["python", "-m", "modelplex_text"]
    e = env(c)
    assert e["MODELPLEX_TEXT_LISTEN"] == "0.0.0.0:50061"
    assert e["MODELPLEX_TEXT_ENGINE"] == "llamacpp"
    assert "MODELPLEX_TEXT_MODEL_PATH" not in e  # unset: the GGUF packaged in the image
    assert e["MODELPLEX_TEXT_THREADS"] == "2"
    assert e["MODELPLEX_TEXT_DEFAULT_TEMPERATURE"] == "0.2"
    assert e["MODELPLEX_METRICS_PORT"] == "9090"
    assert "MODELPLEX_TEXT_MODEL_ID" not in e  # read by nothing


def test_pods_run_as_non_root(default_objects: list[dict[str, Any]]) -> None:
    for dep in find(default_objects, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_selectors_match_pods(default_objects: list[dict[str, Any]]) -> None:
    for dep in find(default_objects, "Deployment"):
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        svc = one(default_objects, "Service", dep["metadata"]["name"])
        assert svc["spec"]["selector"].items() <= labels.items()
        # No Service selects the pods of another Deployment.
        for other in find(default_objects, "Deployment"):
            if other is not dep:
                other_labels = other["spec"]["template"]["metadata"]["labels"]
                assert not svc["spec"]["selector"].items() <= other_labels.items()


def test_image_tag_overrides() -> None:
    objects = render({"edge": {"image": {"repository": "registry.local/modelplex/edge", "tag": "abc123"}}})
    c = container(one(objects, "Deployment", f"{RELEASE}-edge"), "edge")
    assert c["image"] == "registry.local/modelplex/edge:abc123"


def test_explicit_dev_api_key() -> None:
    objects = render({"edge": {"devApiKey": {"value": "sk-test"}}})
    secret = one(objects, "Secret", f"{RELEASE}-dev-api-key")
    assert base64.b64decode(secret["data"]["api-key"]) == b"sk-test"


def test_existing_dev_api_key_secret() -> None:
    # With the gatekeeper, a key the chart does not know needs a keys file of your own.
    from helm_python.errors import HelmRenderError

    with pytest.raises(HelmRenderError, match=r"gatekeeper\.keys\.existingSecret is required"):
        render({"edge": {"devApiKey": {"existingSecret": "mine", "secretKey": "k"}}})
    objects = render(
        {
            "edge": {"devApiKey": {"existingSecret": "mine", "secretKey": "k"}},
            "gatekeeper": {"keys": {"existingSecret": "team-keys"}},
        }
    )
    assert not find(objects, "Secret")
    e = env(container(one(objects, "Deployment", f"{RELEASE}-edge"), "edge"))
    assert e["MODELPLEX_DEV_API_KEY"]["secretKeyRef"] == {"name": "mine", "key": "k"}


# ------------------------------------------------------------------ GPU engines


def test_vllm_model() -> None:
    objects = render({"models": [SMOLLM2, LLAMA_VLLM]})
    vllm = one(objects, "Deployment", f"{RELEASE}-vllm-llama-3-1-8b-instruct")
    c = container(vllm)
    assert c["image"].startswith("vllm/vllm-openai:")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    args = c["args"]
    assert args[args.index("--model") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    assert args[args.index("--served-model-name") + 1] == "llama-3.1-8b-instruct"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert c["ports"][0]["containerPort"] == 8000
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    pod = vllm["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and pod["tolerations"]
    assert {v["name"] for v in pod["volumes"]} >= {"cache", "dshm"}
    vllm_svc = one(objects, "Service", f"{RELEASE}-vllm-llama-3-1-8b-instruct")
    assert vllm_svc["spec"]["ports"][0]["port"] == 8000

    text = container(one(objects, "Deployment", f"{RELEASE}-text-llama-3-1-8b-instruct"))
    e = env(text)
    assert e["MODELPLEX_TEXT_ENGINE"] == "openai"
    assert e["MODELPLEX_TEXT_UPSTREAM_URL"] == f"http://{svc_host(f'{RELEASE}-vllm-llama-3-1-8b-instruct')}:8000/v1"
    assert e["MODELPLEX_TEXT_UPSTREAM_MODEL"] == "llama-3.1-8b-instruct"
    assert "nvidia.com/gpu" not in text["resources"].get("limits", {})
    for probe in ("readinessProbe", "livenessProbe"):
        assert text[probe]["grpc"]["port"] == 50061

    models = catalog(objects)
    assert set(models) == {"smollm2-135m-instruct", "llama-3.1-8b-instruct"}
    llama = models["llama-3.1-8b-instruct"]
    assert llama["backend"] == f"{svc_host(f'{RELEASE}-text-llama-3-1-8b-instruct')}:50061"
    assert llama["engine"]["kind"] == "openai"
    assert llama["engine"]["settings"]["upstream_url"] == e["MODELPLEX_TEXT_UPSTREAM_URL"]


def test_vllm_cache_pvc() -> None:
    objects = render({"models": [LLAMA_VLLM], "engines": {"vllm": {"cache": {"persistence": True}}}})
    pvc = one(objects, "PersistentVolumeClaim", f"{RELEASE}-vllm-llama-3-1-8b-instruct-cache")
    vllm = one(objects, "Deployment", f"{RELEASE}-vllm-llama-3-1-8b-instruct")
    cache = next(v for v in vllm["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache")
    assert cache["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_triton_model() -> None:
    model = {
        "id": "qwen2.5-7b-instruct",
        "modality": "text",
        "engine": {
            "kind": "triton",
            "settings": {"triton_flavor": "trtllm", "tokenizer_path": "/tok/model.gguf"},
            "triton": {"enabled": True, "modelName": "ensemble"},
        },
    }
    objects = render({"models": [model]})
    triton = one(objects, "Deployment", f"{RELEASE}-triton-qwen2-5-7b-instruct")
    c = container(triton)
    assert c["image"].startswith("nvcr.io/nvidia/tritonserver:") and c["image"].endswith("-trtllm-python-py3")
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])
    e = env(container(one(objects, "Deployment", f"{RELEASE}-text-qwen2-5-7b-instruct")))
    assert e["MODELPLEX_TEXT_ENGINE"] == "triton"
    assert e["MODELPLEX_TEXT_UPSTREAM_URL"] == f"{svc_host(f'{RELEASE}-triton-qwen2-5-7b-instruct')}:8001"
    assert e["MODELPLEX_TEXT_UPSTREAM_MODEL"] == "ensemble"
    assert e["MODELPLEX_TEXT_TRITON_FLAVOR"] == "trtllm"
    assert e["MODELPLEX_TEXT_TOKENIZER_PATH"] == "/tok/model.gguf"


def test_external_engines_need_no_engine_deployment() -> None:
    models = [
        {
            "id": "ext-openai",
            "engine": {
                "kind": "openai",
                "settings": {"upstream_url": "http://vllm.other:8000/v1", "upstream_model": "m"},
                "secretSettings": {"upstream_api_key": {"name": "up-key", "key": "token"}},
            },
        },
        {"id": "ext-triton", "engine": {"kind": "triton", "settings": {"upstream_url": "triton.other:8001"}}},
        {"id": "bge-small", "modality": "embeddings", "backend": "embeddings.other:50062"},
    ]
    objects = render({"models": models})
    names = {o["metadata"]["name"] for o in find(objects, "Deployment")}
    assert names == {
        f"{RELEASE}-edge",
        f"{RELEASE}-catalog",
        f"{RELEASE}-text-ext-openai",
        f"{RELEASE}-text-ext-triton",
    }
    e = env(container(one(objects, "Deployment", f"{RELEASE}-text-ext-openai")))
    assert e["MODELPLEX_TEXT_UPSTREAM_URL"] == "http://vllm.other:8000/v1"
    assert e["MODELPLEX_TEXT_UPSTREAM_MODEL"] == "m"
    assert e["MODELPLEX_TEXT_UPSTREAM_API_KEY"]["secretKeyRef"] == {"name": "up-key", "key": "token"}
    cat = catalog(objects)
    assert "upstream_api_key" not in cat["ext-openai"]["engine"]["settings"]  # secrets stay out of the ConfigMap
    assert cat["bge-small"]["backend"] == "embeddings.other:50062"
    assert cat["ext-triton"]["engine"]["settings"]["upstream_url"] == "triton.other:8001"


def test_disabled_model_is_skipped() -> None:
    objects = render({"models": [SMOLLM2, {**LLAMA_VLLM, "enabled": False}]})
    assert set(catalog(objects)) == {"smollm2-135m-instruct"}
    assert not find(objects, "Deployment", f"{RELEASE}-vllm-llama-3-1-8b-instruct")


@pytest.mark.parametrize(
    "model",
    [
        {"id": "no-upstream", "engine": {"kind": "openai"}},
        {"id": "no-hf-model", "engine": {"kind": "openai", "vllm": {"enabled": True}}},
        {"id": "vllm-needs-openai", "engine": {"kind": "llamacpp", "vllm": {"enabled": True, "hfModel": "x/y"}}},
    ],
    ids=lambda m: m["id"],
)
def test_inconsistent_models_fail(model: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError):
        chart.render(with_test_key({"models": [model]}), name=RELEASE, namespace=NAMESPACE)


def test_colliding_model_names_fail() -> None:
    models = [{"id": "a.b", "engine": {"kind": "llamacpp"}}, {"id": "a-b", "engine": {"kind": "llamacpp"}}]
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError):
        chart.render(with_test_key({"models": models}), name=RELEASE, namespace=NAMESPACE)


def test_same_id_in_two_modalities_is_fine() -> None:
    models = [
        {"id": "m", "engine": {"kind": "llamacpp"}},
        {"id": "m-embed", "modality": "embeddings", "engine": {"kind": "local"}},
        {"id": "m", "modality": "speech", "engine": {"kind": "espeak"}, "enabled": False},
    ]
    names = {o["metadata"]["name"] for o in find(render({"models": models}), "Deployment")}
    assert {f"{RELEASE}-text-m", f"{RELEASE}-embeddings-m-embed"} <= names


def test_engine_kind_checked_against_the_backends_row() -> None:
    """The template validates against backends.<m>.engines (values a user may narrow), not only the schema."""
    values = {
        "backends": {"embeddings": {"engines": ["local"]}},
        "models": [
            {"id": "e", "modality": "embeddings", "engine": {"kind": "openai", "settings": {"upstream_url": "u"}}}
        ],
    }
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match="must be one of local"):
        chart.render(with_test_key(values), name=RELEASE, namespace=NAMESPACE)


# ------------------------------------------------------------------ edge extras


def test_ingress() -> None:
    objects = render(
        {"ingress": {"enabled": True, "className": "nginx", "host": "api.example.com", "tls": {"enabled": True}}}
    )
    ing = one(objects, "Ingress", f"{RELEASE}-edge")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert ing["spec"]["ingressClassName"] == "nginx"
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "api.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == f"{RELEASE}-edge"
    assert rule["http"]["paths"][0]["path"] == "/v1"  # metrics and probes are not public
    assert ing["spec"]["tls"][0]["hosts"] == ["api.example.com"]
    # nginx must pass every body the edge accepts, or a 25 MB upload gets nginx's HTML 413.
    assert nginx_size(ann["nginx.ingress.kubernetes.io/proxy-body-size"]) >= largest_body()


def nginx_size(value: str) -> int:
    """nginx's size syntax: bytes, or k/m/g suffixes in powers of 1024."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    suffix = value[-1].lower()
    return int(value[:-1]) * units[suffix] if suffix in units else int(value)


def test_cors_and_autoscaling() -> None:
    objects = render(
        {"edge": {"corsOrigins": ["https://a.example", "https://b.example"], "autoscaling": {"enabled": True}}}
    )
    dep = one(objects, "Deployment", f"{RELEASE}-edge")
    assert "replicas" not in dep["spec"]
    assert env(container(dep, "edge"))["MODELPLEX_EDGE_CORS_ORIGINS"] == "https://a.example,https://b.example"
    assert one(objects, "HorizontalPodAutoscaler", f"{RELEASE}-edge")
    assert one(objects, "PodDisruptionBudget", f"{RELEASE}-edge")


def test_single_edge_replica_has_no_pdb() -> None:
    assert not find(render({"edge": {"replicaCount": 1}}), "PodDisruptionBudget")


def test_network_policies() -> None:
    objects = render({"networkPolicy": {"enabled": True}, "models": [SMOLLM2, LLAMA_VLLM]})
    policies = {o["metadata"]["name"]: o for o in find(objects, "NetworkPolicy")}
    text = policies[f"{RELEASE}-text-ingress"]
    assert text["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "text"
    callers = [
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in text["spec"]["ingress"][0]["from"]
    ]
    assert callers == ["edge"]  # the edge makes the text call behind translations, no backend does
    assert text["spec"]["ingress"][0]["ports"] == [{"port": "grpc"}]
    vllm = policies[f"{RELEASE}-vllm-llama-3-1-8b-instruct-ingress"]
    assert vllm["spec"]["podSelector"]["matchLabels"]["modelplex.io/model"] == "llama-3-1-8b-instruct"
    (peer,) = vllm["spec"]["ingress"][0]["from"]
    # Only the model's own backend pods, not every text pod.
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "text"
    assert peer["podSelector"]["matchLabels"]["modelplex.io/model"] == "llama-3-1-8b-instruct"
    edge = policies[f"{RELEASE}-edge-ingress"]
    assert edge["spec"]["ingress"] == [{"ports": [{"port": "http"}]}]


def test_termination_grace_covers_the_drain_and_the_prestop_delay() -> None:
    component = "app.kubernetes.io/component"
    deployments = [
        d for d in find(render(), "Deployment") if d["metadata"]["labels"].get(component) in {"edge", "text"}
    ]
    assert len(deployments) >= 2
    for deployment in deployments:
        spec = deployment["spec"]["template"]["spec"]
        main = spec["containers"][0]
        grace = int(env(main)["MODELPLEX_GRACE_SECONDS"])
        assert grace >= 600, "the drain must cover the longest backend call (the edge's 600 s deadline)"
        assert "time.sleep(5)" in main["lifecycle"]["preStop"]["exec"]["command"][-1]
        assert spec["terminationGracePeriodSeconds"] >= grace + 5 + 5


def _volumes(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}


def test_gatekeeper_sidecar(default_objects: list[dict[str, Any]]) -> None:
    from modelplex_gatekeeper.keys import KeysFile

    dep = one(default_objects, "Deployment", f"{RELEASE}-edge")
    edge, gk = container(dep, "edge"), container(dep, "gatekeeper")
    assert gk["command"] == ["python", "-m", "modelplex_gatekeeper"]
    assert gk["image"] == edge["image"]  # the edge image carries the gatekeeper
    socket = "unix:///run/modelplex/gatekeeper.sock"
    assert env(edge)["MODELPLEX_EDGE_GATEKEEPER_TARGET"] == socket
    e = env(gk)
    assert e["MODELPLEX_GATEKEEPER_LISTEN"] == socket
    assert e["MODELPLEX_KEYS_FILE"] == "/etc/modelplex/keys/keys.yaml"
    assert "MODELPLEX_GATEKEEPER_REDIS_URL" not in e
    # No Redis: each pod's own stores, on the volume its jobs process shares (tests/deploy/test_chart_jobs.py).
    assert env(edge)["MODELPLEX_EDGE_RESPONSES_STORE"] == "sqlite"
    assert "modelplex_gatekeeper" not in str(edge.get("command"))
    assert socket.removeprefix("unix://") in " ".join(gk["livenessProbe"]["exec"]["command"])
    mounts = {m["name"]: m for m in gk["volumeMounts"]}
    keys_mount = mounts["gatekeeper-keys"]
    assert keys_mount["mountPath"] == "/etc/modelplex/keys" and "subPath" not in keys_mount
    assert {m["name"] for m in edge["volumeMounts"]} >= {"gatekeeper-socket"}
    volumes = _volumes(dep)
    assert volumes["gatekeeper-keys"]["secret"]["secretName"] == f"{RELEASE}-dev-api-key"
    # The keys file the chart writes holds the generated dev key, hashed as the gatekeeper hashes it.
    secret = one(default_objects, "Secret", f"{RELEASE}-dev-api-key")
    dev_key = base64.b64decode(secret["data"]["api-key"]).decode()
    keys_yaml = base64.b64decode(secret["data"]["keys.yaml"]).decode()
    assert dev_key not in keys_yaml
    record = KeysFile.parse(keys_yaml)
    found = record.keys[0]
    assert record.digest(dev_key) == found.hash and found.rpm == 600 and found.max_concurrent == 64


def test_gatekeeper_with_redis_and_own_keys_secret() -> None:
    objects = render(
        {
            "gatekeeper": {
                "keys": {"existingSecret": "team-keys"},
                "redis": {"url": "redis://redis.cache:6379/0", "failure": "closed"},
            }
        }
    )
    dep = one(objects, "Deployment", f"{RELEASE}-edge")
    e = env(container(dep, "gatekeeper"))
    assert e["MODELPLEX_GATEKEEPER_REDIS_URL"] == "redis://redis.cache:6379/0"
    assert e["MODELPLEX_GATEKEEPER_REDIS_FAILURE"] == "closed"
    # Stored responses share the same Redis, so any edge replica continues any conversation.
    edge = env(container(dep, "edge"))
    assert edge["MODELPLEX_EDGE_RESPONSES_STORE"] == "redis"
    assert edge["MODELPLEX_EDGE_RESPONSES_REDIS_URL"] == "redis://redis.cache:6379/0"
    assert _volumes(dep)["gatekeeper-keys"]["secret"]["secretName"] == "team-keys"
    secret = one(objects, "Secret", f"{RELEASE}-dev-api-key")
    assert "keys.yaml" not in secret["data"]


def test_gatekeeper_lease_values_reach_the_edge_and_the_sidecar(default_objects: list[dict[str, Any]]) -> None:
    from modelplex_gatekeeper.settings import GatekeeperSettings

    def envs(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        dep = one(objects, "Deployment", f"{RELEASE}-edge")
        return env(container(dep, "edge")), env(container(dep, "gatekeeper"))

    edge, gk = envs(default_objects)
    # The chart's defaults are the services' own.
    assert (edge["MODELPLEX_EDGE_GATEKEEPER_LEASES"], edge["MODELPLEX_EDGE_GATEKEEPER_FAILURE"]) == ("true", "closed")
    assert EdgeSettings().gatekeeper_leases and EdgeSettings().gatekeeper_failure == "closed"
    assert float(gk["MODELPLEX_GATEKEEPER_LEASE_SECONDS"]) == GatekeeperSettings().lease_seconds
    edge, gk = envs(render({"gatekeeper": {"leases": {"enabled": False, "seconds": 2.5, "sidecarFailure": "open"}}}))
    assert (edge["MODELPLEX_EDGE_GATEKEEPER_LEASES"], edge["MODELPLEX_EDGE_GATEKEEPER_FAILURE"]) == ("false", "open")
    assert gk["MODELPLEX_GATEKEEPER_LEASE_SECONDS"] == "2.5"
    # ...and the services read them as such.
    settings = EdgeSettings(gatekeeper_leases=edge["MODELPLEX_EDGE_GATEKEEPER_LEASES"],
                            gatekeeper_failure=edge["MODELPLEX_EDGE_GATEKEEPER_FAILURE"])
    assert settings.gatekeeper_leases is False and settings.gatekeeper_failure == "open"
    with pytest.raises(Exception, match="sidecarFailure"):
        render({"gatekeeper": {"leases": {"sidecarFailure": "sometimes"}}})


def test_gatekeeper_embedded_and_disabled() -> None:
    dep = one(render({"gatekeeper": {"mode": "embedded"}}), "Deployment", f"{RELEASE}-edge")
    assert "gatekeeper" not in {c["name"] for c in dep["spec"]["template"]["spec"]["containers"]}  # no sidecar
    edge = container(dep, "edge")
    assert env(edge)["MODELPLEX_EDGE_GATEKEEPER_TARGET"] == "embedded"
    assert env(edge)["MODELPLEX_KEYS_FILE"] == "/etc/modelplex/keys/keys.yaml"
    dep = one(render({"gatekeeper": {"enabled": False}}), "Deployment", f"{RELEASE}-edge")
    assert "MODELPLEX_EDGE_GATEKEEPER_TARGET" not in env(container(dep, "edge"))


def largest_body() -> int:
    """The largest body the edge accepts (an upload endpoint's own limit, e.g. /v1/files' 200 MB)."""
    settings = EdgeSettings()
    return max(settings.max_upload_bytes, *(limit(settings) for limit in BODY_LIMITS.values()))
