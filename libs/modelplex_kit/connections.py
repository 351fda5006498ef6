"""One connection policy for both ends of every Modelplex gRPC connection: keepalive pings and ageing.

Keepalive. Clients ping an open connection every ``interval_ms`` (with or without calls on it), so a
peer that vanished without closing its socket (a pod gone, a node lost) is noticed in seconds instead
of at the next call's deadline. A gRPC server's defaults refuse exactly that: it accepts a ping at most
every 5 minutes, and none while no call is open, and answers the third refused ping with a GOAWAY
``too_many_pings`` that tears the connection down with its calls. So servers accept what clients send
from the same numbers here: pings without calls, at up to twice the clients' rate (timers jitter).

Ageing. Servers ask clients to reconnect after ``MODELPLEX_MAX_CONNECTION_AGE_SECONDS``, so edges
balancing over a headless Service find backend pods started after them. A GOAWAY only stops *new*
calls on the connection; the calls already on it get the age grace to finish, and that grace must be at
least the longest call, or ageing ends calls that are within their deadline. It is therefore its own
setting, ``MODELPLEX_MAX_CONNECTION_AGE_GRACE_SECONDS`` (600 s: the edge's backend deadline), and not
the SIGTERM drain grace (10 s under ``make run``). We keep ageing all connections (rather than only
idle ones, grpc's ``max_connection_idle``): a busy edge's connections are never idle, and those are the
ones that most need to spread onto new pods. Streams without a deadline (the catalog's WatchModels,
the gatekeeper's Gate) end after age + grace and are re-opened by their clients without losing state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Options = list[tuple[str, Any]]


@dataclass(frozen=True, slots=True)
class Keepalive:
    #: How often a client pings an open connection.
    interval_ms: int = 30_000
    #: How long a client waits for the ping's answer before it closes the connection.
    timeout_ms: int = 20_000

    def client_options(self) -> Options:
        return [
            ("grpc.keepalive_time_ms", self.interval_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            # Keep pinging a connection that carries no data (by default a client stops after two).
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> Options:
        return [
            ("grpc.keepalive_permit_without_calls", 1),
            # (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS.) Half the clients' interval: a ping a
            # little early (timer jitter, a busy loop) is no strike.
            ("grpc.http2.min_ping_interval_without_data_ms", self.interval_ms // 2),
            ("grpc.http2.max_ping_strikes", 2),
        ]


#: The policy every Modelplex client and server uses.
KEEPALIVE = Keepalive()


def ageing_options(age_seconds: float, grace_seconds: float) -> Options:
    """Server options: GOAWAY after ``age_seconds`` (0: never); calls in flight then get ``grace_seconds``."""
    if age_seconds <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(grace_seconds * 1000)),
    ]
