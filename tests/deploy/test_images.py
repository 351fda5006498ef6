"""Every service, installed as its image installs it, starts and answers its health check.

For each image the project builds (the edge, the catalog and one per modality registry row, so a new
modality is tested without being named here), the one Dockerfile read with SERVICE=<name>: the files its
build stage COPYs (its service's folders as scripts/service-folders.sh names them), with .dockerignore
applied, go to a directory outside the source tree; the build stage's `scripts/install-service.sh` runs
there into a fresh venv (non-editable, as in the image); then the image's ENTRYPOINT starts from that venv
with the image's environment and its HEALTHCHECK command runs until it passes.
Two differences from a Docker build, both for speed: the text image compiles llama.cpp itself, while here
the portable wheel that `make venv` built with the same script and flags is offered to pip; and pip may use
its cache here (the build stage sets PIP_NO_CACHE_DIR). Services listen on free ports on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelplex_kit.children import tied_to_parent
from modelplex_kit.container import images
from tests.support.dockerfile import exec_form, ignored, instructions, stages
from tests.support.ports import free_port

# Eight fresh venvs installed at once: 10-13 minutes on a loaded 2-core machine, far past the suite's
# 300 s default (which cut the install fixture there); the health waits have their own bound below.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
SERVICES = sorted(images())
STARTUP_S = 180
# What the image's environment sets and this one must not leak in: the source tree, the dev venv.
_LEAKS = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")


@dataclass
class Image:
    name: str
    copies: list[tuple[str, str]]  # (context path, path under WORKDIR)
    install: list[str]  # the install-service.sh command line
    entrypoint: list[str]
    healthcheck: list[str]
    env: dict[str, str]  # the runtime stage's ENV that names the service

    @classmethod
    def read(cls, name: str) -> Image:
        instrs = [(op, args.replace("${SERVICE}", name)) for op, args in instructions(DOCKERFILE)]
        build, runtime = stages(instrs)[1], stages(instrs)[-1]
        assert stages(instrs)[0][0][1].endswith(" AS sources") and build[0][1].endswith(" AS build")
        copies = [tuple(a.split()) for op, a in build if op == "COPY" and not a.startswith("--")]
        # The sources stage's pick: this service's folders only.
        assert ("COPY", "--from=sources /picked/ ./") in build
        copies += [(folder, folder) for folder in _service_folders(name)]
        runs = " && ".join(a for op, a in build if op == "RUN")
        install = re.search(r'scripts/install-service\.sh "\S+" \S+', runs)
        assert install, "the Dockerfile does not run scripts/install-service.sh"
        (health,) = [a for op, a in runtime if op == "HEALTHCHECK"]
        (entrypoint,) = [a for op, a in runtime if op == "ENTRYPOINT"]
        return cls(
            name,
            copies,
            install.group(0).replace('"', "").split(),
            exec_form(entrypoint),
            exec_form(health[health.index(" CMD ") :]),
            {"MODELPLEX_SERVICE": name},
        )


def _service_folders(name: str) -> list[str]:
    listed = subprocess.run([REPO / "scripts" / "service-folders.sh", name], cwd=REPO, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.split()


def _copy_context(image: Image, src: Path) -> None:
    """What the build stage's COPY instructions put under WORKDIR, minus what .dockerignore keeps out."""
    excluded = ignored(REPO / ".dockerignore")
    for source, target in image.copies:
        origin, destination = REPO / source, src / target
        if origin.is_file():
            destination = destination / origin.name if target.endswith("/") else destination
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, destination)
            continue

        def skip(folder: str, names: list[str]) -> set[str]:
            relative = Path(folder).relative_to(REPO).as_posix()
            return {n for n in names if excluded(f"{relative}/{n}")}

        shutil.copytree(origin, destination, ignore=skip, dirs_exist_ok=True)


def _clean_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _LEAKS} | extra


def _llama_wheels() -> Path:
    """Where `make venv` put the portable llama.cpp wheel (the Makefile exports LLAMA_WHEELS)."""
    wheels = REPO / os.environ.get("LLAMA_WHEELS", "")
    if "LLAMA_WHEELS" not in os.environ:  # pytest run by hand: the Makefile's default
        identity = subprocess.run(
            [REPO / "scripts" / "llama-wheel.sh", "id"], capture_output=True, text=True, check=True
        )
        wheels = REPO / "build" / "wheels" / identity.stdout.strip()
    if not list(wheels.glob("llama_cpp_python-*.whl")):
        pytest.fail(f"no portable llama.cpp wheel in {wheels}: `make venv` builds it")
    return wheels


