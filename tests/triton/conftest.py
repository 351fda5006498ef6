"""The Triton suite: a real tritonserver (2.51, CPU) behind every Triton adapter, driven through the edge.

One server starts as soon as collection ends, so its models load while the rest of the suite runs:
the repository of deploy/triton/model_repository/ (one model per modality; the text model on our
implementation of the vLLM backend's contract, running the real vLLM), with the command line, uid
and environment of the Helm chart's Triton pod (tests/support/real_triton.py). The suite waits for it
when its first test needs it; if it cannot start, every test that needs it fails with Triton's own
log, never skipped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

from modelplex_kit.devstack import Stack
from tests.support import stacks
from tests.support.ports import free_port
from tests.support.real_triton import TritonServer

EXAMPLE_CATALOG = Path(__file__).resolve().parents[2] / "docs" / "examples" / "catalog-triton.yaml"
# The models' loading (vLLM's compile on a loaded 2-core machine above all) takes minutes.
START_TIMEOUT_S = 900.0

# Started by pytest_collection_finish, stopped by pytest_sessionfinish; None until then.
_server: list[TritonServer] = []
_failure: list[str] = []
_ready: list[bool] = []  # [True] once the `triton` fixture has seen the server ready


def start_server() -> None:
    if _server or _failure:
        return
    try:
        # Its log: started before any fixture, so not under pytest's tmp_path.
        workdir = Path(tempfile.mkdtemp(prefix="modelplex-triton-"))
        os.chmod(workdir, 0o755)
        # MODELPLEX_TRITON_MODELS=minilm,espeak: a subset, while working on some models (the others' tests fail).
        subset = tuple(m for m in os.environ.get("MODELPLEX_TRITON_MODELS", "").split(",") if m)
        _server.append(TritonServer(workdir, **({"models": subset} if subset else {})).start())
    except Exception as exc:  # no Triton env, a chart that does not render: every Triton test fails saying so
        _failure.append(repr(exc))


def pytest_collection_finish(session: pytest.Session) -> None:
    here = Path(__file__).parent
    if any(Path(str(item.path)).is_relative_to(here) for item in session.items):
        start_server()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # around pytest-timeout's own wrapper, which reads the marker
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Until the server is ready, the test that waits for it may take START_TIMEOUT_S on top of its own
    limit (pytest-timeout counts fixture setup): run alone, this suite's first test waits out vLLM's compile."""
    waiting = not _failure and not _ready
    if waiting and "triton" in item.fixturenames and Path(str(item.path)).is_relative_to(Path(__file__).parent):
        limit = item.get_closest_marker("timeout")
        base = limit.args[0] if limit and limit.args else float(item.config.getini("timeout") or 0)
        item.add_marker(pytest.mark.timeout(base + START_TIMEOUT_S))
    yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    for server in _server:
        server.stop()
        if os.environ.get("CI") and server.process is not None and server.process.returncode not in (0, -2, -15, None):
            print(f"\ntritonserver log tail:\n{server.tail()}")


@pytest.fixture(scope="session")
def triton() -> TritonServer:
    """The real tritonserver, every model of the repository loaded and ready."""
    start_server()  # when this folder's tests run without collection having started it
    if _failure:
        pytest.fail(f"tritonserver could not start: {_failure[0]}", pytrace=False)
    try:
        server = _server[0].wait_ready(START_TIMEOUT_S)
        _ready.append(True)
        return server
    except RuntimeError as exc:
        _failure.append(str(exc))
        pytest.fail(str(exc), pytrace=False)


def example_model(model_id: str, server: TritonServer) -> dict:
    """A model of the README's example catalog (docs/examples/catalog-triton.yaml), pointed at ``server``."""
    models = yaml.safe_load(EXAMPLE_CATALOG.read_text())["models"]
    model = next(m for m in models if m["id"] == model_id)
    settings = model["engine"]["settings"] | {"upstream_url": server.grpc_target}
    return model | {"backend": f"127.0.0.1:{free_port()}", "engine": model["engine"] | {"settings": settings}}


def start_stack(tmp: Path, models: list[dict], key: str, env: dict[str, str] | None = None) -> Stack:
    catalog = stacks.write_catalog(tmp, models)
    env = {"MODELPLEX_DEV_API_KEY": key, "MODELPLEX_LOG_LEVEL": "info", **(env or {})}
    return stacks.start_stack(catalog, tmp, env=env)
