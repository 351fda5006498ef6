"""The edge's catalog copy: a model whose backend is not ready is refused with 503 + Retry-After."""

import grpc
import pytest

from modelplex.v1 import catalog_pb2
from modelplex_edge.catalog_client import NOT_READY_RETRY_AFTER_S, CatalogWatcher
from modelplex_kit.catalog_view import CatalogView
from modelplex_kit.errors import ServiceError

TEXT = catalog_pb2.MODALITY_TEXT


def _watcher(*models: catalog_pb2.Model) -> CatalogWatcher:
    watcher = CatalogWatcher(grpc.aio.insecure_channel("127.0.0.1:1"))
    watcher.view = CatalogView.build(models, 1)
    watcher.ready.set()
    return watcher


async def test_not_ready_model_is_503_with_retry_after():
    loading = catalog_pb2.Model(id="llama", modality=TEXT, ready=False, ready_reason="backend NOT_SERVING")
    with pytest.raises(ServiceError) as caught:
        _watcher(loading).resolve("llama", TEXT)
    error = caught.value
    assert error.status == grpc.StatusCode.UNAVAILABLE
    assert error.headers["retry-after"] == str(NOT_READY_RETRY_AFTER_S)
    assert "`llama` is loading" in error.message and "NOT_SERVING" in error.message


async def test_ready_and_unprobed_models_are_routed():
    ready = catalog_pb2.Model(id="a", modality=TEXT, ready=True)
    unprobed = catalog_pb2.Model(id="b", modality=TEXT)  # a catalog that does not follow readiness
    watcher = _watcher(ready, unprobed)
    assert watcher.resolve("a", TEXT).id == "a" and watcher.resolve("b", TEXT).id == "b"
