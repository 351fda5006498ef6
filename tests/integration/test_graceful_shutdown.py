"""SIGTERM on a backend: it stops taking calls, finishes the ones in flight, and exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplex.v1 import text_pb2, text_pb2_grpc
from modelplex_kit.children import tied_to_parent
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


def chat(text: str, max_tokens: int) -> text_pb2.GenerateRequest:
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=text)])
    return text_pb2.GenerateRequest(
        model="smollm2",
        chat=text_pb2.ChatInput(messages=[message]),
        sampling=text_pb2.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1),
    )


def wait_serving(target: str, process: subprocess.Popen) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            assert process.poll() is None, "the backend died while starting"
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(target)


def wait_refusing_calls(channel: grpc.Channel, timeout: float = 30) -> None:
    """Until the server turns new calls away: a health check that fails UNAVAILABLE, not a fixed delay."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return
        time.sleep(0.02)
    raise TimeoutError("the backend still accepts calls after SIGTERM")


def test_sigterm_drains_in_flight_streams_then_exits(tmp_path):
    target = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "MODELPLEX_TEXT_LISTEN": target,
        "MODELPLEX_TEXT_CONTEXT_LENGTH": "1024",
        "MODELPLEX_GRACE_SECONDS": "30",
    }
    log = open(tmp_path / "text.log", "w")  # noqa: SIM115 - closed below
    backend = subprocess.Popen(
        [sys.executable, "-m", "modelplex_text"], env=env, stdout=log, stderr=subprocess.STDOUT, **tied_to_parent()
    )
    try:
        wait_serving(target, backend)
        with grpc.insecure_channel(target) as channel:
            stub = text_pb2_grpc.TextGenerationServiceStub(channel)
            stream = stub.GenerateStream(chat("Write a long story about a lighthouse.", 160))
            messages = [next(stream)]
            backend.send_signal(signal.SIGTERM)
            wait_refusing_calls(channel)  # the signal is handled; the stream is still far from done
            with pytest.raises(grpc.RpcError) as refused:  # new text calls are turned away too
                stub.Generate(chat("Hi", 2), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            messages += list(stream)  # while the call in flight runs to its end
            usage = messages[-1].usage
            assert messages[-1].HasField("usage") and usage.completion_tokens > 40
        assert backend.wait(timeout=30) == 0
    finally:
        if backend.poll() is None:
            backend.kill()
        log.close()
    assert "shutting down: draining in-flight calls" in (tmp_path / "text.log").read_text()
