"""Hostile or sloppy HTTP clients get a clear answer, and nothing internal leaks."""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest

from tests.e2e.conftest import BODY_DEADLINE_SECONDS, SLOW_CLIENT_SECONDS

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Hello"}]


def _raw(stack, data: bytes, pause: float = 0.0) -> bytes:
    """Sends bytes over a raw connection (optionally pausing after them) and returns the reply."""
    with socket.create_connection(("127.0.0.1", stack.edge_port), timeout=SLOW_CLIENT_SECONDS + 10) as sock:
        sock.sendall(data)
        time.sleep(pause)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_duplicate_authorization_headers_are_a_401_with_a_request_id(stack, client):
    request = (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: Bearer {client.api_key}\r\n".encode()
        + b"Authorization: Bearer sk-someone-else\r\n\r\n"
    )
    reply = _raw(stack, request)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401") and b"x-request-id" in head.lower()
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert b"sk-someone-else" not in reply


def test_a_backend_that_is_down_leaks_no_grpc_text(client, stack):
    response = httpx.post(
        f"{stack.base_url}/chat/completions",
        json={"model": "offline", "messages": HELLO, "max_tokens": 2},
        headers={"Authorization": f"Bearer {client.api_key}"},
    )
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    message = response.json()["error"]["message"]
    for internal in ("127.0.0.1", "ipv4", "Failed to connect", "addresses", stack.targets["offline"]):
        assert internal not in message


def test_headers_sent_too_slowly_get_408_and_the_connection_closes(stack):
    started = time.monotonic()
    reply = _raw(stack, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    assert reply.startswith(b"HTTP/1.1 408")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < SLOW_CLIENT_SECONDS + 5


def test_a_body_sent_too_slowly_gets_408_not_a_500(stack, client):
    def metric_500() -> float:
        text = httpx.get(f"http://127.0.0.1:{stack.edge_port}/metrics").text
        prefix = 'modelplex_http_requests_total{route="/v1/chat/completions",status="500"}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    before = metric_500()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {client.api_key}\r\n".encode()
        + b"Content-Length: 1000\r\n\r\n{\"model\": "
    )
    reply = _raw(stack, head)  # 1000 bytes promised, 10 sent
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"connection: close" in reply.lower()
    assert metric_500() == before


def test_a_body_trickled_a_byte_at_a_time_is_cut_at_the_body_deadline(stack, client):
    # Each byte comes well within the gap timeout; only the whole body's deadline can cut this client.
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {client.api_key}\r\n".encode()
        + b"Content-Length: 1000\r\n\r\n"
    )
    gap = SLOW_CLIENT_SECONDS / 4
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", stack.edge_port), timeout=BODY_DEADLINE_SECONDS + 30) as sock:
        sock.sendall(head)
        # One byte per gap until the edge answers (1000 bytes would take far longer than the deadline).
        while time.monotonic() - started < BODY_DEADLINE_SECONDS + 20:
            if select.select([sock], [], [], gap)[0]:
                break
            sock.sendall(b" ")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks)
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert BODY_DEADLINE_SECONDS - 1 <= elapsed < BODY_DEADLINE_SECONDS + 20
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "request_timeout" and "whole request body" in body["error"]["message"]


def test_a_client_leaving_mid_upload_is_not_a_server_error(stack, client):
    def count(status: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{stack.edge_port}/metrics").text
        prefix = f'modelplex_http_requests_total{{route="/v1/chat/completions",status="{status}"}}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    before_500, before_499 = count("500"), count("499")
    with socket.create_connection(("127.0.0.1", stack.edge_port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {client.api_key}\r\n".encode()
            + b"Content-Length: 1000\r\n\r\n{\"model\": "
        )
    deadline = time.monotonic() + 10
    while count("499") == before_499 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count("499") == before_499 + 1 and count("500") == before_500
    edge_log = (stack.logs / "edge.log").read_text()
    assert "ClientDisconnect" not in edge_log and "Traceback" not in edge_log


def test_too_many_stop_strings_names_the_rule(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, stop=["a", "b", "c", "d", "e"], max_tokens=2)
    assert err.value.param == "stop" and "at most 4" in err.value.message


def test_too_deeply_nested_json_names_the_limit(stack, client):
    body = '{"model": "smollm2", "messages": ' + "[" * 300 + "]" * 300 + "}"
    response = httpx.post(
        f"{stack.base_url}/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {client.api_key}", "content-type": "application/json"},
    )
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"]


def test_streaming_responses_carry_the_request_id(stack, client):
    with httpx.stream(
        "POST",
        f"{stack.base_url}/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True},
        headers={"Authorization": f"Bearer {client.api_key}", "x-request-id": "stream-id-1"},
        timeout=60,
    ) as response:
        assert response.headers["x-request-id"] == "stream-id-1"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
