"""The chart's generic backend template: one Deployment + headless Service per model of any modality.

The `backends` rows are the modality registry's rows (over `backendDefaults`) and the schema names no
modality; the catalog entry and the backend's environment come
from one settings dict; NetworkPolicies cover every workload; values.schema.json refuses bad values.
"""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest
import yaml

from modelplex_kit.modalities import REGISTRY
from tests.deploy.test_helm import CHART, NAMESPACE, RELEASE, catalog, container, env, find, one, render, with_test_key

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
CPU_VALUES = helm.values_from_yaml((CHART / "ci" / "cpu-values.yaml").read_text())
COMPONENT = "app.kubernetes.io/component"


@pytest.fixture(scope="module")
def cpu_objects() -> list[dict[str, Any]]:
    return render(CPU_VALUES)


def backend_deployments(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in find(objects, "Deployment") if d["metadata"]["labels"][COMPONENT] in VALUES["backends"]]


# ------------------------------------------------------------------ the registry


def test_the_backends_rows_are_the_registry_rows() -> None:
    assert set(VALUES["backends"]) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_modality_renders_as_its_registry_row_says(name: str) -> None:
    """Package, settings prefix and port as rendered (row over backendDefaults, naming convention) = the registry's."""
    row = REGISTRY[name]
    assert VALUES["backends"][name]["image"]["repository"] == f"modelplex/{name}"
    kind = VALUES["backends"][name]["engines"][0]
    model = {"id": "m", "modality": name, "engine": {"kind": kind, "settings": {"upstream_url": "http://u"}}}
    objects = render({"models": [model]})
    c = container(one(objects, "Deployment", f"{RELEASE}-{name}-m"))
    assert c["command"] == ["python", "-m", row.package]
    assert env(c)[f"{row.env_prefix}LISTEN"] == f"0.0.0.0:{row.port}"
    assert env(c)[f"{row.env_prefix}ENGINE"] == kind
    assert catalog(objects)["m"]["backend"].endswith(f":{row.port}")
    assert one(objects, "Service", f"{RELEASE}-{name}-m")["spec"]["ports"][0]["port"] == row.port


def test_the_schema_and_crd_name_no_modality() -> None:
    """A new modality edits neither: the chart checks models against the `backends` rows when rendering."""
    for text in ((CHART / "values.schema.json").read_text(), (CHART / "crds" / "models.modelplex.io.yaml").read_text()):
        for name in set(REGISTRY) - {"text"}:  # text: the one modality whose capabilities are a list
            assert f'"{name}"' not in text and f" {name}," not in text and f"[{name}" not in text, name


def test_backend_defaults_fill_what_a_row_leaves_out() -> None:
    objects = render(
        {
            "backendDefaults": {"replicaCount": 3, "shutdown": {"graceSeconds": 700}},
            "backends": {"images": {"replicaCount": 0}, "embeddings": {"resources": {"limits": {"memory": "3Gi"}}}},
            "models": [
                {"id": "e", "modality": "embeddings", "engine": {"kind": "local"}},
                {"id": "i", "modality": "images", "engine": {"kind": "procedural"}},
            ],
        }
    )
    embeddings = one(objects, "Deployment", f"{RELEASE}-embeddings-e")
    images = one(objects, "Deployment", f"{RELEASE}-images-i")
    assert embeddings["spec"]["replicas"] == 3
    assert images["spec"]["replicas"] == 0  # a row's 0 is a value, not "unset"
    assert env(container(images))["MODELPLEX_GRACE_SECONDS"] == "700"
    # A row's partial resources keep the defaults' other key.
    assert container(embeddings)["resources"] == {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"memory": "3Gi"},
    }


# ------------------------------------------------------------------ schema: a test per rule


def _model(**fields: Any) -> dict[str, Any]:
    return {"models": [{"id": "x", **fields}]}


