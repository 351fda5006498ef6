"""Faults: a crashed backend comes back under the launcher's supervisor, and a SIGTERM'd edge
ends every open stream well-formed within its grace period."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from modelplex_kit.devstack import free_port
from tests.support import stacks
from tests.support.until import wait_until

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-faults"
GRACE = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    backend = f"127.0.0.1:{free_port()}"
    entry = {
        "id": "smollm2",
        "modality": "text",
        "backend": backend,
        "engine": {"kind": "llamacpp", "settings": {"context_length": 2048}},
        "capabilities": ["chat", "json_schema"],
    }
    catalog = stacks.write_catalog(tmp, [entry])
    # One sequence at a time and one waiting: a third request finds the queue full.
    env = {
        "MODELPLEX_DEV_API_KEY": KEY,
        "MODELPLEX_GRACE_SECONDS": str(GRACE),
        "MODELPLEX_TEXT_PARALLEL": "1",
        "MODELPLEX_TEXT_MAX_QUEUE": "1",
    }
    running = stacks.start_stack(catalog, tmp, env=env)
    running.start_supervising(interval=0.2)
    running.backend = f"text@{backend}"  # type: ignore[attr-defined]
    yield running
    running.stop()


def _client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=60)


def test_a_killed_backend_is_restarted_and_serves_again(stack):
    client = _client(stack)
    backend = stack.process(stack.backend)
    old_pid = backend.popen.pid
    backend.popen.send_signal(signal.SIGKILL)

    def answered():
        try:
            return client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
            )
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and exc.response.headers["retry-after"]  # meanwhile: retryable
            return None

    answer = wait_until(answered, timeout=90, interval=0.5)
    assert answer.choices[0].message.content is not None
    assert stack.process(stack.backend).popen.pid != old_pid and stack.process(stack.backend).restarts >= 1


def _long_stream_body() -> dict:
    """A streamed request no output shorter than some thousands of tokens satisfies: it holds its slot."""
    person = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "city": {"type": "string"}, "street": {"type": "string"}},
        "required": ["name", "city", "street"],
    }
    long_list = {
        "type": "object",
        "properties": {"people": {"type": "array", "items": person, "minItems": 200}},
        "required": ["people"],
    }
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "List people."}],
        "max_tokens": 1500,
        "response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": long_list}},
        "stream": True,
    }


async def test_a_full_queue_is_a_503_with_retry_after_through_http(stack):
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=60) as http:
        async with http.stream("POST", "/chat/completions", json=_long_stream_body()) as running:
            assert running.status_code == 200  # its first chunk came: it holds the only slot
            waiting = asyncio.ensure_future(http.post("/chat/completions", json=_long_stream_body()))
            await asyncio.sleep(1.0)  # queued behind it
            refused = await http.post(
                "/chat/completions", json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
            )
            waiting.cancel()
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "retry" in refused.json()["error"]["message"].lower()


def test_sigterm_on_the_edge_closes_open_streams_with_an_error_event_and_done(stack):
    body = _long_stream_body()
    edge = stack.process("edge")
    lines = []
    with httpx.stream(
        "POST", f"{stack.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 2:
                edge.popen.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
        closed = time.monotonic()
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "restarting" in lines[-2]  # the stream would have run far longer
    assert closed - signalled <= GRACE + 1
    # uvicorn re-raises the signal once it has shut down gracefully, so its parent sees "killed by SIGTERM".
    assert edge.popen.wait(timeout=GRACE + 10) in (0, -signal.SIGTERM)
    assert "Traceback" not in (stack.log_dir / "edge.log").read_text()