def _install(image: Image, root: Path, wheels: Path) -> Path:
    """Runs the Dockerfile's install command in a copy of its context; returns the venv."""
    src, venv = root / "src", root / "venv"
    _copy_context(image, src)
    command = [*image.install[:-1], str(venv)]  # the image's /opt/venv, here under the test's tmp dir
    env = _clean_env(
        PYTHON=sys.executable,  # has grpcio-tools, as the build stage's python has
        PIP_FIND_LINKS=str(wheels),
        PIP_ONLY_BINARY="llama-cpp-python",  # the portable wheel or nothing: never a source build here
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    done = subprocess.run(command, cwd=src, env=env, capture_output=True, text=True)
    (root / "install.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"{image.name}: install failed:\n{(done.stdout + done.stderr)[-3000:]}"
    return venv


@dataclass
class Running:
    image: Image
    venv: Path
    address: str
    process: subprocess.Popen
    log: Path

    wiring: dict[str, str]

    def healthcheck(self) -> subprocess.CompletedProcess:
        """The image's HEALTHCHECK command, in the service's environment (it reads the same address)."""
        return _run_in(self.venv, self.image.healthcheck, timeout=30, **self.image.env, **self.wiring)


def _in_image(venv: Path, **extra: str) -> tuple[Path, dict[str, str]]:
    """The working directory and environment of the image's runtime stage, for a venv here."""
    home = venv.parent / "home"  # the image's WORKDIR: no source tree around
    home.mkdir(exist_ok=True)
    # `python` is the venv's, as PATH=/opt/venv/bin:$PATH makes it in the image.
    path = f"{venv}/bin:{os.environ['PATH']}"
    return home, _clean_env(PATH=path, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", **extra)


def _run_in(venv: Path, command: list[str], timeout: float | None = None, **extra: str) -> subprocess.CompletedProcess:
    home, env = _in_image(venv, **extra)
    return subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=timeout)


def _start(image: Image, venv: Path, catalog: str, port: int) -> Running:
    prefix = f"MODELPLEX_{image.name.upper()}_"
    # Every service's own address setting: gRPC services read LISTEN, HTTP ones HOST and PORT.
    address = f"127.0.0.1:{port}"
    wiring = {f"{prefix}LISTEN": address, f"{prefix}HOST": "127.0.0.1", f"{prefix}PORT": str(port)}
    wiring[f"{prefix}CATALOG_TARGET"] = catalog
    home, env = _in_image(venv, **image.env, **wiring)
    log = venv.parent / "service.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            image.entrypoint, cwd=home, env=env, stdout=sink, stderr=subprocess.STDOUT, **tied_to_parent()
        )
    return Running(image, venv, address, process, log, wiring)


def _wait_healthy(service: Running) -> None:
    deadline = time.monotonic() + STARTUP_S
    while True:
        if service.process.poll() is not None:
            pytest.fail(f"{service.image.name} exited with {service.process.returncode}:\n{_tail(service.log)}")
        if service.healthcheck().returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{service.image.name} not healthy after {STARTUP_S}s:\n{_tail(service.log)}")
        time.sleep(0.5)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, tuple[Image, Path]]:
    images = {name: Image.read(name) for name in SERVICES}
    wheels = _llama_wheels()
    roots = {name: tmp_path_factory.mktemp(f"image-{name}") for name in images}
    with ThreadPoolExecutor(max_workers=len(images)) as pool:  # pip mostly waits on disk: in parallel
        venvs = dict(zip(images, pool.map(lambda n: _install(images[n], roots[n], wheels), images), strict=True))
    return {name: (images[name], venvs[name]) for name in images}


def test_every_service_is_found():
    assert {"catalog", "edge", "text"} <= set(SERVICES)


def test_every_service_starts_healthy_as_installed_by_its_image(installed):
    ports = {name: free_port() for name in installed}
    catalog = f"127.0.0.1:{ports['catalog']}"
    # Started from this (the main) thread: tied_to_parent's death signal follows the spawning thread.
    running = [_start(image, venv, catalog, ports[name]) for name, (image, venv) in installed.items()]
    try:
        for service in running:
            _wait_healthy(service)
    finally:
        for service in running:
            service.process.terminate()
        for service in running:
            try:
                service.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()


@pytest.mark.parametrize("name", SERVICES)
def test_the_image_runs_its_installed_copy_not_the_source_tree(installed, name):
    _, venv = installed[name]
    where = _run_in(venv, ["python", "-c", f"import modelplex_{name}, modelplex_kit as k; print(k.__file__)"])
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv)