BAD_VALUES = {
    "unknown backends row": {"backends": {"audio": {}}},
    "old camelCase engine field": _model(engine={"kind": "llamacpp", "modelPath": "/m.gguf"}),
    "settings key not snake_case": _model(engine={"kind": "llamacpp", "settings": {"ModelPath": "/m"}}),
    "secret setting without key": _model(
        engine={"kind": "openai", "secretSettings": {"upstream_api_key": {"name": "s"}}}
    ),
    "text capabilities as a mapping": _model(capabilities={"chat": True}),
    "embeddings capabilities as a list": _model(modality="embeddings", engine={"kind": "local"}, capabilities=["x"]),
    "backend grace below 1": {"backends": {"text": {"shutdown": {"graceSeconds": 0, "preStopSeconds": 5}}}},
    "edge grace below 1": {"edge": {"shutdown": {"graceSeconds": 0, "preStopSeconds": 5}}},
    "negative preStop": {"backends": {"videos": {"shutdown": {"graceSeconds": 600, "preStopSeconds": -1}}}},
    "max connection age below 1": {"backends": {"images": {"maxConnectionAgeSeconds": 0}}},
    "catalog max connection age below 1": {"catalog": {"maxConnectionAgeSeconds": 0}},
    "env prefix not MODELPLEX_*_": {"backends": {"text": {"envPrefix": "TEXT_"}}},
    "no engines": {"backends": {"speech": {"engines": []}}},
    "port out of range": {"backends": {"speech": {"port": 70000}}},
    "unknown backends field": {"backends": {"text": {"thread": 2}}},
    "data volume with a relative path": {
        "backends": {"videos": {"dataVolume": {"enabled": True, "mountPath": "data"}}}
    },
    "data volume access mode": {
        "backends": {"videos": {"dataVolume": {"enabled": True, "persistence": {"accessModes": ["ReadWriteAll"]}}}}
    },
    "empty metricsFrom peer": {"networkPolicy": {"metricsFrom": [{}]}},
    "unknown model field": _model(engine={"kind": "llamacpp"}, replicas=2),
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


# Checked against the `backends` rows when rendering (the schema lists no modality), with the message.
BAD_MODELS = {
    "unknown modality": (_model(modality="audio"), 'unknown modality "audio" \\(the chart knows embeddings, '),
    "engine kind not allowed for the modality": (
        _model(modality="embeddings", engine={"kind": "llamacpp"}),
        "engine.kind must be one of local, openai, triton for modality embeddings",
    ),
    "text engine on speech": (_model(modality="speech", engine={"kind": "openai"}), "for modality speech"),
    "allowFrom an unknown modality": (
        {"backends": {"text": {"allowFrom": ["audio"]}}, "models": [{"id": "x", "engine": {"kind": "llamacpp"}}]},
        'backends.text.allowFrom: unknown modality "audio"',
    ),
}


@pytest.mark.parametrize(("values", "message"), BAD_MODELS.values(), ids=BAD_MODELS.keys())
def test_render_rejects(values: dict[str, Any], message: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match=message):
        chart.render(with_test_key(values), name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_every_ci_values_file() -> None:
    with helm.Chart.load(CHART) as chart:
        for path in sorted((CHART / "ci").glob("*-values.yaml")):
            chart.validate_schema(helm.values_from_yaml(path.read_text()))


# ------------------------------------------------------------------ one template, every modality


def test_every_modality_gets_a_backend(cpu_objects: list[dict[str, Any]]) -> None:
    by_modality = {d["metadata"]["labels"][COMPONENT]: d for d in backend_deployments(cpu_objects)}
    assert set(by_modality) == set(REGISTRY)
    for modality, dep in by_modality.items():
        row = REGISTRY[modality]
        c = container(dep)
        assert c["command"] == ["python", "-m", row.package]
        assert c["image"] == f"modelplex/{modality}:0.1.0"
        e = env(c)
        assert e[f"{row.env_prefix}LISTEN"] == f"0.0.0.0:{row.port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == row.port
        assert dep["metadata"]["name"].startswith(f"{RELEASE}-{modality}-")


def test_catalog_and_env_come_from_one_dict(cpu_objects: list[dict[str, Any]]) -> None:
    """As `make run` does: each catalog engine setting is <PREFIX><KEY> in the backend, and nothing else is."""
    models = catalog(cpu_objects)
    checked = 0
    for dep in backend_deployments(cpu_objects):
        row = REGISTRY[dep["metadata"]["labels"][COMPONENT]]
        prefix = row.env_prefix
        e = env(container(dep))
        entry = next(m for m in models.values() if m["backend"].startswith(f"{dep['metadata']['name']}."))
        assert entry["backend"].endswith(f":{row.port}")
        assert e[f"{prefix}ENGINE"] == entry["engine"]["kind"]
        settings = entry["engine"]["settings"]
        from_settings = {k.removeprefix(prefix).lower(): v for k, v in e.items() if k.startswith(prefix)}
        for plumbing in ("listen", "engine", "data_dir"):  # deployment plumbing, not engine settings
            from_settings.pop(plumbing, None)
        assert from_settings == {k: v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()}
        checked += 1
    assert checked == len(VALUES["backends"])


def test_capabilities_pass_through(cpu_objects: list[dict[str, Any]]) -> None:
    models = catalog(cpu_objects)
    assert models["all-minilm-l6-v2"]["capabilities"] == {
        "dimensions": 384,
        "matryoshka": False,
        "max_inputs": 2048,
        "max_input_tokens": 256,
    }
    assert models["espeak-ng"]["capabilities"]["voice_aliases"] == {"alloy": "en-us", "echo": "en-gb"}
    assert models["procedural-videos"]["capabilities"]["seconds"] == [4, 8, 12]
    assert isinstance(models["smollm2-135m-instruct"]["capabilities"], list)


def test_large_integer_settings_stay_integers() -> None:
    settings = {"max_queued_inputs": 1000000}
    model = {"id": "e", "modality": "embeddings", "engine": {"kind": "local", "settings": settings}}
    objects = render({"models": [model]})
    e = env(container(one(objects, "Deployment", f"{RELEASE}-embeddings-e")))
    assert e["MODELPLEX_EMBEDDINGS_MAX_QUEUED_INPUTS"] == "1000000"  # not 1e+06
    assert catalog(objects)["e"]["engine"]["settings"]["max_queued_inputs"] == 1000000


def test_model_without_backend_image_needs_a_backend() -> None:
    values = {"backends": {"videos": {"image": {"repository": ""}}}, "models": [{"id": "v", "modality": "videos"}]}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match="no image"):
        chart.render(with_test_key(values), name=RELEASE, namespace=NAMESPACE)


# ------------------------------------------------------------------ load balancing and shutdown


def test_grpc_services_are_headless(cpu_objects: list[dict[str, Any]]) -> None:
    """The edge's channel balances round-robin over DNS: a ClusterIP would pin it to one pod."""
    grpc_services = [s for s in find(cpu_objects, "Service") if any(p["name"] == "grpc" for p in s["spec"]["ports"])]
    assert {s["metadata"]["labels"][COMPONENT] for s in grpc_services} == {"catalog", *VALUES["backends"]}
    for svc in grpc_services:
        assert svc["spec"]["clusterIP"] == "None", svc["metadata"]["name"]
    assert "clusterIP" not in one(cpu_objects, "Service", f"{RELEASE}-edge")["spec"]


def test_servers_age_connections_out(cpu_objects: list[dict[str, Any]]) -> None:
    for dep in [*backend_deployments(cpu_objects), one(cpu_objects, "Deployment", f"{RELEASE}-catalog")]:
        assert env(container(dep))["MODELPLEX_MAX_CONNECTION_AGE_SECONDS"] == "300"
    objects = render({"backends": {"text": {"maxConnectionAgeSeconds": 60}}})
    e = env(container(one(objects, "Deployment", f"{RELEASE}-text-smollm2-135m-instruct")))
    assert e["MODELPLEX_MAX_CONNECTION_AGE_SECONDS"] == "60"


def test_every_backend_drains_longer_than_the_longest_call(cpu_objects: list[dict[str, Any]]) -> None:
    for dep in backend_deployments(cpu_objects):
        pod = dep["spec"]["template"]["spec"]
        grace = int(env(pod["containers"][0])["MODELPLEX_GRACE_SECONDS"])
        assert grace >= 600
        assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1].endswith("time.sleep(5)")
        assert pod["terminationGracePeriodSeconds"] == grace + 5 + 10


