"""No default keys anywhere but a laptop's: the chart refuses to invent one for GitOps renders (defect 9)
and the GPU profiles (Helm values, kustomize overlay, skaffold) ship none (defect 1)."""

from __future__ import annotations

import base64

import helm_python as helm
import pytest

from tests.deploy.test_helm import CHART, NAMESPACE, RELEASE, find, one, render


def test_without_a_key_the_chart_refuses_and_says_how_to_make_one() -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError) as err:
        chart.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    message = str(err.value)
    assert "create secret generic modelplex-api-key" in message and "existingSecret" in message


def test_an_explicit_key_renders_the_same_on_every_render() -> None:
    values = {"edge": {"devApiKey": {"value": "sk-mine-0123456789"}}}
    first, second = render(values), render(values)
    secret = one(first, "Secret", f"{RELEASE}-dev-api-key")
    assert base64.b64decode(secret["data"]["api-key"]) == b"sk-mine-0123456789"
    assert secret == one(second, "Secret", f"{RELEASE}-dev-api-key")


def test_an_existing_secret_renders_no_key_secret() -> None:
    values = {
        "edge": {"devApiKey": {"existingSecret": "modelplex-api-key"}},
        "gatekeeper": {"keys": {"existingSecret": "modelplex-gatekeeper-keys"}},
    }
    objects = render(values)
    assert not find(objects, "Secret")
    edge = one(objects, "Deployment", f"{RELEASE}-edge")
    refs = [
        e["valueFrom"]["secretKeyRef"]["name"]
        for c in edge["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert "modelplex-api-key" in refs


def test_generate_is_opt_in_and_random() -> None:
    keys = {
        base64.b64decode(one(render(), "Secret", f"{RELEASE}-dev-api-key")["data"]["api-key"]) for _ in range(2)
    }
    assert len(keys) == 2  # exactly why it is not the default: helm template would rotate it
