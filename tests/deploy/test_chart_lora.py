"""LoRA adapters as models in the chart: catalog entries only, served by their base's backend and vLLM."""

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
    catalog,
    container,
    env,
    find,
    one,
    render,
    with_test_key,
)

CRD = yaml.safe_load((CHART / "crds" / "models.modelplex.io.yaml").read_text())
BASE = LLAMA_VLLM["id"]
VLLM = f"{RELEASE}-vllm-llama-3-1-8b-instruct"
BACKEND = f"{RELEASE}-text-llama-3-1-8b-instruct"
SQL = {
    "id": "llama-3.1-8b-sql",
    "aliases": ["sql"],
    "adapter": {"base": BASE, "source": "/adapters/sql", "rank": 8},
    "description": "Llama with a text-to-SQL LoRA.",
}
GPU_VALUES = helm.values_from_yaml((CHART / "ci" / "gpu-values.yaml").read_text())


def _crd_schema() -> dict[str, Any]:
    return CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _with_lora(model: dict[str, Any], **lora: Any) -> dict[str, Any]:
    """``model`` (a chart-run vLLM's) with engine.vllm.lora set to ``lora``."""
    model = copy.deepcopy(model)
    model["engine"]["vllm"]["lora"] = lora
    return model


def _vllm(objects: list[dict[str, Any]], name: str = VLLM) -> dict[str, Any]:
    return container(one(objects, "Deployment", name))


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.fixture(scope="module")
def with_adapter() -> list[dict[str, Any]]:
    return render({"models": [SMOLLM2, LLAMA_VLLM, SQL]})


def test_lora_is_off_by_default():
    objects = render({"models": [SMOLLM2, LLAMA_VLLM]})
    vllm = _vllm(objects)
    assert not any("lora" in arg for arg in vllm["args"])
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env(vllm)
    assert all(m["name"] != "adapters" for m in vllm["volumeMounts"])
    assert "MODELPLEX_TEXT_POOL_ADAPTER_SLOTS" not in env(container(one(objects, "Deployment", BACKEND)))
    assert "pool_adapter_slots" not in catalog(objects)[BASE]["engine"]["settings"]


