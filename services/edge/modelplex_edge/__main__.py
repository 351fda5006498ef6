"""python -m modelplex_edge: serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import uvicorn

from modelplex_edge.app import create_app
from modelplex_edge.http_protocol import HeaderTimeoutProtocol
from modelplex_edge.settings import EdgeSettings
from modelplex_kit.logging import configure_logging
from modelplex_kit.telemetry import configure_tracing

# Streams still open this long before the grace period ends are closed with an error event and
# [DONE], so they end well-formed before uvicorn cancels what is left.
_DRAIN_MARGIN_SECONDS = 2.0


class EdgeServer(uvicorn.Server):
    """uvicorn, plus: on SIGTERM, schedule the closing of streams that would outlive the grace period."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self._app.state, "edge", None)
        if not self.should_exit and state is not None:
            state.drain.schedule(self.config.timeout_graceful_shutdown - _DRAIN_MARGIN_SECONDS)
        super().handle_exit(sig, frame)


def main() -> None:
    settings = EdgeSettings()
    configure_logging("edge", settings.log_level, settings.log_format)
    configure_tracing("edge", settings.otel_exporter)
    app = create_app(settings)
    HeaderTimeoutProtocol.header_timeout = settings.header_timeout_seconds
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=HeaderTimeoutProtocol,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=settings.keep_alive_seconds,
        timeout_graceful_shutdown=int(settings.grace_seconds),
    )
    EdgeServer(config, app).run()


if __name__ == "__main__":
    main()
