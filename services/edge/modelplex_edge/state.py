"""What the routes (and the jobs process's workers) share, built once at startup (modelplex_edge.build;
``app.state.edge``)."""

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
    #: Background responses: the durable queue (modelplex_kit.jobqueue.JobStore); the jobs process runs it.
    background: Any = None
    #: Files and batches: the object store (modelplex_kit.objectstore) and the batch job queue (run by the jobs
    #: process, modelplex_edge.jobs).
    objects: Any = None
    batches: Any = None
    #: The edge's demand report for the jobs process (modelplex_edge.jobs.demand.JobsDemand): poked at each
    #: enqueue. None outside the edge app.
    jobs_demand: Any = None
