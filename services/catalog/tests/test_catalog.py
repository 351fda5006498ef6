import asyncio
from pathlib import Path

import grpc
import pytest

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc
from modelplex_catalog.loader import parse_catalog
from modelplex_catalog.servicer import CatalogServicer
from modelplex_catalog.settings import DEFAULT_CATALOG
from modelplex_catalog.store import CatalogStore
from modelplex_kit.grpc_server import ObservingInterceptor
from tests.support.ports import free_port

ENTRY = """
models:
  - id: {id}
    aliases: [short]
    modality: text
    backend: 127.0.0.1:50061
    engine: {{kind: llamacpp, settings: {{threads: 2}}}}
    capabilities: [chat, tool_use]
    context_length: 4096
"""


def test_shipped_default_catalog_serves_smollm2():
    models = parse_catalog(DEFAULT_CATALOG.read_text())
    assert models[0].id == "smollm2-135m-instruct"
    caps = models[0].capabilities.text
    assert caps.chat and caps.json_schema and not caps.vision
    # A request that sets no max_tokens returns in seconds, not after rambling to the 8k context.
    assert models[0].default_max_tokens == 256


def test_the_default_output_limit_is_optional_and_positive():
    assert not parse_catalog(ENTRY.format(id="m1"))[0].HasField("default_max_tokens")
    limited = parse_catalog(ENTRY.format(id="m1") + "    default_max_tokens: 100\n")[0]
    assert limited.default_max_tokens == 100
    with pytest.raises(ValueError):
        parse_catalog(ENTRY.format(id="m1") + "    default_max_tokens: 0\n")


def test_entry_fields_reach_the_proto():
    model = parse_catalog(ENTRY.format(id="m1"))[0]
    assert model.modality == catalog_pb2.MODALITY_TEXT and model.backend_target == "127.0.0.1:50061"
    assert model.engine.kind == "llamacpp" and model.engine.settings["threads"] == 2
    assert model.capabilities.text.tool_use and not model.capabilities.text.completions


@pytest.mark.parametrize(
    "bad",
    [
        "models: [{id: x}]",
        ENTRY.format(id="m1").replace("text", "smell"),
        ENTRY.format(id="m1").replace("tool_use", "telepathy"),
        ENTRY.format(id="m1") + "    surprise: 1\n",
        "",  # an empty file is not a catalog without models
        "models:",  # nor is a truncated one
        "models:\n  - id: m1\n    modality: text\n    backend: 127.0.0.1:1\n    engine: {kind: llama",
    ],
)
def test_invalid_entries_are_rejected(bad):
    with pytest.raises(ValueError):  # pydantic's ValidationError is one
        parse_catalog(bad)


def test_bad_edit_keeps_the_last_good_catalog(tmp_path: Path):
    path = tmp_path / "catalog.yaml"
    path.write_text(ENTRY.format(id="m1"))
    store = CatalogStore(path)
    path.write_text("models: [{id: broken}]")
    assert not store.reload()
    assert store.view.resolve("short").id == "m1" and store.view.revision == 1


def test_duplicate_names_are_rejected(tmp_path: Path):
    path = tmp_path / "catalog.yaml"
    path.write_text(ENTRY.format(id="m1"))
    store = CatalogStore(path)
    path.write_text(ENTRY.format(id="m1") + ENTRY.format(id="m2").replace("models:\n", ""))
    assert not store.reload()  # "short" would name two models


async def test_watch_pushes_changes_without_being_asked(tmp_path: Path):
    path = tmp_path / "catalog.yaml"
    path.write_text(ENTRY.format(id="m1"))
    store = CatalogStore(path)
    poller = asyncio.create_task(store.poll(0.05))
    server = grpc.aio.server(interceptors=[ObservingInterceptor()])
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogServicer(store), server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            watch = stub.WatchModels(catalog_pb2.WatchModelsRequest())
            first = await watch.read()
            assert [m.id for m in first.models] == ["m1"]
            path.write_text(ENTRY.format(id="m2"))
            second = await asyncio.wait_for(watch.read(), 5)
            assert [m.id for m in second.models] == ["m2"] and second.revision == first.revision + 1
            resolved = await stub.ResolveModel(catalog_pb2.ResolveModelRequest(model="short"))
            assert resolved.model.id == "m2"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ResolveModel(catalog_pb2.ResolveModelRequest(model="m1"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            watch.cancel()
    finally:
        poller.cancel()
        await server.stop(0)


ADAPTER = """
  - id: {id}
    aliases: [{id}-alias]
    adapter: {{base: {base}, source: /adapters/{id}, rank: 8}}
"""


def test_an_adapter_entry_is_served_by_its_bases_backend_and_engine_and_keeps_its_own_settings():
    text = ENTRY.format(id="base") + ADAPTER.format(id="kiwi", base="short") + "    default_max_tokens: 32\n"
    base, kiwi = parse_catalog(text)
    assert not base.HasField("adapter")
    assert (kiwi.adapter.base, kiwi.adapter.source, kiwi.adapter.rank) == ("base", "/adapters/kiwi", 8)
    assert (kiwi.backend_target, kiwi.engine) == (base.backend_target, base.engine)
    assert kiwi.capabilities == base.capabilities
    assert kiwi.context_length == 4096 and kiwi.default_max_tokens == 32 and list(kiwi.aliases) == ["kiwi-alias"]


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (ADAPTER.format(id="kiwi", base="nowhere"), "its base 'nowhere' is not in the catalog"),
        (ADAPTER.format(id="a1", base="base") + ADAPTER.format(id="a2", base="a1"), "is itself an adapter"),
        (ADAPTER.format(id="kiwi", base="base") + "    modality: embeddings\n", "modality text"),
        (ADAPTER.format(id="kiwi", base="base") + "    pool: {replicas: 2}\n", "no pool of its own"),
        (ADAPTER.format(id="kiwi", base="base") + "    scale_to_zero: true\n", "the base scales to zero"),
        (
            "  - {id: cold, modality: text, backend: '127.0.0.1:50062', engine: {kind: openai},"
            " cold_start_timeout: 0}\n",
            "greater than 0",
        ),
        ("  - id: lonely\n    modality: text\n", "needs backend, engine"),
    ],
)
def test_an_adapter_needs_a_text_base_in_the_catalog_and_a_model_needs_its_backend(extra, why):
    with pytest.raises(ValueError, match=why):
        parse_catalog(ENTRY.format(id="base") + extra)
