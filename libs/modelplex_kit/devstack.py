"""Runs the whole stack as local processes: ``make run`` and the end-to-end tests.

The catalog file is the single source of truth: every distinct backend target
in it gets one backend process of the entry's modality (the modality registry
says which package serves it), listening on that target, configured from the
entry's engine kind and settings, exactly as the Helm chart does in a cluster.

Ports: the catalog's, the edge's and the jobs process's come from
:class:`LaunchSettings` (the same variables the services read, or
``--catalog-listen``/``--port``/``--jobs-port``), the backends' from the catalog
file's ``backend`` targets, and the gatekeeper is on a unix socket of its own.

The jobs process (``python -m modelplex_edge.jobs``: batches and background
responses) starts after the edge with the edge's environment, so both reach the
same stores (SQLite files and an object directory, in the stack's directory
unless the environment names others), the same catalog and the same gatekeeper.

Metrics: a backend serves Prometheus on its entry's
``engine.settings.metrics_port`` (local processes share one network namespace,
so each needs its own); no process is given a process-wide
``MODELPLEX_METRICS_PORT``, which every one of them would try to claim.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelplex_kit.children import tied_to_parent
from modelplex_kit.cold_start import DEFAULT_COLD_START_TIMEOUT_S
from modelplex_kit.modalities import REGISTRY

# Engine kind of a backend that runs elsewhere (another machine, a cluster): not started here.
EXTERNAL = "external"
# Restart backoff of a crashed process: 1 s, 2 s, 4 s ... up to 30 s, reset after a minute up.
_BACKOFF_FIRST_SECONDS = 1.0
_BACKOFF_MAX_SECONDS = 30.0
_STABLE_SECONDS = 60.0
# Attempts to start a process before the launcher gives up on it.
_START_ATTEMPTS = 3
# Where `make run` serves unless told otherwise (the catalog's and the edge's own defaults).
DEFAULT_CATALOG_LISTEN = "127.0.0.1:50051"
DEFAULT_EDGE_PORT = 8080
#: The jobs process's /healthz, /readyz, /metrics (its own default, MODELPLEX_JOBS_PORT).
DEFAULT_JOBS_PORT = 8081
#: The shared Prometheus port variable (modelplex_kit.settings); set per process here, never inherited.
METRICS_PORT_ENV = "MODELPLEX_METRICS_PORT"
#: The engine setting of a catalog entry that names its backend's metrics port (not passed on as a
#: MODELPLEX_<MODALITY>_ variable: it becomes MODELPLEX_METRICS_PORT of that backend alone).
METRICS_PORT_SETTING = "metrics_port"
#: The jobs process: the edge's package, its own command.
JOBS_MODULE = "modelplex_edge.jobs"


class LaunchSettings(BaseSettings):
    """What `make run` reads from its environment (its flags override each)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    # None: name it with --catalog (`make run` passes the packaged catalog).
    catalog: Path | None = Field(None, validation_alias=AliasChoices("MODELPLEX_CATALOG"))
    # The catalog's gRPC address: the variable the catalog itself reads; the edge is pointed at it.
    catalog_listen: str = Field(
        DEFAULT_CATALOG_LISTEN, min_length=1, validation_alias=AliasChoices("MODELPLEX_CATALOG_LISTEN")
    )
    # The edge's HTTP port: the variable the edge itself reads.
    edge_port: int = Field(DEFAULT_EDGE_PORT, ge=1, le=65535, validation_alias=AliasChoices("MODELPLEX_EDGE_PORT"))
    # The jobs process's HTTP port (health, readiness, metrics): the variable it reads itself.
    jobs_port: int = Field(DEFAULT_JOBS_PORT, ge=1, le=65535, validation_alias=AliasChoices("MODELPLEX_JOBS_PORT"))
    keys_file: Path = Field(Path(".modelplex/keys.yaml"), validation_alias=AliasChoices("MODELPLEX_KEYS_FILE"))


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: IO[Any] | None
    #: How to start it again (the supervisor restarts a process that died).
    module: str = ""
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    started_at: float = field(default_factory=time.monotonic)
    restart_at: float | None = None

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.popen.returncode}")


