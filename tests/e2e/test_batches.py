"""The Files and Batches APIs through the official openai SDK, against the real local text engine.

The edge and the jobs process (which runs the batches) share an embedded gatekeeper's keys and usage file (two
projects), the SQLite batch queue and the local object store, supervised: the durability test SIGKILLs the
jobs process mid-batch and the restarted one resumes the batch.
"""

from __future__ import annotations

import io
import json
import signal
import time
from typing import Any

import httpx
import openai
import pytest

from modelplex_kit.devstack import Stack
from tests.e2e.gatekeeper_stack import write_keys
from tests.support import stacks
from tests.support.openapi import validate
from tests.support.ports import free_port
from tests.support.s3_server import S3Server

pytestmark = pytest.mark.e2e

ALPHA, BETA = "sk-batches-alpha-0123456789", "sk-batches-beta-0123456789"
GAMMA = "sk-batches-gamma-0123456789"  # may use no model of the stack
MODEL = "smollm2-135m-instruct"
# Small, so the enqueued-token test can reach it with two files; every other test stays well below.
MAX_ENQUEUED_TOKENS = 6000


def start_stack(tmp, **settings: str) -> Stack:
    model = {
        "id": MODEL,
        "aliases": ["smollm2"],
        "modality": "text",
        "backend": f"127.0.0.1:{free_port()}",
        # One sequence at a time: a line decoded beside another gets slightly different logits (batched
        # arithmetic), and the test compares greedy answers with the synchronous endpoint's token for token.
        "engine": {"kind": "llamacpp", "settings": {"context_length": 2048, "parallel": 1}},
        "capabilities": ["chat", "completions"],
        "context_length": 2048,
        "created": 1730419200,
    }
    catalog = stacks.write_catalog(tmp, [model])
    keys = tmp / "keys.yaml"
    write_keys(
        keys,
        {
            "alpha": {"key": ALPHA, "project": "alpha"},
            "beta": {"key": BETA, "project": "beta"},
            "gamma": {"key": GAMMA, "project": "gamma", "models": ("other-*",)},
        },
    )
    env = {
        "MODELPLEX_LOG_LEVEL": "info",
        "MODELPLEX_EDGE_OBJECT_DIR": str(tmp / "objects"),
        "MODELPLEX_EDGE_BATCHES_STORE": "sqlite",
        "MODELPLEX_EDGE_BATCHES_SQLITE_PATH": str(tmp / "batches.sqlite3"),
        "MODELPLEX_EDGE_BATCHES_CHUNK_LINES": "2",
        "MODELPLEX_EDGE_BATCHES_LINE_CONCURRENCY": "2",
        "MODELPLEX_EDGE_BATCHES_RENEW_SECONDS": "0.2",
        "MODELPLEX_EDGE_BATCHES_LEASE_SECONDS": "3",
        "MODELPLEX_EDGE_BATCHES_POLL_SECONDS": "0.2",
        "MODELPLEX_EDGE_BATCHES_MAX_ENQUEUED_TOKENS": str(MAX_ENQUEUED_TOKENS),
        "MODELPLEX_TEXT_MAX_QUEUE": "64",
    }
    running = stacks.start_stack(catalog, tmp, keys_file=keys, gatekeeper="embedded", env={**env, **settings})
    running.usage = tmp / "usage.jsonl"  # type: ignore[attr-defined]
    return running


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    running = start_stack(tmp_path_factory.mktemp("batches"))
    running.start_supervising(interval=0.2)  # as `make run` does: a killed process comes back
    yield running
    running.stop()


def _client(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=3, timeout=120)


@pytest.fixture(scope="module")
def alpha(stack) -> openai.OpenAI:
    return _client(stack, ALPHA)


@pytest.fixture(scope="module")
def beta(stack) -> openai.OpenAI:
    return _client(stack, BETA)


def chat_line(custom_id: str, prompt: str, max_tokens: int = 8) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(client: openai.OpenAI, rows: list[Any], name: str = "input.jsonl") -> str:
    data = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows).encode()
    created = client.files.create(file=(name, io.BytesIO(data)), purpose="batch")
    validate(created.model_dump(exclude_unset=True), "OpenAIFile")
    return created.id


