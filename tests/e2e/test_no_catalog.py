"""An edge whose catalog is unreachable answers 503 with Retry-After, and is not ready."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from modelplex_kit.devstack import free_port

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-no-catalog"


@pytest.fixture(scope="module")
def edge_without_catalog(tmp_path_factory):
    port = free_port()
    env = {
        **os.environ,
        "MODELPLEX_EDGE_PORT": str(port),
        "MODELPLEX_EDGE_CATALOG_TARGET": f"127.0.0.1:{free_port()}",  # nobody listens there
        "MODELPLEX_EDGE_CATALOG_WAIT_SECONDS": "0.5",
        "MODELPLEX_DEV_API_KEY": KEY,
        "MODELPLEX_EDGE_GATEKEEPER_TARGET": "",
    }
    log = open(tmp_path_factory.mktemp("no-catalog") / "edge.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "modelplex_edge"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/healthz", timeout=1)
            break
        except httpx.HTTPError:
            assert process.poll() is None, "the edge died"
            time.sleep(0.2)
    yield base
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_model_requests_get_503_with_retry_after(edge_without_catalog):
    response = httpx.post(
        f"{edge_without_catalog}/v1/chat/completions",
        json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert "catalog" in response.json()["error"]["message"]
    assert response.headers["x-request-id"]


def test_the_edge_is_alive_but_not_ready(edge_without_catalog):
    assert httpx.get(f"{edge_without_catalog}/healthz").status_code == 200
    assert httpx.get(f"{edge_without_catalog}/readyz").status_code == 503