def test_per_modality_shutdown() -> None:
    objects = render({"backends": {"text": {"shutdown": {"graceSeconds": 900, "preStopSeconds": 0}}}})
    pod = one(objects, "Deployment", f"{RELEASE}-text-smollm2-135m-instruct")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 910
    assert "lifecycle" not in pod["containers"][0]


# ------------------------------------------------------------------ volumes


def _volumes(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}


def test_videos_data_volume() -> None:
    model = {"id": "vid", "modality": "videos", "engine": {"kind": "procedural"}}
    objects = render({"models": [model]})
    dep = one(objects, "Deployment", f"{RELEASE}-videos-vid")
    assert _volumes(dep)["data"]["emptyDir"]["sizeLimit"] == "20Gi"
    c = container(dep)
    assert {"name": "data", "mountPath": "/var/lib/modelplex/videos"} in c["volumeMounts"]
    assert env(c)["MODELPLEX_VIDEOS_DATA_DIR"] == "/var/lib/modelplex/videos"
    assert not find(objects, "PersistentVolumeClaim")

    persistent = {"backends": {"videos": {"dataVolume": {"persistence": {"enabled": True}}}}, "models": [model]}
    objects = render(persistent)
    pvc = one(objects, "PersistentVolumeClaim", f"{RELEASE}-videos-vid-data")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    dep = one(objects, "Deployment", f"{RELEASE}-videos-vid")
    assert _volumes(dep)["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert dep["spec"]["strategy"]["type"] == "Recreate"


def test_one_readwriteonce_volume_is_not_shared_by_replicas() -> None:
    values = {
        "backends": {"videos": {"dataVolume": {"persistence": {"enabled": True}}}},
        "models": [{"id": "vid", "modality": "videos", "engine": {"kind": "procedural"}, "replicaCount": 2}],
    }
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match="ReadWriteOnce"):
        chart.render(with_test_key(values), name=RELEASE, namespace=NAMESPACE)


