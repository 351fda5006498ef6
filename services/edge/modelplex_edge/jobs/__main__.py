"""python -m modelplex_edge.jobs: run batches and background responses off their queues (see __init__)."""

from __future__ import annotations

import uvicorn

from modelplex_edge.jobs.server import create_app
from modelplex_edge.jobs.settings import JobsSettings
from modelplex_edge.settings import EdgeSettings
from modelplex_kit.logging import configure_logging
from modelplex_kit.telemetry import configure_tracing


def main() -> None:
    settings, jobs = EdgeSettings(), JobsSettings()
    configure_logging("jobs", settings.log_level, settings.log_format)
    configure_tracing("jobs", settings.otel_exporter)
    config = uvicorn.Config(
        create_app(settings, jobs),
        host=jobs.host,
        port=jobs.port,
        loop="uvloop",
        log_config=None,
        access_log=False,
        server_header=False,
        # On SIGTERM the running jobs go back to their queues at once (lifespan shutdown); nothing waits.
        timeout_graceful_shutdown=int(settings.grace_seconds),
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
