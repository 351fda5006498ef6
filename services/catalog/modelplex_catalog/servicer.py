from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc
from modelplex_catalog.store import CatalogStore
from modelplex_kit.errors import model_not_found


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, store: CatalogStore) -> None:
        self._store = store

    async def ListModels(self, request, context: grpc.aio.ServicerContext) -> catalog_pb2.ListModelsResponse:
        view = self._store.view
        return catalog_pb2.ListModelsResponse(models=view.models, revision=view.revision)

    async def ResolveModel(self, request, context: grpc.aio.ServicerContext) -> catalog_pb2.ResolveModelResponse:
        model = self._store.view.resolve(request.model)
        if model is None:
            raise model_not_found(request.model)
        return catalog_pb2.ResolveModelResponse(model=model)

    async def WatchModels(
        self, request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[catalog_pb2.WatchModelsResponse]:
        async for view in self._store.views():
            yield catalog_pb2.WatchModelsResponse(models=view.models, revision=view.revision)