def test_speech_and_transcription_have_no_data_volume(cpu_objects: list[dict[str, Any]]) -> None:
    for dep in backend_deployments(cpu_objects):
        if dep["metadata"]["labels"][COMPONENT] in {"speech", "transcription", "text", "embeddings", "images"}:
            assert set(_volumes(dep)) == {"tmp"}, dep["metadata"]["name"]


# ------------------------------------------------------------------ NetworkPolicies


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


@pytest.mark.parametrize("values_file", ["cpu-values.yaml", "gpu-values.yaml"])
def test_every_workload_has_a_network_policy(values_file: str) -> None:
    values = helm.values_from_yaml((CHART / "ci" / values_file).read_text())
    values["networkPolicy"] = {"enabled": True, "metricsFrom": [{"namespaceSelector": {"matchLabels": {"x": "y"}}}]}
    objects = render(values)
    policies = find(objects, "NetworkPolicy")
    for dep in find(objects, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert matching, f"no NetworkPolicy selects {dep['metadata']['name']}"
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule without a port limit"
            if rule.get("from") == values["networkPolicy"]["metricsFrom"]:
                # Prometheus reaches the metrics port only (vLLM serves /metrics on its API port, the jobs
                # process on its own).
                assert rule["ports"] in ([{"port": "metrics"}], [{"port": "http"}], [{"port": "jobs-http"}])


def test_backends_reachable_from_the_edge_only(cpu_objects: list[dict[str, Any]]) -> None:
    policies = {p["metadata"]["name"]: p for p in find(cpu_objects, "NetworkPolicy")}
    for modality in VALUES["backends"]:
        rule = policies[f"{RELEASE}-{modality}-ingress"]["spec"]["ingress"][0]
        callers = [peer["podSelector"]["matchLabels"][COMPONENT] for peer in rule["from"]]
        assert callers == ["edge"]
        assert rule["ports"] == [{"port": "grpc"}]
