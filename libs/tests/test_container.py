"""modelplex_kit.container: what every image runs, its port and health check taken from the registry."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelplex_kit.container import PLATFORM, container_env, endpoint, health_target, healthy, images
from modelplex_kit.modalities import REGISTRY
from tests.support.ports import free_port


def test_one_image_per_platform_service_and_per_modality() -> None:
    assert images() == ("catalog", "edge", *REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_backend_listens_on_every_interface_at_its_registry_port(name: str) -> None:
    row = REGISTRY[name]
    assert endpoint(name).port == row.port
    assert container_env(name, {})[f"{row.env_prefix}LISTEN"] == f"0.0.0.0:{row.port}"
    assert health_target(name, {}) == f"127.0.0.1:{row.port}"


def test_an_address_from_the_environment_wins_and_the_health_check_follows_it() -> None:
    given = {"MODELPLEX_TEXT_LISTEN": "127.0.0.1:7001", "OTHER": "kept"}
    assert container_env("text", given) == given
    assert health_target("text", given) == "127.0.0.1:7001"


def test_the_edge_binds_every_interface_and_is_asked_over_http() -> None:
    env = container_env("edge", {})
    assert env["MODELPLEX_EDGE_HOST"] == "0.0.0.0" and "MODELPLEX_EDGE_PORT" not in env
    assert health_target("edge", {}) == f"http://127.0.0.1:{PLATFORM['edge'].port}/healthz"
    assert health_target("edge", {"MODELPLEX_EDGE_PORT": "9999"}) == "http://127.0.0.1:9999/healthz"


def test_the_catalog_listens_at_its_own_port() -> None:
    assert container_env("catalog", {})["MODELPLEX_CATALOG_LISTEN"] == "0.0.0.0:50051"


def test_an_unknown_service_says_which_ones_exist() -> None:
    with pytest.raises(SystemExit, match="unknown service 'nope'; known: catalog, edge, text"):
        endpoint("nope")


@pytest.fixture
def grpc_health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    yield port, servicer
    server.stop(grace=None)


def test_grpc_health_check_against_a_real_server(grpc_health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = grpc_health_server
    env = {"MODELPLEX_EMBEDDINGS_LISTEN": f"0.0.0.0:{port}"}
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthy("embeddings", env, timeout=10)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert not healthy("embeddings", env, timeout=10)
    assert not healthy("embeddings", {"MODELPLEX_EMBEDDINGS_LISTEN": f"0.0.0.0:{free_port()}"}, timeout=2)


def test_http_health_check_against_a_real_server() -> None:
    status = {"code": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {"MODELPLEX_EDGE_PORT": str(server.server_address[1])}
        assert healthy("edge", env, timeout=10)
        status["code"] = 503
        assert not healthy("edge", env, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
