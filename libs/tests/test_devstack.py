"""The launcher (`make run`): its supervisor restarts a dead process with exponential backoff; its ports."""

import signal
import sys
from pathlib import Path

import pytest
import yaml

from modelplex_kit import devstack
from modelplex_kit.devstack import Stack, backend_plan, free_port


def test_a_dead_process_is_restarted_with_backoff(tmp_path):
    stack = Stack(tmp_path / "catalog.yaml", log_dir=tmp_path)
    stack._spawn("zen", "this", {})  # `python -m this` prints and exits at once: a process that dies
    proc = stack.processes[0]
    try:
        proc.popen.wait(timeout=30)
        assert "restarting in 1 s" in stack.supervise(now=100.0)[0]
        assert stack.supervise(now=100.5) == []  # still backing off
        assert "restarted" in stack.supervise(now=101.1)[0] and proc.restarts == 1
        proc.popen.wait(timeout=30)
        assert "restarting in 2 s" in stack.supervise(now=200.0)[0]  # the second crash waits longer
        assert "The Zen of Python" in (tmp_path / "zen.log").read_text()  # the restart appended to its log
    finally:
        stack.stop()


# Ports: `make run` (devstack.main) takes every port from the environment or its flags, and each backend's
# metrics port from its own catalog entry, never one process-wide port for all.


def _stack_main_builds(monkeypatch, argv: list[str]) -> Stack:
    """The Stack devstack.main() would start with ``argv`` and the current environment (nothing is started)."""
    built: list[Stack] = []

    def capture(self: Stack) -> Stack:
        built.append(self)
        raise RuntimeError("not started: captured by the test")

    monkeypatch.setattr(Stack, "start", capture)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's handlers stay out of pytest
    monkeypatch.setattr(sys, "argv", ["devstack", *argv])
    with pytest.raises(SystemExit):
        devstack.main()
    return built[0]


def test_make_run_takes_the_catalog_and_edge_ports_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELPLEX_CATALOG_LISTEN", "127.0.0.1:50151")
    monkeypatch.setenv("MODELPLEX_EDGE_PORT", "8180")
    monkeypatch.setenv("MODELPLEX_KEYS_FILE", str(tmp_path / "keys.yaml"))
    stack = _stack_main_builds(monkeypatch, ["--catalog", str(tmp_path / "catalog.yaml")])
    assert stack.catalog_listen == "127.0.0.1:50151"  # was always 127.0.0.1:50051, the variable overridden
    assert stack.edge_port == 8180 and stack.base_url == "http://127.0.0.1:8180/v1"