_handed_out: set[int] = set()
_handing_out = threading.Lock()


def free_port() -> int:
    """A loopback port nothing listens on now, and never one this process handed out before: the OS offers a
    closed port again at once, so two callers asking in a row (a catalog's backend target, then a stack's edge
    port), before either binds, could get the same one and the second server would find the first's."""
    with _handing_out:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def backend_plan(catalog: Path, demand_target: str = "") -> dict[str, tuple[str, dict[str, str]]]:
    """target -> (module, env) for every backend the catalog routes to.

    An entry with ``scale_to_zero`` holds requests up to its ``cold_start_timeout`` (300 s unless it says)
    while its engines start; every backend reports its demand under its model's id to ``demand_target``
    (the catalog's scaler), as the chart wires them.

    Each backend listens on its target and serves metrics on its entry's ``metrics_port`` engine
    setting (``MODELPLEX_METRICS_PORT`` of that process alone; 0, off, without one). Raises ValueError
    when two backends name the same metrics port: the second could not start.
    """
    plan: dict[str, tuple[str, dict[str, str]]] = {}
    metrics_ports: dict[int, str] = {}
    for entry in (yaml.safe_load(catalog.read_text()) or {}).get("models", []):
        if "adapter" in entry:  # a LoRA adapter runs on its base's backend
            continue
        row = REGISTRY.get(entry["modality"])
        engine = entry.get("engine", {})
        if row is None or entry["backend"] in plan or engine.get("kind") == EXTERNAL:
            continue
        target, prefix = entry["backend"], row.env_prefix
        settings = dict(engine.get("settings") or {})
        metrics_port = int(settings.pop(METRICS_PORT_SETTING, 0) or 0)
        if metrics_port and metrics_port in metrics_ports:
            raise ValueError(
                f"backends {metrics_ports[metrics_port]} and {target} both name metrics_port {metrics_port}"
            )
        if metrics_port:
            metrics_ports[metrics_port] = target
        env = {f"{prefix}LISTEN": target, f"{prefix}ENGINE": engine.get("kind", "")}
        if entry.get("scale_to_zero"):
            timeout = entry.get("cold_start_timeout", DEFAULT_COLD_START_TIMEOUT_S)
            env[f"{prefix}POOL_COLD_START_TIMEOUT_SECONDS"] = str(timeout)
        if demand_target:
            env |= {f"{prefix}POOL_DEMAND_TARGET": demand_target, f"{prefix}POOL_DEMAND_KEY": entry["id"]}
        env |= {f"{prefix}{key.upper()}": str(value) for key, value in settings.items()}
        env[METRICS_PORT_ENV] = str(metrics_port)
        plan[target] = (row.package, env)
    return plan


