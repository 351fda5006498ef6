"""Starts KServe's Python ModelServer with the visual test models (tests/support/kserve_visual_models.py).

The server runs in its own process: kserve's and tritonclient's generated
protos both define the ``inference`` package, and one process cannot load both.
"""

from __future__ import annotations

import subprocess
import sys
import time

from tests.support.ports import free_port


class KServeVisual:
    """The model server as a subprocess on free loopback ports."""

    def __init__(self) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self._process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 90.0) -> KServeVisual:
        import tritonclient.grpc as triton

        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.kserve_visual_models", "--grpc-port", str(self.grpc_port),
             "--http-port", str(self.http_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = triton.InferenceServerClient(self.address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the KServe model server exited with {self._process.returncode}")
            try:
                if client.is_model_ready("procedural-image-png"):
                    return self
            except Exception:  # not listening yet
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError("the KServe model server did not become ready")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
