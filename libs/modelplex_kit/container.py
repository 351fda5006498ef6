"""How a service runs in its container: what the one Dockerfile needs to know beyond the service's name.

Every image is built from the repository's ``Dockerfile`` with ``--build-arg SERVICE=<name>``
and carries that name as ``MODELPLEX_SERVICE``. Its entrypoint and health check are this module:

    python -m modelplex_kit.container serve    # listen on every interface, then run the service
    python -m modelplex_kit.container health   # exit 0 when the service answers its health check

The port comes from the modality registry for a backend, from :data:`PLATFORM` for the catalog
and the edge. A listen address set in the environment (the chart and kustomize set one) wins.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass
from typing import Literal

from modelplex_kit.modalities import REGISTRY


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a service listens in its container, and how its health is asked."""

    port: int
    protocol: Literal["grpc", "http"]


# The services that are not modality backends (the gatekeeper runs from the edge's image).
PLATFORM = {"catalog": Endpoint(50051, "grpc"), "edge": Endpoint(8080, "http")}


def images() -> tuple[str, ...]:
    """Every image the project builds: the platform's services, then one per modality."""
    return (*PLATFORM, *REGISTRY)


def endpoint(service: str) -> Endpoint:
    if service in REGISTRY:
        return Endpoint(REGISTRY[service].port, "grpc")
    if service in PLATFORM:
        return PLATFORM[service]
    raise SystemExit(f"modelplex_kit.container: unknown service {service!r}; known: {', '.join(images())}")


def _prefix(service: str) -> str:
    return f"MODELPLEX_{service.upper()}_"


def container_env(service: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment the service runs with in a container: every interface, unless one is set."""
    where, prefix = endpoint(service), _prefix(service)
    env = dict(environ)
    if where.protocol == "grpc":
        env.setdefault(f"{prefix}LISTEN", f"0.0.0.0:{where.port}")
    else:
        env.setdefault(f"{prefix}HOST", "0.0.0.0")
    return env


def health_target(service: str, environ: dict[str, str]) -> str:
    """What the health check asks: the port the service was told to listen on, over loopback."""
    where, prefix = endpoint(service), _prefix(service)
    if where.protocol == "grpc":
        listen = environ.get(f"{prefix}LISTEN", f"0.0.0.0:{where.port}")
        return f"127.0.0.1:{listen.rsplit(':', 1)[1]}"
    return f"http://127.0.0.1:{environ.get(f'{prefix}PORT', where.port)}/healthz"


def healthy(service: str, environ: dict[str, str], timeout: float = 3.0) -> bool:
    target = health_target(service, environ)
    if endpoint(service).protocol == "http":
        try:
            with urllib.request.urlopen(target, timeout=timeout) as response:
                return response.status == 200
        except OSError:
            return False
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> None:
    service = os.environ.get("MODELPLEX_SERVICE", "")
    if len(argv) != 1 or argv[0] not in {"serve", "health"}:
        raise SystemExit("usage: MODELPLEX_SERVICE=<name> python -m modelplex_kit.container serve|health")
    if argv[0] == "health":
        endpoint(service)  # an unknown service is a clear error, not "unhealthy"
        sys.exit(0 if healthy(service, dict(os.environ)) else 1)
    env = container_env(service, dict(os.environ))
    os.execvpe(sys.executable, [sys.executable, "-m", f"modelplex_{service}"], env)


if __name__ == "__main__":
    main(sys.argv[1:])
