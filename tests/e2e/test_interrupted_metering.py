"""Streams that end early are metered: the client leaving, the edge draining, the backend dying.

Each case streams from the real llama.cpp engine (SmolLM2) behind the gatekeeper sidecar, cuts the
stream after 150 chunks, then checks the usage record (real prompt and completion tokens, and why the
request ended) and that the key's TPM remaining, as the next response reports it, was charged them.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from modelplex_gatekeeper.keys import new_key
from tests.e2e.gatekeeper_stack import start_stack, write_keys
from tests.support import stacks
from tests.support.ports import free_port
from tests.support.until import wait_until

pytestmark = pytest.mark.e2e

READ_CHUNKS = 150
# The prompt's tokens make each request's usage large beside what the TPM refills (TPM/60 a second)
# while the test runs, so the charge shows in the next response's x-ratelimit-remaining-tokens.
# A legacy completion continuing a repetitive text: it runs to max_tokens (a chat answer may end first).
PROMPT = "The quick brown fox jumps over the lazy dog. " * 50
TPM = 2400
KEYS = {
    name: {"key": new_key(), "rpm": 1000, "tpm": TPM} for name in ("disconnect", "killed", "drain", "responses")
}
# The edge closes streams still open this long after SIGTERM minus 2 s (its drain margin).
GRACE_SECONDS = 5


def _catalog(tmp: Path) -> Path:
    llamacpp = {"kind": "llamacpp", "settings": {"context_length": 2048}}
    models = [
        {"id": "smollm2", "modality": "text", "backend": f"127.0.0.1:{free_port()}", "engine": llamacpp,
         "capabilities": ["completions", "chat"], "context_length": 2048},
        # Its own backend process, killed mid-stream by one test.
        {"id": "doomed", "modality": "text", "backend": f"127.0.0.1:{free_port()}", "engine": llamacpp,
         "capabilities": ["completions"], "context_length": 2048},
    ]
    path = stacks.write_catalog(tmp, models)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupted")
    keys_file = tmp / "keys.yaml"
    write_keys(keys_file, KEYS)
    env = {"MODELPLEX_GRACE_SECONDS": str(GRACE_SECONDS)}
    running = start_stack(_catalog(tmp), keys_file, tmp / "logs", env)
    running.usage_file = tmp / "usage.jsonl"  # type: ignore[attr-defined]
    yield running
    running.stop()


class Cut:
    """One streamed completion, read up to READ_CHUNKS text chunks."""

    def __init__(self, stack, key: str, model: str, request_id: str, max_tokens: int) -> None:
        self.stack, self.key, self.request_id = stack, key, request_id
        self.body = {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,  # greedy on a repetitive text: it keeps repeating, to max_tokens
            "stream": True,
        }
        self.started = time.monotonic()
        self.chunks = 0
        self.events: list[dict] = []

    def stream(self, http: httpx.Client, after_enough=None) -> None:
        """Reads the stream; once READ_CHUNKS content chunks came, calls ``after_enough`` (or hangs up)."""
        headers = {"Authorization": f"Bearer {KEYS[self.key]['key']}", "x-request-id": self.request_id}
        with http.stream("POST", f"{self.stack.base_url}/completions", json=self.body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                self.events.append(event)
                if any(choice.get("text") for choice in event.get("choices", [])):
                    self.chunks += 1
                if self.chunks == READ_CHUNKS:
                    if after_enough is None:
                        return  # hang up mid-stream
                    after_enough()
        assert self.chunks >= READ_CHUNKS, "the model finished before the stream could be cut"

    def record(self) -> dict:
        def mine() -> dict | None:
            path = self.stack.usage_file
            lines = path.read_text().splitlines() if path.exists() else []
            found = [json.loads(line) for line in lines if self.request_id in line]
            return found[-1] if found else None

        return wait_until(mine, 30)

    def assert_tpm_charged(self, record: dict) -> None:
        """The next response's x-ratelimit-remaining-tokens: the TPM less this request's usage, plus at
        most what refilled since the request was admitted."""
        listing = httpx.get(
            f"{self.stack.base_url}/models", headers={"Authorization": f"Bearer {KEYS[self.key]['key']}"}
        )
        refilled = (time.monotonic() - self.started) * TPM / 60
        remaining = int(listing.headers["x-ratelimit-remaining-tokens"])
        used = record["total_tokens"]
        assert used == record["prompt_tokens"] + record["completion_tokens"]
        assert TPM - used - 1 <= remaining <= TPM - used + refilled + 1, (remaining, used, refilled)


def assert_real_counts(record: dict, cut: Cut, ended: str) -> None:
    assert record["prompt_tokens"] > 400, record  # the long prompt, as the engine counted it
    assert record["completion_tokens"] >= cut.chunks >= READ_CHUNKS, record  # every chunk read, at least
    assert record["ended"] == ended, record


def test_a_client_that_hangs_up_is_accounted_what_was_generated(stack):
    cut = Cut(stack, "disconnect", "smollm2", "cut-by-client", max_tokens=400)
    with httpx.Client(timeout=120) as http:
        cut.stream(http)
    record = cut.record()
    assert_real_counts(record, cut, "client_disconnect")
    assert record["failed"] == 0
    cut.assert_tpm_charged(record)


def test_a_backend_killed_mid_stream_is_accounted_what_reached_the_edge(stack):
    cut = Cut(stack, "killed", "doomed", "cut-by-crash", max_tokens=400)
    doomed = next(process for process in stack.processes if _serves(stack, process, "doomed"))
    with httpx.Client(timeout=120) as http:
        cut.stream(http, after_enough=lambda: doomed.popen.send_signal(signal.SIGKILL))
    assert cut.events[-1].get("error"), "the stream should end with an error event"
    record = cut.record()
    assert_real_counts(record, cut, "upstream_failure")
    assert record["failed"] == 1
    cut.assert_tpm_charged(record)


def test_a_stream_closed_by_the_edge_draining_is_accounted_what_was_generated(stack):
    cut = Cut(stack, "drain", "smollm2", "cut-by-drain", max_tokens=1000)
    edge = stack.process("edge")
    with httpx.Client(timeout=120) as http:
        cut.stream(http, after_enough=lambda: edge.popen.send_signal(signal.SIGTERM))
    assert "restarting" in json.dumps(cut.events[-1]), "the drain closes the stream with an error event"
    record = cut.record()
    assert_real_counts(record, cut, "drain")
    assert record["failed"] == 0  # the edge's doing, not a failure of the request
    # The edge is gone; a new one (same gatekeeper sidecar, whose limits live on) answers the next request.
    edge.popen.wait(30)
    wait_until(lambda: any("edge restarted" in event for event in stack.supervise()), 30)
    wait_until(lambda: _ready(stack), 60)
    cut.assert_tpm_charged(record)


def _serves(stack, process, model: str) -> bool:
    catalog = yaml.safe_load(stack.catalog.read_text())
    backend = next(m["backend"] for m in catalog["models"] if m["id"] == model)
    return process.name == f"text@{backend}"


def _ready(stack) -> bool:
    try:
        with urllib.request.urlopen(stack.base_url.removesuffix("/v1") + "/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_responses_stream_the_client_leaves_is_accounted_what_was_generated(stack):
    """The Responses API's stream goes through the same pipeline: a hang-up is metered what was generated."""
    started = time.monotonic()
    body = {
        "model": "smollm2",
        "instructions": "Repeat the user's text again and again.",
        "input": PROMPT,
        "max_output_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEYS['responses']['key']}", "x-request-id": "responses-cut"}
    deltas = 0
    with httpx.Client(timeout=120) as http, http.stream(
        "POST", f"{stack.base_url}/responses", json=body, headers=headers
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["type"] == "response.output_text.delta":
                deltas += 1
                if deltas == READ_CHUNKS:
                    break  # hang up mid-stream
    assert deltas == READ_CHUNKS, "the model finished before the stream could be cut"
    cut = Cut(stack, "responses", "smollm2", "responses-cut", max_tokens=400)
    cut.started, cut.chunks = started, deltas
    record = cut.record()
    assert_real_counts(record, cut, "client_disconnect")
    assert record["endpoint"] == "responses", record
    cut.assert_tpm_charged(record)