@dataclass
class Stack:
    catalog: Path
    catalog_listen: str = DEFAULT_CATALOG_LISTEN
    edge_port: int = DEFAULT_EDGE_PORT
    #: The jobs process's HTTP port; 0: a free one, chosen at start.
    jobs_port: int = 0
    #: Every process's environment over os.environ; never its MODELPLEX_METRICS_PORT (one port cannot
    #: serve several processes): a backend's comes from its catalog entry, the others serve none.
    env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    #: Set: a gatekeeper sidecar decides every request from this keys file (created holding the dev
    #: key if missing). None: the edge accepts only the dev key, without limits.
    keys_file: Path | None = None
    #: "sidecar": its own process on a unix socket, which the edge and the jobs process both call;
    #: "embedded": decided inside the edge process, and inside the jobs process from the same keys file
    #: (metering to the same usage file: one write per line, appended, so the two never interleave).
    gatekeeper: str = "sidecar"
    start_timeout: float = 180.0
    #: True: start() returns once every backend is SERVING (its engine ready). False: once each
    #: answers grpc.health at all, so a test can watch a backend whose engine is not up yet.
    wait_for_engines: bool = True
    processes: list[Process] = field(default_factory=list)
    _supervisor: threading.Thread | None = field(default=None, repr=False)
    _supervisor_stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.edge_port}/v1"

    def start(self) -> Stack:
        try:
            self._spawn(
                "catalog",
                "modelplex_catalog",
                {
                    "MODELPLEX_CATALOG": str(self.catalog),
                    "MODELPLEX_CATALOG_LISTEN": self.catalog_listen,
                    # Backends start after the catalog: see each one within 0.2 s of it serving.
                    "MODELPLEX_CATALOG_READINESS_RETRY_SECONDS": "0.2",
                },
            )
            self._wait_grpc("catalog", self.catalog_listen)
            for target, (module, env) in backend_plan(self.catalog, demand_target=self.catalog_listen).items():
                name = f"{module.removeprefix('modelplex_')}@{target}"
                self._spawn(name, module, env)
                self._wait_grpc(name, target, serving=self.wait_for_engines)
            edge_env = {
                "MODELPLEX_EDGE_PORT": str(self.edge_port),
                "MODELPLEX_EDGE_CATALOG_TARGET": self.catalog_listen,
                # Queued jobs reported to the catalog's scaler, as the backends report theirs.
                "MODELPLEX_EDGE_DEMAND_TARGET": self.catalog_listen,
                **self._shared_stores(),
            }
            if self.keys_file is not None and self.gatekeeper == "embedded":
                edge_env |= self._gatekeeper_env(self.keys_file) | {"MODELPLEX_EDGE_GATEKEEPER_TARGET": "embedded"}
            elif self.keys_file is not None:
                edge_env["MODELPLEX_EDGE_GATEKEEPER_TARGET"] = self._start_gatekeeper(self.keys_file)
            self._spawn("edge", "modelplex_edge", edge_env)
            self._wait_http("edge", f"http://127.0.0.1:{self.edge_port}/readyz")
            # Batches and background responses: the edge's environment (its stores, catalog, gatekeeper).
            self.jobs_port = self.jobs_port or free_port()
            jobs_env = edge_env | {
                "MODELPLEX_JOBS_PORT": str(self.jobs_port),
                "MODELPLEX_JOBS_DEMAND_TARGET": self.catalog_listen,
            }
            self._spawn("jobs", JOBS_MODULE, jobs_env)
            self._wait_http("jobs", f"http://127.0.0.1:{self.jobs_port}/readyz")
        except BaseException:
            self.stop()
            raise
        return self

    def _shared_stores(self) -> dict[str, str]:
        """The stores the edge and the jobs process share: a memory store would be each process's own, so a
        store the environment leaves unset is a SQLite file (objects: a directory) in the stack's directory."""
        given = {**os.environ, **self.env}
        state = self.log_dir or Path(tempfile.mkdtemp(prefix="modelplex-state-"))
        defaults = {
            "MODELPLEX_EDGE_RESPONSES_STORE": "sqlite",
            "MODELPLEX_EDGE_RESPONSES_SQLITE_PATH": str(state / "responses.sqlite3"),
            "MODELPLEX_EDGE_BATCHES_STORE": "sqlite",
            "MODELPLEX_EDGE_BATCHES_SQLITE_PATH": str(state / "batches.sqlite3"),
            "MODELPLEX_EDGE_OBJECT_DIR": str(state / "objects"),
        }
        return {name: value for name, value in defaults.items() if name not in given}

    def _start_gatekeeper(self, keys_file: Path) -> str:
        """Starts the gatekeeper on a unix socket (as beside the edge in a pod); returns its target."""
        target = f"unix://{tempfile.mkdtemp(prefix='modelplex-gk-')}/gatekeeper.sock"
        env = self._gatekeeper_env(keys_file) | {"MODELPLEX_GATEKEEPER_LISTEN": target}
        self._spawn("gatekeeper", "modelplex_gatekeeper", env)
        self._wait_grpc("gatekeeper", target)
        return target

    def _gatekeeper_env(self, keys_file: Path) -> dict[str, str]:
        return {
            "MODELPLEX_GATEKEEPER_USAGE_FILE": self.env.get(
                "MODELPLEX_GATEKEEPER_USAGE_FILE", str(keys_file.parent / "usage.jsonl")
            ),
            "MODELPLEX_KEYS_FILE": str(keys_file),
            "MODELPLEX_GATEKEEPER_DEV_KEY_IF_MISSING": self.env.get("MODELPLEX_DEV_API_KEY")
            or os.environ.get("MODELPLEX_DEV_API_KEY", "sk-modelplex-dev"),
        }

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def stop(self, grace: float = 15.0) -> None:
        self._supervisor_stop.set()  # first: nothing may be restarted while the stack stops
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
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

    def _spawn(self, name: str, module: str, env: dict[str, str], append: bool = False) -> None:
        # Closed in stop(), when the process is gone. A restarted process appends to its log.
        path = self.log_dir / f"{name.replace(':', '_')}.log" if self.log_dir else None
        log = open(path, "a" if append else "w") if path else None  # noqa: SIM115
        popen = subprocess.Popen(
            [sys.executable, "-m", module],
            env={**os.environ, **self.env, METRICS_PORT_ENV: "0", **env},
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
            **tied_to_parent(),  # nothing outlives a crashed or killed devstack or test run
        )
        self.processes.append(Process(name, popen, log, module, env))

    def supervise(self, now: float | None = None) -> list[str]:
        """Restarts, with exponential backoff, every process that died; returns what it did.

        Like a kubelet: a crash is logged and the process comes back, the rest of the
        stack keeps serving. A process that stayed up a minute starts its backoff afresh.
        """
        now = time.monotonic() if now is None else now
        events = []
        for proc in self.processes:
            if proc.popen.poll() is None:
                if proc.restarts and now - proc.started_at > _STABLE_SECONDS:
                    proc.restarts = 0
                continue
            if proc.restart_at is None:
                delay = min(_BACKOFF_MAX_SECONDS, _BACKOFF_FIRST_SECONDS * 2**proc.restarts)
                proc.restart_at = now + delay
                events.append(f"{proc.name} exited with status {proc.popen.returncode}; restarting in {delay:g} s")
            elif now >= proc.restart_at:
                self._respawn(proc)
                events.append(f"{proc.name} restarted (restart #{proc.restarts})")
        return events

    def start_supervising(self, interval: float = 0.5) -> None:
        """Supervises in a background thread until stop(); restarts are reported on stderr."""

        def loop() -> None:
            while not self._supervisor_stop.wait(interval):
                for line in self.supervise():
                    print(f"modelplex: {line}", file=sys.stderr, flush=True)

        self._supervisor_stop.clear()
        self._supervisor = threading.Thread(target=loop, name="modelplex-supervisor", daemon=True)
        self._supervisor.start()

    def _respawn(self, proc: Process) -> None:
        if proc.log:
            proc.log.close()
        self._spawn(proc.name, proc.module, proc.env, append=True)
        fresh = self.processes.pop()
        proc.popen, proc.log = fresh.popen, fresh.log
        proc.restarts += 1
        proc.started_at, proc.restart_at = time.monotonic(), None

    def _alive_or_restarted(self, name: str) -> None:
        """A process that dies while starting is started again (a kubelet would), a few times at most:
        one crash at startup must not take the stack down. A process that keeps dying (a port in use,
        a bad setting) fails the start with its exit status."""
        proc = self.process(name)
        if proc.popen.poll() is None:
            return
        if proc.restarts >= _START_ATTEMPTS - 1:
            proc.check_alive()
        status = proc.popen.returncode
        print(f"modelplex: {name} exited with status {status} while starting; restarting", file=sys.stderr)
        time.sleep(_BACKOFF_FIRST_SECONDS * 2**proc.restarts)
        self._respawn(proc)

    def _wait_grpc(self, name: str, target: str, serving: bool = True) -> None:
        deadline = time.monotonic() + self.start_timeout
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self._alive_or_restarted(name)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING or not serving:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{name} did not become healthy on {target}")

    def _wait_http(self, name: str, url: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            self._alive_or_restarted(name)
            try:
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not become ready at {url}")


def launch_settings(argv: list[str] | None = None) -> LaunchSettings:
    """The environment's LaunchSettings, overridden by the flags in ``argv`` (default: sys.argv)."""
    parser = argparse.ArgumentParser(description="Run Modelplex locally on the CPU engines.")
    try:
        defaults = LaunchSettings()
    except ValidationError as exc:
        parser.error(str(exc))
    # `make run` passes the packaged catalog; the launcher does not import the catalog service.
    parser.add_argument("--catalog", type=Path, default=defaults.catalog, help="MODELPLEX_CATALOG")
    parser.add_argument(
        "--catalog-listen", default=defaults.catalog_listen, help=f"MODELPLEX_CATALOG_LISTEN ({DEFAULT_CATALOG_LISTEN})"
    )
    parser.add_argument(
        "--port", "--edge-port", type=int, default=defaults.edge_port, help=f"MODELPLEX_EDGE_PORT ({DEFAULT_EDGE_PORT})"
    )
    parser.add_argument(
        "--jobs-port", type=int, default=defaults.jobs_port, help=f"MODELPLEX_JOBS_PORT ({DEFAULT_JOBS_PORT})"
    )
    args = parser.parse_args(argv)
    if args.catalog is None:
        parser.error("name the catalog file: --catalog PATH or MODELPLEX_CATALOG")
    try:  # the flags over the environment (keyword arguments win over it)
        return LaunchSettings(
            catalog=args.catalog, catalog_listen=args.catalog_listen, edge_port=args.port, jobs_port=args.jobs_port
        )
    except ValidationError as exc:
        parser.error(str(exc))


def main() -> None:
    settings = launch_settings()
    if os.environ.get(METRICS_PORT_ENV, "0") not in ("", "0"):
        print(
            f"modelplex: {METRICS_PORT_ENV} is not passed on (every process would claim it); a backend serves "
            "metrics on its catalog entry's engine setting metrics_port",
            file=sys.stderr,
        )
    keys_file = settings.keys_file
    # Stored responses outlive a restart of `make run`: SQLite beside the keys, unless told otherwise.
    responses = {
        "MODELPLEX_EDGE_RESPONSES_STORE": os.environ.get("MODELPLEX_EDGE_RESPONSES_STORE", "sqlite"),
        "MODELPLEX_EDGE_RESPONSES_SQLITE_PATH": os.environ.get(
            "MODELPLEX_EDGE_RESPONSES_SQLITE_PATH", str(keys_file.parent / "responses.sqlite3")
        ),
    }
    # Batches and files outlive a restart too: the batch queue in SQLite, objects in a directory, beside the keys.
    batches = {
        "MODELPLEX_EDGE_BATCHES_STORE": os.environ.get("MODELPLEX_EDGE_BATCHES_STORE", "sqlite"),
        "MODELPLEX_EDGE_BATCHES_SQLITE_PATH": os.environ.get(
            "MODELPLEX_EDGE_BATCHES_SQLITE_PATH", str(keys_file.parent / "batches.sqlite3")
        ),
        "MODELPLEX_EDGE_OBJECT_DIR": os.environ.get("MODELPLEX_EDGE_OBJECT_DIR", str(keys_file.parent / "objects")),
    }
    stack = Stack(
        settings.catalog,
        catalog_listen=settings.catalog_listen,
        edge_port=settings.edge_port,
        jobs_port=settings.jobs_port,
        env={"MODELPLEX_LOG_FORMAT": os.environ.get("MODELPLEX_LOG_FORMAT", "text"), **responses, **batches},
        keys_file=keys_file,
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
        f"\n  Modelplex is serving at {stack.base_url}\n  API key: {key}  (keys: {stack.keys_file}; "
        "`modelplex keys create --name NAME` adds one)\n"
        f'  Try: curl {stack.base_url}/models -H "Authorization: Bearer {key}"\n'
        f"  Batches and background responses run in the jobs process (metrics: "
        f"http://127.0.0.1:{stack.jobs_port}/metrics)\n  Ctrl-C stops everything.\n",
        flush=True,
    )
    stack.start_supervising()
    while not stopping:
        time.sleep(0.2)
    stack.stop()


if __name__ == "__main__":
    main()
