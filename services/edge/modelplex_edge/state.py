"""What the routes share, built once at startup (``app.state.edge``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelplex_edge.admission import Admission
from modelplex_edge.backends import Backends
from modelplex_edge.catalog_client import CatalogWatcher
from modelplex_edge.endpoints.responses.store import ResponseStore
from modelplex_edge.settings import EdgeSettings
from modelplex_edge.sse import Drain


@dataclass(slots=True)
class EdgeState:
    settings: EdgeSettings
    catalog: CatalogWatcher
    backends: Backends
    admission: Admission
    responses: ResponseStore
    drain: Drain = field(default_factory=Drain)
    #: Background responses: the durable queue (modelplex_kit.jobqueue.JobStore) and this edge's workers
    #: (endpoints.responses.background.BackgroundWorker, None when it runs none).
    background: Any = None
    worker: Any = None
    #: Files and batches: the object store (modelplex_kit.objectstore), the batch job queue and this edge's
    #: batch workers (endpoints.batches.worker.BatchWorker, None when it runs none).
    objects: Any = None
    batches: Any = None
    batch_worker: Any = None