def poll(client: openai.OpenAI, batch_id: str, done, timeout: float = 600.0):
    """Retrieves the batch until ``done(batch)`` (validating every body on the way), or fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
        except (openai.APIConnectionError, openai.InternalServerError):  # the edge is restarting
            batch = None
        if batch is not None:
            validate(batch.model_dump(exclude_unset=True), "Batch")
            if done(batch):
                return batch
        assert time.monotonic() < deadline, f"batch {batch_id} not done within {timeout} s: {batch}"
        time.sleep(0.2)


def finished(batch) -> bool:
    return batch.status in ("completed", "failed", "expired", "cancelled")


def results(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]


def test_files_upload_list_content_delete_and_projects(alpha, beta):
    rows = [chat_line("a", "Hi")]
    file_id = upload(alpha, rows)
    got = alpha.files.retrieve(file_id)
    validate(got.model_dump(exclude_unset=True), "OpenAIFile")
    assert got.purpose == "batch" and got.filename == "input.jsonl"
    assert got.expires_at and got.expires_at - got.created_at == 30 * 24 * 3600  # batch files: 30 days
    assert json.loads(alpha.files.content(file_id).text) == rows[0]
    assert file_id in [f.id for f in alpha.files.list()]
    validate(alpha.files.list().model_dump(exclude_unset=True), "ListFilesResponse")
    # Another project sees nothing of it.
    assert file_id not in [f.id for f in beta.files.list()]
    for attempt in (
        lambda: beta.files.retrieve(file_id),
        lambda: beta.files.content(file_id),
        lambda: beta.files.delete(file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    deleted = alpha.files.delete(file_id)
    validate(deleted.model_dump(exclude_unset=True), "DeleteFileResponse")
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        alpha.files.retrieve(file_id)


def test_files_purpose_and_expires_after(alpha):
    with pytest.raises(openai.BadRequestError) as refused:
        alpha.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert refused.value.body["param"] == "purpose"
    hour = alpha.files.create(
        file=("x.jsonl", io.BytesIO(b"{}\n")),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert hour.expires_at - hour.created_at == 3600
    with pytest.raises(openai.BadRequestError) as refused:
        alpha.files.create(
            file=("x.jsonl", io.BytesIO(b"{}\n")),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 60},
        )
    assert refused.value.body["param"] == "expires_after.seconds"


def test_batch_completes_with_the_synchronous_answers(stack, alpha, beta):
    prompts = {"capital": "What is the capital of France?", "count": "Count to three.", "hi": "Say hello."}
    rows = [chat_line(custom_id, prompt) for custom_id, prompt in prompts.items()]
    created = alpha.batches.create(
        input_file_id=upload(alpha, rows),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"purpose": "e2e"},
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    validate(created.model_dump(exclude_unset=True), "Batch")
    assert created.status == "validating" and created.metadata == {"purpose": "e2e"}
    with pytest.raises(openai.NotFoundError):
        beta.batches.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.cancel(created.id)
    assert created.id not in [b.id for b in beta.batches.list()]
    batch = poll(alpha, created.id, finished)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 3 and batch.request_counts.completed == 3
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.error_file_id is None
    lines = results(alpha, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == sorted(prompts)
    for line in lines:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        validate(line["response"]["body"], "CreateChatCompletionResponse")
        sync = alpha.chat.completions.create(**rows[list(prompts).index(line["custom_id"])]["body"])
        answer = line["response"]["body"]["choices"][0]
        assert answer["message"]["content"] == sync.choices[0].message.content
        assert answer["finish_reason"] == sync.choices[0].finish_reason
        assert line["response"]["body"]["usage"]["prompt_tokens"] == sync.usage.prompt_tokens
    # The Batch's usage sums its lines' (OpenAI's shape), and it names the model its lines used.
    validate(batch.model_dump(exclude_unset=True), "Batch")
    usages = [line["response"]["body"]["usage"] for line in lines]
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usages) > 0
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usages) > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    assert batch.model == MODEL
    # output_expires_after: the output file expires that long after its creation.
    output = alpha.files.retrieve(batch.output_file_id)
    assert output.expires_at == output.created_at + 7200
    listed = alpha.batches.list(limit=100)
    validate(listed.model_dump(exclude_unset=True), "ListBatchesResponse")
    assert created.id in [b.id for b in listed.data]
    # Every line was metered to the batch's key, outside its interactive limits (the gatekeeper's usage log).
    metered = [json.loads(r) for r in stack.usage.read_text().splitlines()]
    lines_metered = [r for r in metered if r["endpoint"] == "batch:chat.completions" and r["key"] == "alpha"]
    assert len(lines_metered) >= 3 and all(r["completion_tokens"] > 0 for r in lines_metered)


def test_invalid_lines_fail_validation_naming_them(alpha):
    rows = [
        chat_line("ok", "Hi"),
        "{not json",
        chat_line("ok", "duplicate id"),
        {**chat_line("wrong-url", "Hi"), "url": "/v1/embeddings"},
        {**chat_line("get", "Hi"), "method": "GET"},
        {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL}},
        {**chat_line("unknown-model", "Hi"), "body": {**chat_line("x", "Hi")["body"], "model": "no-such-model"}},
        chat_line("too-long", "Hi", max_tokens=100_000),
    ]
    created = alpha.batches.create(
        input_file_id=upload(alpha, rows), endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = poll(alpha, created.id, finished)
    assert batch.status == "failed" and batch.failed_at
    errors = {error.line: error for error in batch.errors.data}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8]
    assert errors[3].code == "duplicate_custom_id"
    assert errors[4].param == "url" and errors[5].param == "method"
    assert errors[6].param == "body.messages"
    assert errors[7].code == "model_not_found"
    assert errors[8].param == "body.max_tokens"


def test_endpoint_and_input_file_are_checked_at_creation(alpha, beta):
    file_id = upload(alpha, [chat_line("a", "Hi")])
    with pytest.raises(openai.BadRequestError) as refused:
        beta.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as refused:
        alpha.batches.create(input_file_id=file_id, endpoint="/v1/moderations", completion_window="24h")
    assert refused.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as refused:
        alpha.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 60},  # under OpenAI's one hour
        )
    assert refused.value.body["param"] == "output_expires_after.seconds"


def test_cancel_mid_run_finalizes_partial_output(alpha):
    rows = [chat_line(f"line-{i}", f"Tell me about the number {i}.", max_tokens=24) for i in range(24)]
    created = alpha.batches.create(
        input_file_id=upload(alpha, rows), endpoint="/v1/chat/completions", completion_window="24h"
    )
    poll(alpha, created.id, lambda b: b.request_counts.completed >= 2)
    cancelling = alpha.batches.cancel(created.id)
    validate(cancelling.model_dump(exclude_unset=True), "Batch")
    assert cancelling.status == "cancelling"
    asked = time.monotonic()
    batch = poll(alpha, created.id, finished, timeout=120)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at
    assert time.monotonic() - asked < 60  # new lines stop at once; at most the lines in flight finish
    lines = results(alpha, batch.output_file_id)
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)) == batch.request_counts.completed
    assert 2 <= len(ids) < len(rows)


def test_enqueued_batch_tokens_limit_answers_429(alpha):
    # ~4.5 KB of lines (about 1100 estimated tokens): as many copies as the limit holds, then one more.
    filler = "x" * 800
    rows = [chat_line(f"n{i}", f"Reply with one word. {filler}", max_tokens=16) for i in range(5)]
    file_id = upload(alpha, rows)
    size = alpha.files.retrieve(file_id).bytes
    copies = MAX_ENQUEUED_TOKENS // (size // 4 + 1)
    running = [
        alpha.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        for _ in range(copies)
    ]
    try:
        with pytest.raises(openai.RateLimitError) as limited:  # not retried: the SDK would wait it out
            alpha.with_options(max_retries=0).batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert limited.value.response.headers.get("retry-after")
    finally:
        for batch in running:
            alpha.batches.cancel(batch.id)
    for batch in running:
        poll(alpha, batch.id, finished)


def test_killed_worker_resumes_with_each_custom_id_once(stack, alpha):
    rows = [chat_line(f"k{i}", f"Name a color, number {i}.", max_tokens=16) for i in range(12)]
    created = alpha.batches.create(
        input_file_id=upload(alpha, rows), endpoint="/v1/chat/completions", completion_window="24h"
    )
    poll(alpha, created.id, lambda b: b.request_counts.completed >= 2)
    jobs = stack.process("jobs")
    restarts = jobs.restarts
    jobs.popen.send_signal(signal.SIGKILL)  # no goodbye: the restarted jobs process re-queues what it ran
    jobs.popen.wait()
    batch = poll(alpha, created.id, finished, timeout=900)
    assert jobs.restarts > restarts
    assert batch.status == "completed", batch
    lines = results(alpha, batch.output_file_id) + results(alpha, batch.error_file_id)
    ids = [line["custom_id"] for line in lines]
    assert sorted(ids) == sorted(row["custom_id"] for row in rows)  # each exactly once
    assert batch.request_counts.completed + batch.request_counts.failed == 12
    # The resumed worker's usage counts the lines the killed one wrote too, each once.
    answered = [line["response"]["body"]["usage"] for line in lines if line["response"]["status_code"] == 200]
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in answered) > 0


def test_bad_upload_forms_are_400_and_401(stack):
    url = stack.base_url + "/files"
    headers = {"authorization": f"Bearer {ALPHA}"}
    missing = httpx.post(url, headers=headers, data={"purpose": "batch"}, files={"other": ("x", b"{}")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    unauthenticated = httpx.post(url, data={"purpose": "batch"}, files={"file": ("x", b"{}")})
    assert unauthenticated.status_code == 401


def test_files_paths_are_no_longer_unsupported(stack):
    got = httpx.get(stack.base_url + "/files", headers={"authorization": f"Bearer {ALPHA}"})
    assert got.status_code == 200 and got.json()["object"] == "list"


def test_responses_batch_matches_the_synchronous_endpoint(alpha):
    body = {"model": MODEL, "input": "Name one planet.", "max_output_tokens": 16, "temperature": 0}
    rows = [
        {"custom_id": "planet", "method": "POST", "url": "/v1/responses", "body": body},
        {
            "custom_id": "chained",
            "method": "POST",
            "url": "/v1/responses",
            "body": {**body, "previous_response_id": "resp_x"},
        },
    ]
    created = alpha.batches.create(input_file_id=upload(alpha, rows), endpoint="/v1/responses", completion_window="24h")
    failed = poll(alpha, created.id, finished)
    assert failed.status == "failed" and [(e.line, e.param) for e in failed.errors.data] == [
        (2, "body.previous_response_id")
    ]
    created = alpha.batches.create(
        input_file_id=upload(alpha, rows[:1]), endpoint="/v1/responses", completion_window="24h"
    )
    batch = poll(alpha, created.id, finished)
    assert batch.status == "completed", batch
    (line,) = results(alpha, batch.output_file_id)
    validate(line["response"]["body"], "Response")
    sync = alpha.responses.create(**body)
    assert line["response"]["body"]["output"][0]["content"][0]["text"] == sync.output_text
    # Stored, as a synchronous response with store (the default) is: retrievable by the project.
    stored = alpha.responses.retrieve(line["response"]["body"]["id"])
    assert stored.output_text == sync.output_text and stored.status == line["response"]["body"]["status"]


def test_lines_naming_a_model_the_key_may_not_use_fail_validation(stack):
    gamma = _client(stack, GAMMA)
    with pytest.raises(openai.NotFoundError):  # as the key itself is answered
        gamma.chat.completions.create(**chat_line("x", "Hi")["body"])
    created = gamma.batches.create(
        input_file_id=upload(gamma, [chat_line("x", "Hi")]), endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = poll(gamma, created.id, finished)
    assert batch.status == "failed"
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [(1, "model_not_found", "body.model")]


def test_the_completion_window_expires_what_is_left(stack, tmp_path):
    """A window of a few seconds (24 h in production): the lines done are kept, the rest expire."""
    stack.stop()  # one engine at a time on this machine: the module's stack is not needed past this test
    short = start_stack(tmp_path, MODELPLEX_EDGE_BATCHES_WINDOW_SECONDS="6")
    try:
        client = _client(short, ALPHA)
        rows = [chat_line(f"w{i}", f"Write a poem about the number {i}.", max_tokens=48) for i in range(40)]
        created = client.batches.create(
            input_file_id=upload(client, rows), endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = poll(client, created.id, finished, timeout=300)
        assert batch.status == "expired" and batch.expired_at and batch.expired_at >= batch.expires_at
        ids = [line["custom_id"] for line in results(client, batch.output_file_id)]
        assert len(ids) == len(set(ids)) == batch.request_counts.completed < len(rows)
    finally:
        short.stop()


def test_a_batch_runs_with_its_files_in_s3(tmp_path):
    """The same lifecycle with every object (input, parts, results) in a bucket of a real S3-protocol server."""
    server = S3Server().start()
    bucket = server.new_bucket()
    s3 = start_stack(tmp_path, **server.env("MODELPLEX_EDGE_", bucket))
    try:
        client = _client(s3, ALPHA)
        rows = [chat_line(f"s{i}", f"Name a color, {i}.") for i in range(3)]
        created = client.batches.create(
            input_file_id=upload(client, rows), endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = poll(client, created.id, finished)
        assert batch.status == "completed", batch.errors
        lines = results(client, batch.output_file_id)
        assert sorted(line["custom_id"] for line in lines) == ["s0", "s1", "s2"]
        assert all(line["response"]["status_code"] == 200 for line in lines)
        stored = server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
        assert any(obj["Key"].startswith("files/") for obj in stored), stored
        assert not list((tmp_path / "objects").glob("**/*"))  # nothing went to the local directory
    finally:
        s3.stop()
        server.stop()
