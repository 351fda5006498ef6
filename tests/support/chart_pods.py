"""An engine pod as the Helm chart renders it for one ``models`` entry: what the engine suites
(tests/support/vllm_server.py, tests/support/real_triton.py) run their real servers with."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "modelplex"


@dataclass(frozen=True)
class RenderedContainer:
    """One engine container of the chart's render, with its pod's identity."""

    container: dict[str, Any]
    uid: int
    gid: int

    @property
    def env(self) -> dict[str, str]:
        return {e["name"]: e["value"] for e in self.container.get("env", ()) if "value" in e}


def engine_container(model: dict[str, Any], component: str) -> RenderedContainer:
    """The ``component`` container (vllm, triton) of the one engine pod the chart renders for ``model``."""
    values = {"models": [model], "edge": {"devApiKey": {"generate": True}}}
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name="modelplex", namespace="mpx", is_install=True)
    objects = [
        doc
        for path, text in manifests.items()
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    pods = [
        o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
        and o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(pods) == 1, f"the chart rendered {len(pods)} {component} pods for {model['id']}"
    (container,) = (c for c in pods[0]["containers"] if c["name"] == component)
    security = pods[0]["securityContext"]
    return RenderedContainer(container, int(security["runAsUser"]), int(security["runAsGroup"]))


def run_as(uid: int, gid: int) -> dict[str, Any]:
    """Popen arguments for the pod's uid and gid where this process may switch to them (root); else none."""
    if os.geteuid() != 0:
        return {}
    return {"user": uid, "group": gid, "extra_groups": []}
