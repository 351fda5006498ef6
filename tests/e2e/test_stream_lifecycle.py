"""What happens when a stream is cut: by the client, or by a backend dying mid-way."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


def _backend_log(stack, model_target_name: str) -> str:
    return "".join(p.read_text() for p in stack.logs.glob(f"{model_target_name}*.log"))


def _aborted_request_ids(stack) -> list[str]:
    lines = [json.loads(line) for line in _backend_log(stack, "text@").splitlines() if line.startswith("{")]
    return [line.get("request_id", "") for line in lines if line["msg"].startswith("generation aborted")]


def _essay(topic: str, **fields) -> dict:
    """A request that would run for 1500 tokens unless aborted."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write a very long essay about {topic}."}],
        "max_tokens": 1500,
        "temperature": 1.0,
        **fields,
    }


def _assert_aborted(stack, request_id: str) -> None:
    """The backend's JSON log says so, under the request id the client sent to the edge."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and request_id not in _aborted_request_ids(stack):
        time.sleep(0.2)
    assert request_id in _aborted_request_ids(stack)


def test_client_disconnect_aborts_generation(stack, client):
    body = _essay("rivers", stream=True)
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            f"{stack.base_url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {client.api_key}", "x-request-id": "abort-me-1"},
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    _assert_aborted(stack, "abort-me-1")
    # The engine is free again at once, not after 1500 tokens.
    started = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert time.monotonic() - started < 10


def test_backend_dying_mid_stream_becomes_an_error_event_then_done(stack, client):
    stream = client.chat.completions.create(
        model="doomed",
        messages=[{"role": "user", "content": "Write a very long essay about mountains."}],
        max_tokens=1500,
        stream=True,
    )
    doomed = stack.process(f"text@{stack.targets['doomed']}")
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    doomed.popen.send_signal(signal.SIGKILL)
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert "unavailable" in str(err.value).lower() or "internal" in str(err.value).lower()


async def test_client_disconnect_during_a_unary_request_aborts_generation(stack, client):
    backend = stack.process(f"text@{stack.targets[MODEL]}").popen.pid
    idle = _cpu_seconds(backend)
    async with httpx.AsyncClient(timeout=120) as http:
        request = asyncio.create_task(
            http.post(
                f"{stack.base_url}/chat/completions",
                json=_essay("deserts"),
                headers={"Authorization": f"Bearer {client.api_key}", "x-request-id": "abort-me-2"},
            )
        )
        # Hang up once the backend is generating (its CPU time climbs), not after a guessed delay:
        # on a loaded machine a fixed delay can end before generation starts, or after a short essay.
        deadline = time.monotonic() + 60
        while _cpu_seconds(backend) - idle < 0.5:
            assert not request.done(), "the request ended before the backend got busy"
            assert time.monotonic() < deadline, "the backend never started generating"
            await asyncio.sleep(0.02)
        request.cancel()  # closes the connection mid-request
        with pytest.raises(asyncio.CancelledError):
            await request
    _assert_aborted(stack, "abort-me-2")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (fields 14 and 15 of its stat line)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
