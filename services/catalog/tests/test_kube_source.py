"""The Kubernetes source against an API server replaying recorded list/watch traffic."""

import asyncio

import pytest
from pydantic import ValidationError

from modelplex_catalog.kube import KubernetesSource, api_client, spec_from_resource
from modelplex_catalog.store import CatalogStore
from tests.support.kube_replay import DROP, HOLD, Replay, event, gone, model, serve
from tests.support.ports import free_port
from tests.support.until import until


def _ids(store: CatalogStore) -> set[str]:
    return {m.id for m in store.view.models}


def test_resource_fields_map_onto_the_file_loader_model():
    spec = spec_from_resource(model("llama", 1, contextLength=8192, ownedBy="meta", aliases=["l"]))
    assert (spec.id, spec.context_length, spec.owned_by, spec.aliases) == ("llama", 8192, "meta", ["l"])
    assert spec.created == 1767225600  # metadata.creationTimestamp
    assert spec_from_resource(model("x", 1, id="explicit-id")).id == "explicit-id"
    assert spec_from_resource(model("x", 1, defaultMaxTokens=512)).default_max_tokens == 512


def test_a_models_pool_is_checked_and_kept():
    spec = spec_from_resource(model("llama", 1, pool={"inferencePool": "llama-pool", "port": "http"}))
    assert (spec.pool.inference_pool, spec.pool.port) == ("llama-pool", "http")
    assert spec_from_resource(model("v", 1, pool={"replicas": 3})).pool.replicas == 3
    with pytest.raises(ValidationError, match="not both"):
        spec_from_resource(model("x", 1, pool={"inferencePool": "p", "selector": {"app": "x"}}))
    with pytest.raises(ValidationError):
        spec_from_resource(model("x", 1, pool={"replica": 3}))


async def test_list_watch_resume_relist_and_status():
    m1, m2 = model("m1", 10), model("m2", 11, created="2026-01-02T00:00:00Z")
    m1_aliased = model("m1", 12, generation=2, aliases=["first"])
    bad = model("bad", 21, modality="smell")
    m3 = model("m3", 22, created="2026-01-03T00:00:00Z")
    thief = model("thief", 23, created="2026-01-04T00:00:00Z", aliases=["first"])  # m1 had the name first
    replay = Replay(
        lists=[(10, [m1]), (20, [m1_aliased, bad])],
        streams=[
            [event("ADDED", m2), event("MODIFIED", m1_aliased), DROP],
            [event("DELETED", model("m2", 13)), gone(13)],
            [
                event("ADDED", m3),
                event("ADDED", thief),
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "30"}}},
            ],
            [HOLD],
        ],
    )
    port = free_port()
    runner = await serve(replay, port)
    store = CatalogStore()
    source = KubernetesSource(store, api_client(f"http://127.0.0.1:{port}"), "ml", backoff_max_seconds=0.2)
    task = asyncio.create_task(source.run())
    try:
        assert not await source.ready()
        final = {"m1", "m3"}
        await until(lambda: _ids(store) == final and store.view.resolve("first") is not None, 10, what="final catalog")
        assert await source.ready()
        assert store.view.resolve("first").id == "m1"  # the older Model keeps a contested alias
        await until(lambda: len([r for r in replay.requests if r.get("watch")]) == 4, 10, what="the resumed watch")
        watches = [r.get("resourceVersion") for r in replay.requests if r.get("watch")]
        lists = [r for r in replay.requests if not r.get("watch")]
        # list@10, watch 10, drop -> resume 12, 410 -> relist@20, watch 20, clean end -> resume 30 (bookmark)
        assert watches == ["10", "12", "20", "30"] and len(lists) == 2
        patched = {"bad", "thief", "m1", "m3"}
        await until(lambda: patched <= {name for name, _ in replay.patches}, 10, what="status writes")
        last = {name: body["status"] for name, body in replay.patches}
        assert (
            last["bad"]["conditions"][0]["reason"] == "InvalidSpec"
            and "modality" in last["bad"]["conditions"][0]["message"]
        )
        assert (
            last["thief"]["conditions"][0]["status"] == "False" and "first" in last["thief"]["conditions"][0]["message"]
        )
        assert last["m1"]["observedGeneration"] == 2
        # No backend answers here and no follower runs: readiness is not known yet.
        assert last["m1"]["conditions"][0]["status"] == "Unknown"
        store.set_readiness("m3:50061", False, "backend NOT_SERVING")
        await until(lambda: replay.patches[-1][0] == "m3", 10, what="status after a readiness change")
        assert replay.patches[-1][1]["status"]["conditions"][0]["reason"] == "BackendNotReady"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        replay.closing.set()
        await runner.cleanup()


@pytest.mark.parametrize("status", [500, 403])
async def test_api_errors_back_off_and_retry(status):
    from aiohttp import web

    calls = []

    async def failing(request):
        calls.append(request.query.get("watch"))
        if len(calls) < 3:
            return web.json_response({"kind": "Status", "code": status}, status=status)
        return web.json_response({"metadata": {"resourceVersion": "5"}, "items": [model("late", 5)]})

    app = web.Application()
    app.router.add_get("/apis/modelplex.io/v1alpha1/namespaces/ml/models", failing)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    store = CatalogStore()
    source = KubernetesSource(store, api_client(f"http://127.0.0.1:{port}"), "ml", backoff_max_seconds=0.1)
    task = asyncio.create_task(source.run())
    try:
        await until(lambda: _ids(store) == {"late"}, 10, what="catalog after the API recovered")
        assert calls[:3] == [None, None, None]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()


def test_an_adapter_model_takes_its_base_from_another_model_and_one_without_its_base_is_refused():
    store = CatalogStore()
    source = KubernetesSource(store, api_client("http://127.0.0.1:9"), "ml")
    kiwi = model("kiwi", 2)
    kiwi["spec"] = {"adapter": {"base": "llama", "source": "/adapters/kiwi"}}
    orphan = model("orphan", 3)
    orphan["spec"] = {"adapter": {"base": "missing", "source": "/adapters/orphan"}}
    source._publish({"llama": model("llama", 1), "kiwi": kiwi, "orphan": orphan})
    assert _ids(store) == {"llama", "kiwi"}
    served = store.view.resolve("kiwi")
    assert served.adapter.base == "llama" and served.backend_target == "llama:50061"
    assert "not in the catalog" in source._rejected["orphan"]
