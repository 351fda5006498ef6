"""python -m modelplex_catalog: serve the catalog over gRPC."""

from __future__ import annotations

import asyncio

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc
from modelplex_catalog import scaler
from modelplex_catalog.readiness import ReadinessFollower
from modelplex_catalog.servicer import CatalogServicer
from modelplex_catalog.settings import CatalogSettings
from modelplex_catalog.store import CatalogStore
from modelplex_kit.grpc_server import ReadyProbe, run, serve


def start_source(settings: CatalogSettings) -> tuple[CatalogStore, list[asyncio.Task], ReadyProbe | None]:
    """The store fed by the configured source, the tasks feeding it, and the catalog's readiness."""
    if settings.source == "kubernetes":
        from modelplex_catalog.kube import KubernetesSource, api_client, default_namespace

        store = CatalogStore()
        source = KubernetesSource(
            store,
            api_client(settings.kube_api_url),
            settings.kube_namespace or default_namespace(),
            settings.kube_watch_timeout_seconds,
            settings.kube_backoff_max_seconds,
        )
        return store, [asyncio.create_task(source.run())], source.ready
    store = CatalogStore(settings.path)
    return store, [asyncio.create_task(store.poll(settings.poll_seconds))], None


async def main(settings: CatalogSettings) -> None:
    store, tasks, ready = start_source(settings)
    if settings.follow_readiness:
        follower = ReadinessFollower(store, settings.readiness_retry_seconds, settings.readiness_resolve_seconds)
        tasks.append(asyncio.create_task(follower.run()))

    def register(server):
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogServicer(store), server)
        # KEDA's external scaler and the demand it answers from: the catalog is the one always-on service.
        scaled = scaler.register(server, scaler.DemandBoard())
        return [catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name, *scaled]

    async def stop_sources() -> None:
        for task in tasks:
            task.cancel()

    await serve("catalog", settings, register, on_shutdown=stop_sources, ready=ready)


if __name__ == "__main__":
    settings = CatalogSettings()
    run("catalog", settings, lambda: main(settings))
