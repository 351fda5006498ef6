"""The edge's copy of the catalog, kept current by the catalog's Watch stream.

Resolving a model on the request path is a dict lookup; the catalog service is
only asked again when it pushes a change.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc
from modelplex_kit.catalog_view import CatalogView
from modelplex_kit.errors import invalid, model_not_found, unavailable

log = logging.getLogger(__name__)

# What a client is told to wait for a model that is not ready: engines load for minutes,
# but the catalog sees readiness at once, so a short wait keeps the first answer close.
NOT_READY_RETRY_AFTER_S = 5

_MODALITY_NAMES = {value: name.removeprefix("MODALITY_").lower() for name, value in catalog_pb2.Modality.items()}


class CatalogWatcher:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        self.view = CatalogView()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        """Follows the catalog forever, reconnecting with backoff."""
        backoff = 0.2
        while True:
            try:
                async for update in self._stub.WatchModels(catalog_pb2.WatchModelsRequest()):
                    self.view = CatalogView.build(update.models, update.revision)
                    self.ready.set()
                    backoff = 0.2
                    log.info("catalog updated", extra={"revision": update.revision, "models": len(update.models)})
            except grpc.aio.AioRpcError as exc:
                log.warning("catalog watch interrupted; retrying", extra={"code": exc.code().name})
            except ValueError as exc:  # a catalog with duplicate names: keep the last good view
                log.error("catalog update rejected", extra={"error": str(exc)})
            except Exception:  # never let the follower die: the edge would serve a frozen catalog
                log.exception("catalog watch failed; retrying")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def resolve(self, name: str, modality: int) -> catalog_pb2.Model:
        """The model named ``name`` (id or alias), which must serve ``modality``."""
        if not self.ready.is_set():
            raise unavailable("The model catalog is not available yet; retry shortly.")
        model = self.view.resolve(name)
        if model is None:
            raise model_not_found(name)
        if model.modality != modality:
            raise invalid(
                f"The model `{name}` is a {_MODALITY_NAMES.get(model.modality, 'different')} model "
                f"and cannot serve this endpoint.",
                "model",
                code="model_not_supported",
            )
        if model.HasField("ready") and not model.ready:
            # Listed by /v1/models, but its engine is still loading (or down): retryable, not a 404.
            raise unavailable(
                f"The model `{name}` is loading and cannot serve requests yet ({model.ready_reason}); "
                "retry shortly.",
                retry_after=NOT_READY_RETRY_AFTER_S,
            )
        return model
