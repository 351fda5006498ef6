"""The catalog on Model custom resources, end to end: a real catalog process (source=kubernetes)
watches a stand-in API server replaying watch events, and the edge's /v1/models follows
additions, changes and deletions within seconds, without restarts.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from modelplex_kit.devstack import Stack
from tests.support.kube_replay import HOLD, LIVE, Replay, event, model, serve
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-kube"


async def _listed(client: httpx.AsyncClient, wanted: set[str], seconds: float = 10.0) -> dict[str, dict]:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        reply = await client.get("/models")
        data = {m["id"]: m for m in reply.json()["data"]} if reply.status_code == 200 else {}
        if set(data) == wanted:
            return data
        assert asyncio.get_running_loop().time() < deadline, f"/v1/models lists {sorted(data)}, not {sorted(wanted)}"
        await asyncio.sleep(0.1)


async def test_edge_models_follow_model_resources(tmp_path):
    replay = Replay(lists=[(100, [model("llama", 100, ownedBy="meta")])], streams=[[LIVE, HOLD]])
    api_port = free_port()
    runner = await serve(replay, api_port)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("models: []\n")  # ignored by the catalog: its models come from the API
    env = {
        "MODELPLEX_DEV_API_KEY": KEY,
        "MODELPLEX_CATALOG_SOURCE": "kubernetes",
        "MODELPLEX_CATALOG_KUBE_API_URL": f"http://127.0.0.1:{api_port}",
        "MODELPLEX_CATALOG_KUBE_NAMESPACE": "ml",
    }
    stack = Stack(catalog, catalog_listen=f"127.0.0.1:{free_port()}", edge_port=free_port(), env=env, log_dir=tmp_path)
    await asyncio.to_thread(stack.start)
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=5) as client:
            first = await _listed(client, {"llama"})
            assert first["llama"]["owned_by"] == "meta"
            await replay.live.put(event("ADDED", model("qwen", 101, created="2026-02-01T00:00:00Z")))
            await _listed(client, {"llama", "qwen"})
            await replay.live.put(event("MODIFIED", model("llama", 102, generation=2, ownedBy="someone-else")))
            await replay.live.put(event("DELETED", model("qwen", 103)))
            await _listed(client, {"llama"})
            deadline = asyncio.get_running_loop().time() + 10
            while (await _listed(client, {"llama"}))["llama"]["owned_by"] != "someone-else":
                assert asyncio.get_running_loop().time() < deadline, "the MODIFIED event never reached the edge"
                await asyncio.sleep(0.1)
            # Its backend does not exist: listed, but refused with 503 while not ready.
            reply = await client.post(
                "/chat/completions", json={"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
            )
            assert reply.status_code == 503 and "loading" in reply.json()["error"]["message"]
        written = {name for name, _ in replay.patches}
        assert "llama" in written  # Ready condition written back
    finally:
        await asyncio.to_thread(stack.stop)
        await replay.live.put(None)
        replay.closing.set()
        await runner.cleanup()
