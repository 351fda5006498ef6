"""`make run` on the ports it is given: the catalog's, the edge's and the jobs process's from the environment (as
the services read them), the backends' from the catalog file, each backend's metrics on its catalog entry's
`metrics_port`, and a process-wide MODELPLEX_METRICS_PORT claimed by no process. So two stacks, or a stack and a
test run, share a machine, and a backend's (a pool's) metrics can be scraped locally. The jobs process
(`python -m modelplex_edge.jobs`) is one of the processes it runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from modelplex_kit.children import tied_to_parent
from tests.support import stacks
from tests.support.ports import free_port
from tests.support.until import wait_until

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-ports"


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _descendants(pid: int) -> dict[int, list[str]]:
    """pid -> argv of every process below ``pid`` (what `ps` shows under `make run`)."""
    parents: dict[int, int] = {}
    argv: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv[int(entry)] = [part.decode() for part in cmdline.read().split(b"\0") if part]
        except OSError:  # gone meanwhile
            continue
    below, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in below:
                below[child] = argv.get(child, [])
                frontier.append(child)
    return below


def test_make_run_serves_on_the_ports_it_is_given(tmp_path):
    catalog_listen, edge_port, jobs_port, metrics_port, shared_metrics_port = (
        f"127.0.0.1:{free_port()}",
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    )
    image = {
        "id": "procedural-image",
        "modality": "images",
        "backend": f"127.0.0.1:{free_port()}",
        "engine": {"kind": "procedural", "settings": {"metrics_port": metrics_port}},
        "capabilities": {"sizes": ["256x256"], "max_n": 1, "max_prompt_chars": 100, "max_partial_images": 0},
    }
    catalog = stacks.write_catalog(tmp_path, [image])
    env = {
        **os.environ,
        "MODELPLEX_CATALOG_LISTEN": catalog_listen,
        "MODELPLEX_EDGE_PORT": str(edge_port),
        "MODELPLEX_JOBS_PORT": str(jobs_port),
        # Before: every process was given it; the first took it and the others failed on a port in use.
        "MODELPLEX_METRICS_PORT": str(shared_metrics_port),
        "MODELPLEX_KEYS_FILE": str(tmp_path / "keys.yaml"),
        "MODELPLEX_DEV_API_KEY": KEY,
    }
    log_path = tmp_path / "make-run.log"
    with open(log_path, "w") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "modelplex_kit.devstack", "--catalog", str(catalog)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            **tied_to_parent(),
        )
    try:
        wait_until(lambda: run.poll() is not None or "Modelplex is serving" in log_path.read_text(), timeout=180)
        assert run.poll() is None, log_path.read_text()
        assert f"http://127.0.0.1:{edge_port}/v1" in log_path.read_text()
        # The edge on its port, routing by the catalog on its address.
        models = httpx.get(
            f"http://127.0.0.1:{edge_port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
        )
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["procedural-image"]
        image = httpx.post(
            f"http://127.0.0.1:{edge_port}/v1/images/generations",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "procedural-image", "prompt": "a port", "size": "256x256"},
            timeout=60,
        )
        assert image.status_code == 200, image.text
        # The backend's metrics, that call among them, on the port its catalog entry names.
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert any(
            line.startswith("modelplex_grpc_server_handled_total") and "Images" in line
            for line in metrics.text.splitlines()
        ), metrics.text
        assert _refused(shared_metrics_port)  # taken by no process
        # The jobs process (batches, background responses): its own process, ready on its port.
        jobs = [argv for argv in _descendants(run.pid).values() if argv[1:3] == ["-m", "modelplex_edge.jobs"]]
        assert len(jobs) == 1, _descendants(run.pid)
        assert httpx.get(f"http://127.0.0.1:{jobs_port}/readyz", timeout=10).status_code == 200
        assert "modelplex_job_queue_depth" in httpx.get(f"http://127.0.0.1:{jobs_port}/metrics", timeout=10).text
    finally:
        run.send_signal(signal.SIGTERM)  # make run's Ctrl-C: the stack stops
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
    assert run.returncode == 0, log_path.read_text()