def test_make_run_flags_override_the_environment_and_defaults_are_todays(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELPLEX_KEYS_FILE", str(tmp_path / "keys.yaml"))
    for name in ("MODELPLEX_CATALOG_LISTEN", "MODELPLEX_EDGE_PORT"):
        monkeypatch.delenv(name, raising=False)
    stack = _stack_main_builds(monkeypatch, ["--catalog", str(tmp_path / "catalog.yaml")])
    assert (stack.catalog_listen, stack.edge_port) == ("127.0.0.1:50051", 8080)

    monkeypatch.setenv("MODELPLEX_CATALOG_LISTEN", "127.0.0.1:50151")
    monkeypatch.setenv("MODELPLEX_EDGE_PORT", "8180")
    argv = ["--catalog", str(tmp_path / "catalog.yaml"), "--catalog-listen", "127.0.0.1:50251", "--port", "8280"]
    stack = _stack_main_builds(monkeypatch, argv)
    assert (stack.catalog_listen, stack.edge_port) == ("127.0.0.1:50251", 8280)


def _catalog(tmp_path: Path, *entries: dict) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": list(entries)}))
    return path


def _entry(model: str, modality: str, backend: str, kind: str, **settings) -> dict:
    return {"id": model, "modality": modality, "backend": backend, "engine": {"kind": kind, "settings": settings}}


def test_each_backend_gets_its_own_catalog_entrys_metrics_port(tmp_path):
    catalog = _catalog(
        tmp_path,
        _entry("a", "text", "127.0.0.1:50161", "llamacpp", metrics_port=9161, context_length=2048),
        _entry("b", "images", "127.0.0.1:50163", "procedural"),
        _entry("c", "embeddings", "127.0.0.1:50162", "local", metrics_port=9162),
    )
    plan = backend_plan(catalog)
    text, images, embeddings = (plan[t][1] for t in ("127.0.0.1:50161", "127.0.0.1:50163", "127.0.0.1:50162"))
    assert text["MODELPLEX_METRICS_PORT"] == "9161" and embeddings["MODELPLEX_METRICS_PORT"] == "9162"
    assert images["MODELPLEX_METRICS_PORT"] == "0"  # none named: none served (not an inherited one)
    # Not a MODELPLEX_TEXT_METRICS_PORT, which no service reads; the other settings still go as before.
    assert "MODELPLEX_TEXT_METRICS_PORT" not in text and text["MODELPLEX_TEXT_CONTEXT_LENGTH"] == "2048"
    assert text["MODELPLEX_TEXT_LISTEN"] == "127.0.0.1:50161"  # a backend listens where its entry says


def test_a_model_that_scales_to_zero_gets_its_cold_start_bound_and_every_backend_reports_demand(tmp_path):
    cold = _entry("cold", "text", "127.0.0.1:50161", "openai", upstream_url="http://127.0.0.1:8000/v1")
    catalog = _catalog(
        tmp_path,
        cold | {"scale_to_zero": True, "cold_start_timeout": 45},
        _entry("warm", "embeddings", "127.0.0.1:50162", "local"),
        _entry("default", "images", "127.0.0.1:50163", "procedural") | {"scale_to_zero": True},
    )
    plan = backend_plan(catalog, demand_target="127.0.0.1:50051")
    text, embeddings, images = (plan[t][1] for t in ("127.0.0.1:50161", "127.0.0.1:50162", "127.0.0.1:50163"))
    assert text["MODELPLEX_TEXT_POOL_COLD_START_TIMEOUT_SECONDS"] == "45"
    assert images["MODELPLEX_IMAGES_POOL_COLD_START_TIMEOUT_SECONDS"] == "300.0"  # the stated default
    assert "MODELPLEX_EMBEDDINGS_POOL_COLD_START_TIMEOUT_SECONDS" not in embeddings
    assert (text["MODELPLEX_TEXT_POOL_DEMAND_TARGET"], text["MODELPLEX_TEXT_POOL_DEMAND_KEY"]) == (
        "127.0.0.1:50051",
        "cold",
    )
    assert embeddings["MODELPLEX_EMBEDDINGS_POOL_DEMAND_KEY"] == "warm"


def test_two_backends_naming_one_metrics_port_are_refused(tmp_path):
    catalog = _catalog(
        tmp_path,
        _entry("a", "images", "127.0.0.1:50163", "procedural", metrics_port=9163),
        _entry("b", "videos", "127.0.0.1:50164", "procedural", metrics_port=9163),
    )
    with pytest.raises(ValueError, match="metrics_port 9163"):
        backend_plan(catalog)


def test_no_process_inherits_a_process_wide_metrics_port(monkeypatch, tmp_path):
    """MODELPLEX_METRICS_PORT in `make run`'s environment would be claimed by every process (all but the first
    then fail on a port in use): each gets its own (a backend's from the catalog) or 0, never the shared one."""
    (tmp_path / "metrics_env_probe.py").write_text("import os\nprint(os.environ.get('MODELPLEX_METRICS_PORT'))\n")
    monkeypatch.setenv("MODELPLEX_METRICS_PORT", "9100")
    stack = Stack(tmp_path / "catalog.yaml", log_dir=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    stack._spawn("catalog", "metrics_env_probe", {})
    stack._spawn("backend", "metrics_env_probe", {"MODELPLEX_METRICS_PORT": "9161"})
    try:
        for proc in stack.processes:
            proc.popen.wait(timeout=30)
    finally:
        stack.stop()
    assert (tmp_path / "catalog.log").read_text().strip() == "0"
    assert (tmp_path / "backend.log").read_text().strip() == "9161"


def test_make_run_takes_the_jobs_port_from_the_environment_or_its_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELPLEX_KEYS_FILE", str(tmp_path / "keys.yaml"))
    monkeypatch.delenv("MODELPLEX_JOBS_PORT", raising=False)
    stack = _stack_main_builds(monkeypatch, ["--catalog", str(tmp_path / "catalog.yaml")])
    assert stack.jobs_port == devstack.DEFAULT_JOBS_PORT == 8081  # beside the edge's 8080
    monkeypatch.setenv("MODELPLEX_JOBS_PORT", "8182")
    assert _stack_main_builds(monkeypatch, ["--catalog", str(tmp_path / "catalog.yaml")]).jobs_port == 8182
    argv = ["--catalog", str(tmp_path / "catalog.yaml"), "--jobs-port", "8282"]
    assert _stack_main_builds(monkeypatch, argv).jobs_port == 8282


def _started(monkeypatch, stack: Stack) -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (module, env) of every process ``stack.start()`` spawns (nothing is started)."""
    spawned: dict[str, tuple[str, dict[str, str]]] = {}

    def spawn(self: Stack, name: str, module: str, env: dict[str, str], append: bool = False) -> None:
        spawned[name] = (module, env)

    monkeypatch.setattr(Stack, "_spawn", spawn)
    monkeypatch.setattr(Stack, "_wait_grpc", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(Stack, "_wait_http", lambda self, *args, **kwargs: None)
    stack.start()
    return spawned


@pytest.mark.parametrize("gatekeeper", ["sidecar", "embedded"])
def test_the_jobs_process_starts_after_the_edge_with_the_edges_environment(monkeypatch, tmp_path, gatekeeper):
    for name in ("MODELPLEX_EDGE_RESPONSES_STORE", "MODELPLEX_EDGE_BATCHES_STORE", "MODELPLEX_EDGE_OBJECT_DIR"):
        monkeypatch.delenv(name, raising=False)
    catalog = _catalog(tmp_path)
    stack = Stack(catalog, log_dir=tmp_path, keys_file=tmp_path / "keys.yaml", gatekeeper=gatekeeper)
    spawned = _started(monkeypatch, stack)
    assert list(spawned)[-2:] == ["edge", "jobs"]
    (edge_module, edge), (jobs_module, jobs) = spawned["edge"], spawned["jobs"]
    assert (edge_module, jobs_module) == ("modelplex_edge", "modelplex_edge.jobs")
    assert {name: jobs[name] for name in edge} == edge  # the same stores, catalog and gatekeeper
    assert stack.jobs_port and jobs["MODELPLEX_JOBS_PORT"] == str(stack.jobs_port)  # a free port of its own
    # Stores a second process can share: SQLite files and objects in the stack's directory, not memory.
    assert edge["MODELPLEX_EDGE_RESPONSES_STORE"] == edge["MODELPLEX_EDGE_BATCHES_STORE"] == "sqlite"
    assert edge["MODELPLEX_EDGE_BATCHES_SQLITE_PATH"] == str(tmp_path / "batches.sqlite3")
    assert edge["MODELPLEX_EDGE_OBJECT_DIR"] == str(tmp_path / "objects")
    if gatekeeper == "sidecar":  # both call the one sidecar on its unix socket
        assert jobs["MODELPLEX_EDGE_GATEKEEPER_TARGET"].startswith("unix://")
    else:  # each embeds it, from the same keys file, metering to the same usage file
        assert jobs["MODELPLEX_EDGE_GATEKEEPER_TARGET"] == "embedded"
        assert jobs["MODELPLEX_KEYS_FILE"] == str(tmp_path / "keys.yaml")
        assert jobs["MODELPLEX_GATEKEEPER_USAGE_FILE"] == str(tmp_path / "usage.jsonl")
    # Both report to the catalog's scaler, as the backends do.
    assert edge["MODELPLEX_EDGE_DEMAND_TARGET"] == jobs["MODELPLEX_JOBS_DEMAND_TARGET"] == stack.catalog_listen


def test_stores_the_environment_names_are_kept(monkeypatch, tmp_path):
    monkeypatch.delenv("MODELPLEX_EDGE_OBJECT_DIR", raising=False)
    env = {"MODELPLEX_EDGE_RESPONSES_STORE": "redis", "MODELPLEX_EDGE_BATCHES_STORE": "memory"}
    spawned = _started(monkeypatch, Stack(_catalog(tmp_path), log_dir=tmp_path, env=env))
    edge = spawned["edge"][1]
    assert "MODELPLEX_EDGE_RESPONSES_STORE" not in edge and "MODELPLEX_EDGE_BATCHES_STORE" not in edge


def test_free_port_never_hands_out_one_port_twice():
    """A stack's edge port once came out equal to a backend target picked a moment before (the OS reoffers a
    closed port): the edge's readiness probe then read the backend's gRPC bytes (BadStatusLine)."""
    ports = [free_port() for _ in range(3000)]
    assert len(set(ports)) == len(ports)
