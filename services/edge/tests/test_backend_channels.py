"""The edge's channel to a model's backend replicas: round robin over those whose grpc.health serves."""

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelplex_edge.backends import channel, grpc_target
from tests.support.ports import free_port

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _replica(status) -> tuple[grpc.aio.Server, health.aio.HealthServicer, str]:
    server, servicer = grpc.aio.server(), health.aio.HealthServicer()
    await servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    await server.start()
    return server, servicer, address


async def test_calls_skip_a_backend_replica_that_is_not_serving_and_spread_once_it_is():
    """Each call here is a Health.Check, so its answer says which replica took it: a replica still
    loading its engine (NOT_SERVING) must get none, where plain round robin gave it every other call."""
    (ready, _, a), (loading, servicer, b) = await _replica(SERVING), await _replica(NOT_SERVING)
    backends = channel(f"ipv4:{a},{b}")
    stub = health_pb2_grpc.HealthStub(backends)
    try:
        answers = [(await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)).status for _ in range(10)]
        assert answers == [SERVING] * 10
        await servicer.set("", SERVING)
        # Once the second serves it is back in the rotation: stop the first and the calls still succeed.
        await ready.stop(0)
        for _ in range(5):
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
            assert reply.status == SERVING
    finally:
        await backends.close()
        await ready.stop(0)
        await loading.stop(0)


def test_a_target_with_a_scheme_is_used_as_given_and_a_bare_name_is_resolved_by_dns():
    assert grpc_target("ipv4:127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert grpc_target("dns:///text:50051") == "dns:///text:50051"
    assert grpc_target("text:50051") == "dns:///text:50051"
