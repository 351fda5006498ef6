"""Background responses (background: true) through the official SDK over a scripted text backend: queued at
once by the edge, run off the durable queue by the jobs process's workers (JobsRunner, here in the edge's
process over its state), polled, cancelled, resumed with starting_after, and picked up by new workers after a
restart. Every body and event validated against OpenAI's spec."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.support.openapi import validate, validate_event
from tests.support.scripted_text import scripted_edge
from tests.support.until import until

KEY = "sk-background-test"
TERMINAL = {"completed", "incomplete", "failed", "cancelled"}


@pytest.fixture(scope="module")
async def edge():
    async with scripted_edge(dev_api_key=KEY) as running:
        yield running


@pytest.fixture
def client(edge) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=edge.base_url, api_key=KEY, max_retries=0)


def raw(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


async def retrieve_valid(client: openai.AsyncOpenAI, response_id: str) -> dict:
    raw_response = await client.responses.with_raw_response.retrieve(response_id)
    body = raw_response.http_response.json()
    validate(body, "Response")
    return body


async def finished(client: openai.AsyncOpenAI, response_id: str, timeout: float = 30.0) -> dict:
    async def done():
        body = await retrieve_valid(client, response_id)
        return body if body["status"] in TERMINAL else None

    return await until(done, timeout)


async def test_background_create_returns_queued_then_polls_to_completed(client, edge):
    raw_response = await client.responses.with_raw_response.create(
        model="scripted", input="in the back", background=True
    )
    queued = raw_response.http_response.json()
    validate(queued, "Response")
    assert queued["status"] == "queued" and queued["background"] is True and queued["output"] == []
    done = await finished(client, queued["id"])
    assert done["status"] == "completed" and done["background"] is True
    assert done["output"][0]["content"][0]["text"] == "echo: in the back"
    assert done["usage"]["output_tokens"] == 4 and done["created_at"] == queued["created_at"]
    assert (await client.responses.retrieve(queued["id"])).output_text == "echo: in the back"


async def test_background_with_store_false_is_a_400_naming_store(edge):
    before = len(edge.engine.requests)
    async with raw(edge.base_url) as http:
        response = await http.post(
            "/responses", json={"model": "scripted", "input": "x", "background": True, "store": False}
        )
    assert response.status_code == 400 and response.json()["error"]["param"] == "store"
    assert len(edge.engine.requests) == before


async def test_bad_background_input_is_refused_before_queueing(edge):
    async with raw(edge.base_url) as http:
        response = await http.post(
            "/responses",
            json={
                "model": "plain",
                "input": "x",
                "background": True,
                "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
            },
        )
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


async def test_cancel_stops_the_engine_and_the_response_stays_cancelled(client, edge):
    cancelled_before = edge.engine.cancelled
    long_input = "SLOW " + "word " * 60  # ~60 tokens at 0.3 s each: running when cancelled
    created = await client.responses.create(model="scripted", input=long_input, background=True)

    async def running():
        return (await retrieve_valid(client, created.id))["status"] == "in_progress"

    await until(running, 30)
    raw_response = await client.responses.with_raw_response.cancel(created.id)
    body = raw_response.http_response.json()
    validate(body, "Response")
    assert body["status"] == "cancelled"
    await until(lambda: edge.engine.cancelled > cancelled_before, 30)  # the engine call was cancelled
    await asyncio.sleep(0.5)  # a late progress write of the worker must not resurrect it
    assert (await retrieve_valid(client, created.id))["status"] == "cancelled"
    again = await client.responses.cancel(created.id)  # cancelling again changes nothing
    assert again.status == "cancelled"


async def test_cancelling_a_foreground_response_is_a_400(client):
    created = await client.responses.create(model="scripted", input="not in the back")
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_nope")


async def test_a_foreground_response_cannot_be_streamed_again(client, edge):
    created = await client.responses.create(model="scripted", input="x")
    async with raw(edge.base_url) as http:
        response = await http.get(f"/responses/{created.id}", params={"stream": "true", "starting_after": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream"
    background = await client.responses.create(model="scripted", input="x", background=True)
    async with raw(edge.base_url) as http:
        response = await http.get(f"/responses/{background.id}", params={"stream": "true", "starting_after": "-1"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "starting_after"


async def _events(stream) -> list[dict]:
    events = [event.model_dump(mode="json", exclude_unset=True, by_alias=True) async for event in stream]
    for each in events:
        validate_event(each)
    return events


async def test_background_stream_then_resume_from_starting_after_misses_nothing(client):
    stream = await client.responses.create(
        model="scripted", input="SLOW one two three four five", background=True, stream=True
    )
    first: list[dict] = []
    async for event in stream:
        first.append(event.model_dump(mode="json", exclude_unset=True, by_alias=True))
        if event.type == "response.output_text.delta":
            break  # the connection is lost mid-response
    await stream.close()
    for each in first:
        validate_event(each)
    assert [e["type"] for e in first[:3]] == ["response.created", "response.queued", "response.in_progress"]
    response_id, last_seen = first[0]["response"]["id"], first[-1]["sequence_number"]

    rest = await _events(await client.responses.retrieve(response_id, stream=True, starting_after=last_seen))
    numbers = [e["sequence_number"] for e in first + rest]
    assert numbers == list(range(len(numbers)))  # nothing missed, nothing twice
    assert rest[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in first + rest if e["type"] == "response.output_text.delta")
    assert text == "echo: SLOW one two three four five" == rest[-1]["response"]["output"][0]["content"][0]["text"]

    # A finished response replays from any point, and from the start without starting_after.
    again = await _events(await client.responses.retrieve(response_id, stream=True))
    assert [e["sequence_number"] for e in again] == numbers


async def test_queued_work_is_picked_up_by_new_workers(tmp_path):
    """An edge whose jobs runner runs no background workers queues and stops; a new edge and jobs runner on the
    same files complete the work."""
    files = {"responses_store": "sqlite", "responses_sqlite_path": str(tmp_path / "responses.sqlite3")}
    async with scripted_edge(dev_api_key=KEY, responses_background_workers=0, **files) as first:
        client = openai.AsyncOpenAI(base_url=first.base_url, api_key=KEY, max_retries=0)
        queued = await client.responses.create(model="scripted", input="survive me", background=True)
        await asyncio.sleep(0.5)
        assert (await client.responses.retrieve(queued.id)).status == "queued"
        assert first.engine.requests == []
    async with scripted_edge(dev_api_key=KEY, **files) as second:
        client = openai.AsyncOpenAI(base_url=second.base_url, api_key=KEY, max_retries=0)
        done = await finished(client, queued.id)
        assert done["status"] == "completed", done["error"]
        assert done["output"][0]["content"][0]["text"] == "echo: survive me"


async def test_background_usage_is_metered_to_the_keys_project(tmp_path, monkeypatch):
    import json

    from modelplex_gatekeeper.keys import KeyRecord, KeysFile

    keys = KeysFile()
    keys.add("sk-ada-1", KeyRecord(name="ada-1", hash="", project="alpha"))
    keys.add("sk-bob-1", KeyRecord(name="bob-1", hash="", project="beta"))
    keys.save(tmp_path / "keys.yaml")
    usage_file = tmp_path / "usage.jsonl"
    monkeypatch.setenv("MODELPLEX_KEYS_FILE", str(tmp_path / "keys.yaml"))
    monkeypatch.setenv("MODELPLEX_GATEKEEPER_USAGE_FILE", str(usage_file))
    async with scripted_edge(gatekeeper_target="embedded") as gated:
        client = openai.AsyncOpenAI(base_url=gated.base_url, api_key="sk-ada-1", max_retries=0)
        raw_created = await client.responses.with_raw_response.create(
            model="scripted", input="meter me", background=True
        )
        created = raw_created.parse()
        await finished(client, created.id)

        def metered():
            if not usage_file.exists():
                return None
            rows = [json.loads(line) for line in usage_file.read_text().splitlines() if line.strip()]
            return [row for row in rows if row["endpoint"] == "responses"]

        rows = await until(metered, 30)
        other = openai.AsyncOpenAI(base_url=gated.base_url, api_key="sk-bob-1", max_retries=0)
        for attempt in (
            other.responses.retrieve(created.id),
            other.responses.cancel(created.id),
            other.responses.retrieve(created.id, stream=True, starting_after=0),
        ):
            with pytest.raises(openai.NotFoundError):
                await attempt
    assert rows[0]["key"] == "ada-1" and rows[0]["project"] == "alpha"
    assert rows[0]["completion_tokens"] == 3 and rows[0]["prompt_tokens"] > 0 and not rows[0]["failed"]
    # Matched to its create call (its x-request-id) and to the response it produced.
    assert rows[0]["request_id"] == raw_created.headers["x-request-id"] != ""
    assert rows[0]["response_id"] == created.id


async def test_a_full_queue_is_a_429_with_retry_after():
    async with (
        scripted_edge(dev_api_key=KEY, responses_background_workers=0, responses_background_max_queue=1) as idle,
        raw(idle.base_url) as http,
    ):
        first = await http.post("/responses", json={"model": "scripted", "input": "a", "background": True})
        assert first.status_code == 200 and first.json()["status"] == "queued"
        second = await http.post("/responses", json={"model": "scripted", "input": "b", "background": True})
        assert second.status_code == 429 and second.headers["retry-after"]
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        assert (await http.get(f"/responses/{first.json()['id']}")).json()["status"] == "queued"


async def test_jobs_stopping_mid_response_hand_it_over_unaccounted(tmp_path, monkeypatch):
    """A graceful stop of the jobs runner puts the running response back in the queue without accounting it;
    the runner that re-runs it accounts it once, so the key is metered once."""
    import json

    from modelplex_gatekeeper.keys import KeyRecord, KeysFile

    keys = KeysFile()
    keys.add("sk-ada-1", KeyRecord(name="ada-1", hash="", project="alpha"))
    keys.save(tmp_path / "keys.yaml")
    usage_file = tmp_path / "usage.jsonl"
    monkeypatch.setenv("MODELPLEX_KEYS_FILE", str(tmp_path / "keys.yaml"))
    monkeypatch.setenv("MODELPLEX_GATEKEEPER_USAGE_FILE", str(usage_file))
    files = {"responses_store": "sqlite", "responses_sqlite_path": str(tmp_path / "responses.sqlite3")}
    async with scripted_edge(gatekeeper_target="embedded", **files) as first:
        client = openai.AsyncOpenAI(base_url=first.base_url, api_key="sk-ada-1", max_retries=0)
        created = await client.responses.create(model="scripted", input="SLOW hand me over", background=True)

        async def running():
            return (await retrieve_valid(client, created.id))["status"] == "in_progress"

        await until(running, 30)
    async with scripted_edge(gatekeeper_target="embedded", **files) as second:
        client = openai.AsyncOpenAI(base_url=second.base_url, api_key="sk-ada-1", max_retries=0)
        done = await finished(client, created.id)
        assert done["status"] == "completed", done["error"]
        assert done["output"][0]["content"][0]["text"] == "echo: SLOW hand me over"

    def rows():
        lines = usage_file.read_text().splitlines() if usage_file.exists() else []
        return [row for row in map(json.loads, filter(str.strip, lines)) if row["endpoint"] == "responses"]

    assert [(row["completion_tokens"], row["failed"]) for row in rows()] == [(5, 0)]
