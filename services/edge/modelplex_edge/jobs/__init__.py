"""The jobs process: batches and background responses, run off their durable queues beside the edge.

``python -m modelplex_edge.jobs`` (the edge's image, its own command) reads the edge's ``MODELPLEX_EDGE_*``
settings, so it reaches the same stores, catalog, gatekeeper and backends (modelplex_edge.build), plus its own
``MODELPLEX_JOBS_*`` (settings.py). The edge only queues, reads and cancels; this process claims the work
(runner.py: :class:`JobsRunner`, usable in-process over an edge's state, as the tests do), serves
``/healthz``, ``/readyz`` and ``/metrics`` (server.py), and reports its demand to the scaler (demand.py).
"""
