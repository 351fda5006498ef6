"""python -m modelplex_catalog: serve the catalog over gRPC."""

from __future__ import annotations

import asyncio

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc
from modelplex_catalog.readiness import ReadinessFollower
from modelplex_catalog.servicer import CatalogServicer
from modelplex_catalog.settings import CatalogSettings
from modelplex_catalog.store import CatalogStore
from modelplex_kit.grpc_server import run, serve


async def main(settings: CatalogSettings) -> None:
    store = CatalogStore(settings.path)
    tasks = [asyncio.create_task(store.poll(settings.poll_seconds))]
    if settings.follow_readiness:
        tasks.append(asyncio.create_task(ReadinessFollower(store, settings.readiness_retry_seconds).run()))

    def register(server):
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogServicer(store), server)
        return [catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name]

    async def stop_polling() -> None:
        for task in tasks:
            task.cancel()

    await serve("catalog", settings, register, on_shutdown=stop_polling)


if __name__ == "__main__":
    settings = CatalogSettings()
    run("catalog", settings, lambda: main(settings))