def test_an_adapter_turns_lora_on_for_its_base(with_adapter):
    vllm = _vllm(with_adapter)
    args = vllm["args"]
    assert "--enable-lora" in args
    assert (_flag(args, "--max-loras"), _flag(args, "--max-lora-rank"), _flag(args, "--max-cpu-loras")) == (
        "4",
        "16",
        "8",
    )
    # The text backend loads and unloads adapters at run time.
    assert env(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # No adapter volume unless engines.vllm.lora.volume names one.
    assert all(m["name"] != "adapters" for m in vllm["volumeMounts"])


def test_the_backend_holds_as_many_adapters_per_replica_as_vllm_has_slots(with_adapter):
    """In its environment and in the catalog entry alike; no zero adapter on a GPU's vLLM."""
    backend = env(container(one(with_adapter, "Deployment", BACKEND)))
    assert backend["MODELPLEX_TEXT_POOL_ADAPTER_SLOTS"] == "4"
    assert catalog(with_adapter)[BASE]["engine"]["settings"]["pool_adapter_slots"] == "4"
    assert "MODELPLEX_TEXT_ZERO_ADAPTER" not in backend and "initContainers" not in _vllm_pod(with_adapter)
    # The other settings of a chart-run vLLM stay as they were.
    assert backend["MODELPLEX_TEXT_POOL_KV_EVENTS_PORT"] == "5557"


def test_an_adapter_is_a_catalog_entry_and_nothing_else(with_adapter):
    entry = catalog(with_adapter)[SQL["id"]]
    assert entry["adapter"] == {"base": BASE, "source": "/adapters/sql", "rank": 8}
    assert entry["aliases"] == ["sql"] and entry["description"] == SQL["description"]
    # The catalog takes these from the base.
    assert not {"backend", "engine", "modality"} & set(entry)
    slug = "llama-3-1-8b-sql"
    for obj in with_adapter:
        assert slug not in obj["metadata"]["name"], f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("labels", {}).get("modelplex.io/model") != slug
    # One vLLM, the base's; one backend per model that is not an adapter.
    deployments = {d["metadata"]["name"] for d in find(with_adapter, "Deployment")}
    assert {n for n in deployments if n.startswith(f"{RELEASE}-vllm-")} == {VLLM}
    services = {s["metadata"]["name"] for s in find(with_adapter, "Service")}
    smollm2 = f"{RELEASE}-text-smollm2-135m-instruct"
    assert {n for n in services if n.startswith(f"{RELEASE}-text-")} == {BACKEND, smollm2}


def test_a_disabled_adapter_leaves_its_base_alone():
    objects = render({"models": [LLAMA_VLLM, {**SQL, "enabled": False}]})
    assert "--enable-lora" not in _vllm(objects)["args"]
    assert SQL["id"] not in catalog(objects)


def test_per_model_lora_merges_over_the_defaults():
    objects = render({"models": [_with_lora(LLAMA_VLLM, enabled=True, maxLoras=8, maxCpuLoras=16)]})
    args = _vllm(objects)["args"]
    assert (_flag(args, "--max-loras"), _flag(args, "--max-lora-rank"), _flag(args, "--max-cpu-loras")) == (
        "8",
        "16",  # the default's
        "16",
    )
    assert env(container(one(objects, "Deployment", BACKEND)))["MODELPLEX_TEXT_POOL_ADAPTER_SLOTS"] == "8"
    # On for every text model's vLLM, off for one of them.
    other = {**copy.deepcopy(LLAMA_VLLM), "id": "mistral-7b"}
    other["engine"]["vllm"]["hfModel"] = "mistralai/Mistral-7B-Instruct-v0.3"
    values = {
        "engines": {"vllm": {"lora": {"enabled": True, "maxLoraRank": 64}}},
        "models": [LLAMA_VLLM, _with_lora(other, enabled=False)],
    }
    objects = render(values)
    assert _flag(_vllm(objects)["args"], "--max-lora-rank") == "64"
    assert "--enable-lora" not in _vllm(objects, f"{RELEASE}-vllm-mistral-7b")["args"]
    mistral = env(container(one(objects, "Deployment", f"{RELEASE}-text-mistral-7b")))
    assert "MODELPLEX_TEXT_POOL_ADAPTER_SLOTS" not in mistral


def test_an_embeddings_vllm_never_gets_lora():
    minilm = {
        "id": "minilm",
        "modality": "embeddings",
        "engine": {"kind": "openai", "vllm": {"enabled": True, "hfModel": "x/minilm"}},
        "capabilities": {"dimensions": 384},
    }
    objects = render({"engines": {"vllm": {"lora": {"enabled": True}}}, "models": [minilm]})
    assert "--enable-lora" not in _vllm(objects, f"{RELEASE}-vllm-minilm")["args"]


def test_the_adapter_volume_is_mounted_read_only_at_adapters():
    objects = render(GPU_VALUES)
    pod = one(objects, "Deployment", VLLM)["spec"]["template"]["spec"]
    vllm = container(one(objects, "Deployment", VLLM))
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in vllm["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == "adapters")
    assert volume == {"name": "adapters", "persistentVolumeClaim": {"claimName": "llama-adapters", "readOnly": True}}
    assert "--enable-lora" in vllm["args"]
    assert catalog(objects)["llama-3.1-8b-sql"]["adapter"]["base"] == BASE


def _values(*models: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"models": list(models), **extra}


RENDER_REFUSES = {
    "a base not in models": (_values(SMOLLM2, SQL), r'adapter\.base "llama-3\.1-8b-instruct" is not in models'),
    "a base on llama.cpp": (
        _values(SMOLLM2, {**SQL, "adapter": {"base": SMOLLM2["id"], "source": "/adapters/x"}}),
        "is not served by a vLLM this chart runs",
    ),
    "a base on a vLLM elsewhere": (
        _values(
            {"id": "remote", "engine": {"kind": "openai", "settings": {"upstream_url": "http://vllm:8000/v1"}}},
            {**SQL, "adapter": {"base": "remote", "source": "/adapters/x"}},
        ),
        "is not served by a vLLM this chart runs",
    ),
    "a disabled base": (_values({**LLAMA_VLLM, "enabled": False}, SQL), "its base .* is disabled"),
    "an adapter of an adapter": (
        _values(LLAMA_VLLM, SQL, {"id": "z", "adapter": {"base": SQL["id"], "source": "s"}}),
        "is an adapter itself",
    ),
    "a rank above the base's maxLoraRank": (
        _values(LLAMA_VLLM, {**SQL, "adapter": {**SQL["adapter"], "rank": 64}}),
        "adapter.rank 64 exceeds its base .*maxLoraRank 16",
    ),
    "a base that turns LoRA off": (
        _values(_with_lora(LLAMA_VLLM, enabled=False), SQL),
        "engine.vllm.lora.enabled is false, but the adapters llama-3.1-8b-sql name it",
    ),
    "fewer CPU than GPU slots": (
        _values(_with_lora(LLAMA_VLLM, enabled=True, maxLoras=8, maxCpuLoras=4)),
        r"maxCpuLoras \(4\) must be at least maxLoras \(8\)",
    ),
    "lora on an embeddings model": (
        _values(
            {
                "id": "minilm",
                "modality": "embeddings",
                "engine": {"kind": "openai", "vllm": {"enabled": True, "hfModel": "x/y", "lora": {"enabled": True}}},
                "capabilities": {"dimensions": 384},
            }
        ),
        "engine.vllm.lora is for text models",
    ),
}


@pytest.mark.parametrize(("values", "message"), RENDER_REFUSES.values(), ids=RENDER_REFUSES.keys())
def test_render_refuses(values: dict[str, Any], message: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match=message):
        chart.render(with_test_key(values), name=RELEASE, namespace=NAMESPACE)


SCHEMA_REFUSES = {
    "maxLoras 1": {"engines": {"vllm": {"lora": {"maxLoras": 1}}}},
    "a model's maxLoras 1": _values(_with_lora(LLAMA_VLLM, maxLoras=1)),
    "a rank vLLM does not take": {"engines": {"vllm": {"lora": {"maxLoraRank": 12}}}},
    "an unknown lora field": {"engines": {"vllm": {"lora": {"slots": 3}}}},
    "a volume that is no claim name": {"engines": {"vllm": {"lora": {"volume": "/data/adapters"}}}},
    "an adapter without a source": _values(LLAMA_VLLM, {"id": "x", "adapter": {"base": BASE}}),
    "an adapter without a base": _values(LLAMA_VLLM, {"id": "x", "adapter": {"source": "/adapters/x"}}),
    "a rank of 0": _values(LLAMA_VLLM, {**SQL, "adapter": {**SQL["adapter"], "rank": 0}}),
    "an adapter with an engine": _values(LLAMA_VLLM, {**SQL, "engine": {"kind": "openai"}}),
    "an adapter with a backend": _values(LLAMA_VLLM, {**SQL, "backend": "x:1"}),
    "an adapter with a pool": _values(LLAMA_VLLM, {**SQL, "pool": {"inferencePool": "p"}}),
    "an adapter with replicas": _values(LLAMA_VLLM, {**SQL, "replicaCount": 2}),
    "an adapter of another modality": _values(LLAMA_VLLM, {**SQL, "modality": "embeddings"}),
}


@pytest.mark.parametrize("values", SCHEMA_REFUSES.values(), ids=SCHEMA_REFUSES.keys())
def test_schema_refuses(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(with_test_key(values))


# ------------------------------------------------------------------ Model resources


def test_an_adapter_becomes_a_model_resource_the_crd_accepts():
    objects = render({"catalog": {"source": "kubernetes"}, "models": [SMOLLM2, LLAMA_VLLM, SQL]})
    models = {m["spec"]["id"]: m for m in find(objects, "Model")}
    adapter = models[SQL["id"]]
    assert adapter["metadata"]["name"] == "llama-3-1-8b-sql"
    assert adapter["spec"]["adapter"] == SQL["adapter"]
    assert not {"backend", "engine", "modality", "pool"} & set(adapter["spec"])
    assert models[BASE]["spec"]["engine"]["settings"]["pool_adapter_slots"] == "4"
    for model in models.values():
        jsonschema.validate(model, _crd_schema())
    assert spec_from_resource(adapter).adapter.base == BASE


def _model(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "modelplex.io/v1alpha1", "kind": "Model", "metadata": {"name": "m"}, "spec": spec}


def test_the_crd_takes_an_adapter_without_modality_backend_or_engine():
    jsonschema.validate(_model({"adapter": {"base": "llama", "source": "org/lora"}}), _crd_schema())
    jsonschema.validate(_model({"adapter": {"base": "llama", "source": "/adapters/x", "rank": 16}}), _crd_schema())
    columns = {c["name"]: c["jsonPath"] for c in CRD["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Base"] == ".spec.adapter.base"


@pytest.mark.parametrize(
    "spec",
    [
        {"adapter": {"base": "llama"}},
        {"adapter": {"source": "/adapters/x"}},
        {"adapter": {"base": "", "source": "/adapters/x"}},
        {"adapter": {"base": "llama", "source": "/adapters/x", "rank": 0}},
        {"adapter": {"base": "llama", "source": "/adapters/x", "rank": "8"}},
        # Not an adapter: a model of its own still needs a modality, a backend and an engine.
        {"modality": "text", "engine": {"kind": "k"}},
    ],
)
def test_the_crd_rejects_bad_adapters(spec: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_model(spec), _crd_schema())


def _vllm_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", VLLM)["spec"]["template"]["spec"]


def test_on_cpus_base_model_requests_run_under_an_adapter_of_zeros_written_by_an_init_container():
    """vLLM's CPU path runs a base request batched with adapter requests under its last slot's adapter
    (vllm-project/vllm#48421): zeroAdapter makes one from the model's config, the backend sends base
    requests under it (tests/vllm/test_lora_on_vllm.py shows the defect and the cure on a real vLLM)."""
    objects = render({"models": [_with_lora(LLAMA_VLLM, zeroAdapter=True), SQL]})
    pod = _vllm_pod(objects)
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["python3", "/scripts/zero-lora.py"] and init["command"][-1] == "/zero-lora"
    assert init["command"][2] == LLAMA_VLLM["engine"]["vllm"]["hfModel"]
    mounts = {m["name"]: m for m in _vllm(objects)["volumeMounts"]}
    assert mounts["zero-lora"]["mountPath"] == "/zero-lora" and mounts["zero-lora"]["readOnly"]
    script = one(objects, "ConfigMap", f"{VLLM}-zero-lora")["data"]["zero-lora.py"]
    assert script == (CHART / "files" / "zero-lora.py").read_text()
    assert env(container(one(objects, "Deployment", BACKEND)))["MODELPLEX_TEXT_ZERO_ADAPTER"] == "/zero-lora"
