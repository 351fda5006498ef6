"""Scale to zero in the chart: a model's `scaleToZero` reaches its catalog entry (or Model resource), its backend
(how long a request waits for a replica to start, where demand is reported) and its KEDA ScaledObject (to 0,
through the catalog's external scaler); the engines drain on scale-down; what nothing would honour is refused."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from modelplex_catalog.kube import spec_from_resource
from modelplex_catalog.loader import CatalogFile
from modelplex_kit.pools.settings import PoolSettings
from tests.deploy.test_helm import CHART, NAMESPACE, RELEASE, catalog, container, env, find, one, render, svc_host

CRD = yaml.safe_load((CHART / "crds" / "models.modelplex.io.yaml").read_text())
CATALOG_TARGET = f"{svc_host(f'{RELEASE}-catalog')}:50051"
SCALER = f"{RELEASE}-catalog.{NAMESPACE}.svc:50051"


def _vllm_model(model_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "modality": "text",
        "engine": {"kind": "openai", "vllm": {"enabled": True, "hfModel": f"org/{model_id}"}},
        "capabilities": ["chat"],
        **fields,
    }


IDLE = _vllm_model("idle-model", scaleToZero=True)
SLOW = _vllm_model("slow-model", scaleToZero=True, coldStartTimeout=420)
BUSY = _vllm_model("busy-model")
TRITON = {
    "id": "triton-model",
    "modality": "text",
    "engine": {"kind": "triton", "triton": {"enabled": True, "modelName": "m"}},
    "capabilities": ["chat"],
    "scaleToZero": True,
}
KEDA = {"autoscaling": {"keda": {"enabled": True, "minReplicas": 2, "maxReplicas": 5, "targetPerReplica": 8}}}
VALUES = {"models": [IDLE, SLOW, BUSY, TRITON], **KEDA}


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(copy.deepcopy(VALUES))


def _scaled(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["spec"]["scaleTargetRef"]["name"]: o for o in find(objects, "ScaledObject")}


def _backend_env(objects: list[dict[str, Any]], slug: str) -> dict[str, Any]:
    return env(container(one(objects, "Deployment", f"{RELEASE}-text-{slug}")))


# ------------------------------------------------------------------ KEDA through the catalog's scaler


def test_a_scale_to_zero_model_scales_to_zero_through_the_catalogs_scaler(objects) -> None:
    scaled = _scaled(objects)
    for model_id in ("idle-model", "slow-model"):
        obj = scaled[f"{RELEASE}-vllm-{model_id}"]
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert obj["spec"]["minReplicaCount"] == 0 and obj["spec"]["maxReplicaCount"] == 5
        (trigger,) = obj["spec"]["triggers"]
        assert trigger == {
            "type": "external-push",
            "metadata": {"scalerAddress": SCALER, "key": model_id, "targetPerReplica": "8"},
        }
    triton = scaled[f"{RELEASE}-triton-triton-model"]
    assert triton["spec"]["minReplicaCount"] == 0 and triton["spec"]["triggers"][0]["metadata"]["key"] == "triton-model"


def test_a_model_that_does_not_scale_to_zero_keeps_its_minimum(objects) -> None:
    obj = _scaled(objects)[f"{RELEASE}-vllm-busy-model"]
    assert obj["spec"]["minReplicaCount"] == 2
    assert obj["spec"]["triggers"][0]["type"] == "external-push"
    assert obj["spec"]["triggers"][0]["metadata"]["key"] == "busy-model"


def test_no_prometheus_and_the_default_target() -> None:
    objects = render({"models": [IDLE], "autoscaling": {"keda": {"enabled": True}}})
    (obj,) = find(objects, "ScaledObject")
    assert obj["spec"]["triggers"][0]["metadata"]["targetPerReplica"] == "16"
    assert "prometheus" not in yaml.safe_dump(obj)
    keda = yaml.safe_load((CHART / "values.yaml").read_text())["autoscaling"]["keda"]
    assert "prometheusAddress" not in keda and "waitingRequestsThreshold" not in keda


def test_keda_owns_the_engines_replicas(objects) -> None:
    """An upgrade must not reset what KEDA scaled (waking a model at zero, or shrinking a busy one)."""
    for name in ("idle-model", "busy-model"):
        assert "replicas" not in one(objects, "Deployment", f"{RELEASE}-vllm-{name}")["spec"]
    assert "replicas" not in one(objects, "Deployment", f"{RELEASE}-triton-triton-model")["spec"]
    without = render({"models": [BUSY]})
    assert one(without, "Deployment", f"{RELEASE}-vllm-busy-model")["spec"]["replicas"] == 1


# ------------------------------------------------------------------ the backend and the catalog


def test_the_backend_waits_for_a_cold_start_and_reports_its_demand(objects) -> None:
    idle, slow, busy = (_backend_env(objects, s) for s in ("idle-model", "slow-model", "busy-model"))
    assert idle["MODELPLEX_TEXT_POOL_COLD_START_TIMEOUT_SECONDS"] == "300"  # the stated default
    assert slow["MODELPLEX_TEXT_POOL_COLD_START_TIMEOUT_SECONDS"] == "420"
    assert "MODELPLEX_TEXT_POOL_COLD_START_TIMEOUT_SECONDS" not in busy  # 503 at once with no replica
    for model_id, e in (("idle-model", idle), ("slow-model", slow), ("busy-model", busy)):
        assert e["MODELPLEX_TEXT_POOL_DEMAND_TARGET"] == CATALOG_TARGET
        assert e["MODELPLEX_TEXT_POOL_DEMAND_KEY"] == model_id
    triton = _backend_env(objects, "triton-model")
    assert triton["MODELPLEX_TEXT_POOL_COLD_START_TIMEOUT_SECONDS"] == "300"
    assert triton["MODELPLEX_TEXT_POOL_DEMAND_KEY"] == "triton-model"


def test_the_rendered_pool_settings_are_the_ones_the_pool_reads(objects) -> None:
    e = _backend_env(objects, "slow-model")
    prefix = "MODELPLEX_TEXT_"
    fields = {
        name.removeprefix(prefix).lower(): value for name, value in e.items() if name.startswith(f"{prefix}POOL_")
    }
    fields = {k: v for k, v in fields.items() if k in PoolSettings.model_fields}
    assert {"pool_cold_start_timeout_seconds", "pool_demand_target", "pool_demand_key"} <= set(fields)
    settings = PoolSettings.model_validate(fields)
    assert settings.pool_cold_start_timeout_seconds == 420
    assert (settings.pool_demand_target, settings.pool_demand_key) == (CATALOG_TARGET, "slow-model")


def test_without_keda_no_demand_is_reported() -> None:
    e = _backend_env(render({"models": [BUSY]}), "busy-model")
    assert not [k for k in e if "DEMAND" in k or "COLD_START" in k]


def test_the_catalog_entry_says_so_and_the_catalog_reads_it(objects) -> None:
    entries = catalog(objects)
    assert (entries["idle-model"]["scale_to_zero"], entries["idle-model"]["cold_start_timeout"]) == (True, 300)
    assert entries["slow-model"]["cold_start_timeout"] == 420
    assert "scale_to_zero" not in entries["busy-model"] and "cold_start_timeout" not in entries["busy-model"]
    specs = {m.id: m for m in CatalogFile.model_validate({"models": list(entries.values())}).models}
    assert specs["slow-model"].scale_to_zero and specs["slow-model"].cold_start_timeout == 420
    assert not specs["busy-model"].scale_to_zero


def test_model_resources_carry_it_and_the_crd_and_catalog_accept_it() -> None:
    objects = render(copy.deepcopy(VALUES) | {"catalog": {"source": "kubernetes"}})
    models = {m["spec"]["id"]: m for m in find(objects, "Model")}
    assert models["slow-model"]["spec"]["scaleToZero"] is True
    assert models["slow-model"]["spec"]["coldStartTimeout"] == 420
    assert "scaleToZero" not in models["busy-model"]["spec"]
    schema = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for model in models.values():
        jsonschema.validate(model, schema)
    spec = spec_from_resource(models["slow-model"])
    assert spec.scale_to_zero and spec.cold_start_timeout == 420
    bad = copy.deepcopy(models["slow-model"])
    bad["spec"]["coldStartTimeout"] = -5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    props = schema["properties"]["spec"]["properties"]
    assert props["scaleToZero"]["type"] == "boolean" and props["coldStartTimeout"]["type"] == "number"
    assert props["coldStartTimeout"]["x-kubernetes-validations"][0]["rule"] == "self > 0.0"


# ------------------------------------------------------------------ the scaler's address and KEDA's way in


def test_the_network_policy_lets_keda_and_the_backends_reach_the_scaler(objects) -> None:
    policy = one(objects, "NetworkPolicy", f"{RELEASE}-catalog-ingress")
    grpc_rules = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": "grpc"}]]
    callers = {p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for p in grpc_rules[0]["from"]}
    assert {"edge", "text"} <= callers  # the backends report their models' demand
    keda = grpc_rules[1]["from"]
    assert keda == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}},
        }
    ]
    mine = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "autoscalers"}}}]
    own = render(copy.deepcopy(VALUES) | {"networkPolicy": {"enabled": True, "kedaFrom": mine}})
    rules = one(own, "NetworkPolicy", f"{RELEASE}-catalog-ingress")["spec"]["ingress"]
    assert any(r["from"] == mine and r["ports"] == [{"port": "grpc"}] for r in rules)
    # Without KEDA: the catalog from the edge (and the jobs process) only, as before.
    plain = one(render({"models": [BUSY]}), "NetworkPolicy", f"{RELEASE}-catalog-ingress")
    assert len(plain["spec"]["ingress"]) == 1


# ------------------------------------------------------------------ draining on scale-down


def test_engines_keep_serving_while_they_leave_and_finish_what_is_in_flight(objects) -> None:
    vllm = one(objects, "Deployment", f"{RELEASE}-vllm-idle-model")["spec"]["template"]["spec"]
    c = vllm["containers"][0]
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    assert c["args"][c["args"].index("--shutdown-timeout") + 1] == "600"
    assert vllm["terminationGracePeriodSeconds"] == 660 >= 15 + 600
    triton = one(objects, "Deployment", f"{RELEASE}-triton-triton-model")["spec"]["template"]["spec"]
    assert triton["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    assert "--exit-timeout-secs=600" in triton["containers"][0]["args"]
    assert triton["terminationGracePeriodSeconds"] == 660
    tuned = render(
        {
            "models": [BUSY],
            "engines": {"drainSeconds": 30, "shutdownTimeoutSeconds": 900, "terminationGracePeriodSeconds": 960},
        }
    )
    pod = one(tuned, "Deployment", f"{RELEASE}-vllm-busy-model")["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "30"]
    assert pod["terminationGracePeriodSeconds"] == 960
    no_drain = render({"models": [BUSY], "engines": {"drainSeconds": 0}})
    pod = one(no_drain, "Deployment", f"{RELEASE}-vllm-busy-model")["spec"]["template"]["spec"]
    assert "lifecycle" not in pod["containers"][0]


# ------------------------------------------------------------------ refused


def _model(**fields: Any) -> dict[str, Any]:
    return {"models": [_vllm_model("m", **fields)], **KEDA}


REFUSED = {
    "scale to zero without KEDA": (
        {"models": [_vllm_model("m", scaleToZero=True)]},
        r"model m: scaleToZero needs autoscaling\.keda\.enabled",
    ),
    "KEDA with two catalog replicas": (
        {**KEDA, "models": [BUSY], "catalog": {"replicaCount": 2}},
        r"autoscaling\.keda\.enabled needs catalog\.replicaCount 1 \(got 2\)",
    ),
    "scale to zero on an in-process engine": (
        {**KEDA, "models": [{"id": "m", "engine": {"kind": "llamacpp"}, "scaleToZero": True}]},
        r"model m: scaleToZero needs engine replicas its backend discovers",
    ),
    "scale to zero on one static upstream": (
        {
            **KEDA,
            "models": [
                {
                    "id": "m",
                    "engine": {"kind": "openai", "settings": {"upstream_url": "http://x/v1"}},
                    "scaleToZero": True,
                }
            ],
        },
        r"model m: scaleToZero needs engine replicas",
    ),
    "a cold start bound without scale to zero": (_model(coldStartTimeout=60), r"it needs scaleToZero: true"),
    "a cold start bound past the edge's deadline": (
        _model(scaleToZero=True, coldStartTimeout=600),
        r"coldStartTimeout \(600 s\) must be below the edge's deadline for one backend call \(600 s",
    ),
    "a grace shorter than the drain": (
        {"models": [BUSY], "engines": {"terminationGracePeriodSeconds": 300}},
        r"engines\.terminationGracePeriodSeconds \(300\) must cover engines\.drainSeconds \(15\) \+ "
        r"engines\.shutdownTimeoutSeconds \(600\)",
    ),
    "KEDA let in from anywhere": (
        {**KEDA, "models": [BUSY], "networkPolicy": {"enabled": True, "kedaFrom": []}},
        r"networkPolicy\.kedaFrom must name KEDA's operator pods",
    ),
}


@pytest.mark.parametrize(("values", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_render_refuses(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(copy.deepcopy(values))


def test_a_longer_edge_deadline_allows_a_longer_cold_start() -> None:
    values = _model(scaleToZero=True, coldStartTimeout=900)
    values["edge"] = {"extraEnv": [{"name": "MODELPLEX_EDGE_BACKEND_TIMEOUT_SECONDS", "value": "1200"}]}
    assert catalog(render(values))["m"]["cold_start_timeout"] == 900


SCHEMA_REFUSES = {
    "cold start of 0 s": _model(scaleToZero=True, coldStartTimeout=0),
    "scaleToZero not a boolean": _model(scaleToZero="yes"),
    "an adapter scaling on its own": {
        "models": [
            _vllm_model("base"),
            {"id": "a", "adapter": {"base": "base", "source": "/adapters/a"}, "scaleToZero": True},
        ],
        **KEDA,
    },
    "targetPerReplica of 0": {"autoscaling": {"keda": {"targetPerReplica": 0}}},
    "the old Prometheus query's threshold": {"autoscaling": {"keda": {"waitingRequestsThreshold": 5}}},
}


@pytest.mark.parametrize("values", SCHEMA_REFUSES.values(), ids=SCHEMA_REFUSES.keys())
def test_schema_refuses(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(copy.deepcopy(values))
