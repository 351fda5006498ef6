"""python -m modelplex_edge: serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import uvicorn

from modelplex_edge.app import create_app
from modelplex_edge.settings import EdgeSettings
from modelplex_kit.logging import configure_logging
from modelplex_kit.telemetry import configure_tracing


def main() -> None:
    settings = EdgeSettings()
    configure_logging("edge", settings.log_level, settings.log_format)
    configure_tracing("edge", settings.otel_exporter)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=settings.keep_alive_seconds,
        timeout_graceful_shutdown=int(settings.grace_seconds),
    )


if __name__ == "__main__":
    main()
