"""The edge's copy of the catalog, kept current by the catalog's Watch stream.

Resolving a model on the request path is a dict lookup; the catalog service is
only asked again when it pushes a change. A watch that breaks after updates (the
catalog's server aged the connection out) is one line; a catalog that cannot be
reached is logged as an outage (modelplex_kit.outages): once, a summary while it
lasts, and once when the watch delivers again, however many retries in between.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc
from modelplex_kit.catalog_view import CatalogView
from modelplex_kit.errors import invalid, model_not_found, unavailable
from modelplex_kit.outages import SUMMARY_SECONDS, OutageLog

log = logging.getLogger(__name__)

# What a client is told to wait for a model that is not ready: engines load for minutes,
# but the catalog sees readiness at once, so a short wait keeps the first answer close.
NOT_READY_RETRY_AFTER_S = 5
# The watch is retried after BACKOFF_FIRST_S, doubling up to BACKOFF_MAX_S while it keeps failing.
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.2, 5.0

_MODALITY_NAMES = {value: name.removeprefix("MODALITY_").lower() for name, value in catalog_pb2.Modality.items()}


class CatalogWatcher:
    def __init__(self, channel: grpc.aio.Channel, summary_seconds: float = SUMMARY_SECONDS) -> None:
        self._stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        self.view = CatalogView()
        self.ready = asyncio.Event()
        #: Watches that failed before delivering anything, logged once per outage.
        self.outage = OutageLog(log, "catalog", summary_seconds=summary_seconds)

    async def run(self) -> None:
        """Follows the catalog forever, reconnecting with backoff."""
        backoff = BACKOFF_FIRST_S
        while True:
            delivered = False
            try:
                async for update in self._stub.WatchModels(catalog_pb2.WatchModelsRequest()):
                    delivered = True
                    self.outage.recovered()
                    self.view = CatalogView.build(update.models, update.revision)
                    self.ready.set()
                    backoff = BACKOFF_FIRST_S
                    log.info("catalog updated", extra={"revision": update.revision, "models": len(update.models)})
            except grpc.aio.AioRpcError as exc:
                if delivered:  # a working watch ended: once per watch
                    log.warning("catalog watch interrupted; retrying", extra={"code": exc.code().name})
                else:  # never delivered: the catalog is not there; once per outage
                    self.outage.failed(f"watch failed ({exc.code().name})", "watch retries")
            except ValueError as exc:  # a catalog with duplicate names: keep the last good view
                log.error("catalog update rejected", extra={"error": str(exc)})
            except Exception:  # never let the follower die: the edge would serve a frozen catalog
                log.exception("catalog watch failed; retrying")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

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
