"""Runs the whole stack as local processes: ``make run`` and the end-to-end tests.

The catalog file is the single source of truth: every distinct backend target
of a text model gets one text backend process, configured from the entry's
engine kind and settings, exactly as the Helm chart does in a cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplex_kit.children import tied_to_parent

# modality -> the backend module that serves it (each later service adds itself here)
BACKEND_MODULES = {"text": "modelplex_text"}
_ENV_PREFIX = {"modelplex_text": "MODELPLEX_TEXT_"}
# Engine kind of a backend that runs elsewhere (another machine, a cluster): not started here.
EXTERNAL = "external"


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: IO[Any] | None

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.popen.returncode}")


def default_catalog() -> Path:
    from modelplex_catalog.settings import DEFAULT_CATALOG

    return Path(os.environ.get("MODELPLEX_CATALOG") or DEFAULT_CATALOG)


def backend_plan(catalog: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """target -> (module, env) for every backend the catalog routes to."""
    plan: dict[str, tuple[str, dict[str, str]]] = {}
    for entry in (yaml.safe_load(catalog.read_text()) or {}).get("models", []):
        module = BACKEND_MODULES.get(entry["modality"])
        engine = entry.get("engine", {})
        if module is None or entry["backend"] in plan or engine.get("kind") == EXTERNAL:
            continue
        prefix = _ENV_PREFIX[module]
        env = {f"{prefix}LISTEN": entry["backend"], f"{prefix}ENGINE": engine.get("kind", "")}
        env |= {f"{prefix}{key.upper()}": str(value) for key, value in (engine.get("settings") or {}).items()}
        plan[entry["backend"]] = (module, env)
    return plan


@dataclass
class Stack:
    catalog: Path
    catalog_listen: str = "127.0.0.1:50051"
    edge_port: int = 8080
    env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    start_timeout: float = 180.0
    processes: list[Process] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.edge_port}/v1"

    def start(self) -> Stack:
        try:
            self._spawn(
                "catalog",
                "modelplex_catalog",
                {"MODELPLEX_CATALOG": str(self.catalog), "MODELPLEX_CATALOG_LISTEN": self.catalog_listen},
            )
            self._wait_grpc("catalog", self.catalog_listen)
            for target, (module, env) in backend_plan(self.catalog).items():
                name = f"{module.removeprefix('modelplex_')}@{target}"
                self._spawn(name, module, env)
                self._wait_grpc(name, target)
            self._spawn(
                "edge",
                "modelplex_edge",
                {"MODELPLEX_EDGE_PORT": str(self.edge_port), "MODELPLEX_EDGE_CATALOG_TARGET": self.catalog_listen},
            )
            self._wait_http("edge", f"http://127.0.0.1:{self.edge_port}/readyz")
        except BaseException:
            self.stop()
            raise
        return self

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def stop(self, grace: float = 15.0) -> None:
        for proc in reversed(self.processes):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.processes):
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
            if proc.log:
                proc.log.close()
        self.processes.clear()

    def _spawn(self, name: str, module: str, env: dict[str, str]) -> None:
        # Closed in stop(), when the process is gone.
        log = open(self.log_dir / f"{name.replace(':', '_')}.log", "w") if self.log_dir else None  # noqa: SIM115
        popen = subprocess.Popen(
            [sys.executable, "-m", module],
            env={**os.environ, **self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
            **tied_to_parent(),  # nothing outlives a crashed or killed devstack or test run
        )
        self.processes.append(Process(name, popen, log))

    def _wait_grpc(self, name: str, target: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self.process(name).check_alive()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{name} did not become healthy on {target}")

    def _wait_http(self, name: str, url: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            self.process(name).check_alive()
            try:
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not become ready at {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run Modelplex locally on the CPU engines.")
    parser.add_argument("--catalog", type=Path, default=None)
    parser.add_argument("--port", type=int, default=int(os.environ.get("MODELPLEX_EDGE_PORT", "8080")))
    args = parser.parse_args()
    stack = Stack(
        args.catalog or default_catalog(),
        edge_port=args.port,
        env={"MODELPLEX_LOG_FORMAT": os.environ.get("MODELPLEX_LOG_FORMAT", "text")},
    )
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as exc:  # e.g. a port in use: the service's own log says which
        raise SystemExit(f"modelplex: {exc}; see the log lines above") from None
    # A key of your own stays out of the terminal's scrollback; the public default is shown.
    key = "$MODELPLEX_DEV_API_KEY" if os.environ.get("MODELPLEX_DEV_API_KEY") else "sk-modelplex-dev"
    print(
        f"\n  Modelplex is serving at {stack.base_url}\n  API key: {key}\n"
        f'  Try: curl {stack.base_url}/models -H "Authorization: Bearer {key}"\n  Ctrl-C stops everything.\n',
        flush=True,
    )
    while not stopping:
        for proc in stack.processes:
            if proc.popen.poll() is not None:
                print(f"{proc.name} exited unexpectedly; stopping", file=sys.stderr)
                stopping = True
        time.sleep(0.5)
    stack.stop()


if __name__ == "__main__":
    main()
