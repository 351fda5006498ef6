"""`catalog.source: kubernetes`: Model resources, the CRD they satisfy, RBAC no wider than the catalog needs."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from modelplex_catalog.kube import spec_from_resource
from modelplex_kit.modalities import REGISTRY
from tests.deploy.test_helm import CHART, LLAMA_VLLM, SMOLLM2, find, render

CRD = yaml.safe_load((CHART / "crds" / "models.modelplex.io.yaml").read_text())
KUBE = {"catalog": {"source": "kubernetes"}, "models": [SMOLLM2, LLAMA_VLLM]}


def _crd_schema() -> dict:
    return CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def objects():
    return render(KUBE)


def test_models_become_resources_the_crd_and_the_catalog_loader_accept(objects):
    models = find(objects, "Model")
    assert {m["metadata"]["name"] for m in models} == {"smollm2-135m-instruct", "llama-3-1-8b-instruct"}
    for resource in models:
        jsonschema.validate(resource, _crd_schema())
        spec = spec_from_resource(resource)  # the catalog's own loader model
        assert spec.backend.endswith(":50061")
    llama = next(m for m in models if m["spec"]["id"] == "llama-3.1-8b-instruct")
    assert llama["spec"]["engine"]["settings"]["upstream_url"].startswith("http://")
    assert "contextLength" in next(m for m in models if m["spec"]["id"] == SMOLLM2["id"])["spec"]


def test_no_catalog_configmap_and_the_catalog_reads_the_api(objects):
    assert not [c for c in find(objects, "ConfigMap") if c["metadata"]["name"].endswith("-catalog")]
    deployment = find(objects, "Deployment", "modelplex-catalog")[0]
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MODELPLEX_CATALOG_SOURCE"]["value"] == "kubernetes" and "MODELPLEX_CATALOG" not in env
    assert env["MODELPLEX_CATALOG_KUBE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert pod["serviceAccountName"] == "modelplex-catalog"
    assert all(v["name"] != "catalog" for v in pod["volumes"])


def test_rbac_is_limited_to_reading_models_and_patching_their_status(objects):
    # The vLLM model's backend has its own (pool discovery): tests/deploy/test_chart_pools.py.
    (role,) = find(objects, "Role", "modelplex-catalog")
    assert role["rules"] == [
        {"apiGroups": ["modelplex.io"], "resources": ["models"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["modelplex.io"], "resources": ["models/status"], "verbs": ["patch"]},
    ]
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    (binding,) = find(objects, "RoleBinding", "modelplex-catalog")
    assert binding["subjects"][0]["name"] == "modelplex-catalog"
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (account,) = find(objects, "ServiceAccount", "modelplex-catalog")
    assert account["automountServiceAccountToken"] is True


def test_the_file_source_stays_the_default():
    objects = render({"models": [SMOLLM2]})
    assert not find(objects, "Model") and not find(objects, "Role")
    assert find(objects, "ConfigMap", "modelplex-catalog")


def test_schema_rejects_an_unknown_source():
    with pytest.raises(Exception, match="source"):
        render({"catalog": {"source": "etcd"}})


@pytest.mark.parametrize(
    "spec",
    [
        {"modality": "Text!", "backend": "x:1", "engine": {"kind": "k"}},
        {"modality": "text", "engine": {"kind": "k"}},
        {"modality": "text", "backend": "x:1", "engine": {}},
        {"modality": "text", "backend": "x:1", "engine": {"kind": "k"}, "contextLength": -1},
    ],
)
def test_crd_schema_rejects_bad_models(spec):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": "modelplex.io/v1alpha1", "kind": "Model", "spec": spec}, _crd_schema())


def test_an_unknown_modality_is_refused_by_the_catalog_which_names_the_registry():
    """The CRD lists no modalities (a new one needs no CRD change); the catalog's loader holds the line."""
    resource = {
        "apiVersion": "modelplex.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "m"},
        "spec": {"id": "m", "modality": "smell", "backend": "x:1", "engine": {"kind": "k"}},
    }
    jsonschema.validate(resource, _crd_schema())
    with pytest.raises(ValueError, match="unknown modality 'smell'") as refused:
        spec_from_resource(resource)
    assert all(name in str(refused.value) for name in REGISTRY)
