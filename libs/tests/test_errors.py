import grpc
import pytest

from modelplex_kit.errors import GRPC_TO_HTTP, ServiceError, invalid, model_not_found, unavailable


def test_every_grpc_status_has_an_http_meaning():
    missing = {code for code in grpc.StatusCode if code != grpc.StatusCode.OK} - set(GRPC_TO_HTTP)
    assert not missing


@pytest.mark.parametrize(
    ("status", "http", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "requests"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
    ],
)
def test_table(status, http, kind):
    error = ServiceError(status, "boom")
    assert error.http.status == http
    assert error.envelope()["error"]["type"] == kind


def test_envelope_has_openais_four_fields():
    body = invalid("bad temperature", "temperature").envelope()
    assert body == {
        "error": {"message": "bad temperature", "type": "invalid_request_error", "param": "temperature", "code": None}
    }


def test_param_and_code_survive_the_grpc_hop():
    original = model_not_found("gpt-17")
    wire = grpc.aio.AioRpcError(
        original.status, grpc.aio.Metadata(), grpc.aio.Metadata(*original.trailing_metadata()), original.message
    )
    back = ServiceError.from_rpc_error(wire)
    assert (back.status, back.param, back.code, back.message) == (
        grpc.StatusCode.NOT_FOUND,
        "model",
        "model_not_found",
        original.message,
    )


def test_unavailable_without_detail_says_retry():
    wire = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connect failed")
    assert "retry" in ServiceError.from_rpc_error(wire).message


def test_grpc_transport_text_never_reaches_the_client():
    raw = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50061: Failed to connect"
    wire = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), raw)
    error = ServiceError.from_rpc_error(wire)
    assert error.http.status == 503 and error.headers["retry-after"] == "1"
    assert "127.0.0.1" not in error.message and "ipv4" not in error.message


def test_unknown_transport_status_is_a_plain_500():
    wire = grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(), grpc.aio.Metadata(), "Exception calling")
    error = ServiceError.from_rpc_error(wire)
    assert error.http.status == 500 and "Exception" not in error.message


def test_a_backend_unavailable_error_keeps_its_message_and_retry_after():
    original = ServiceError(grpc.StatusCode.UNAVAILABLE, "The model is at capacity; retry shortly.")
    wire = grpc.aio.AioRpcError(
        original.status, grpc.aio.Metadata(), grpc.aio.Metadata(*original.trailing_metadata()), original.message
    )
    back = ServiceError.from_rpc_error(wire)
    assert back.message == original.message and back.headers["retry-after"] == "1"


def test_a_backends_own_retry_after_reaches_the_edge():
    original = unavailable("Every replica of the model server is saturated; retry shortly.", retry_after=7)
    wire = grpc.aio.AioRpcError(
        original.status, grpc.aio.Metadata(), grpc.aio.Metadata(*original.trailing_metadata()), original.message
    )
    back = ServiceError.from_rpc_error(wire)
    assert back.http.status == 503 and back.headers["retry-after"] == "7"


def test_a_message_beyond_grpcs_size_bound_is_a_413_not_a_retryable_429():
    raw = "SERVER: Received message larger than max (16773201 vs. 4194304)"
    wire = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), raw)
    error = ServiceError.from_rpc_error(wire)
    assert error.http.status == 413 and "retry-after" not in error.headers
    assert error.envelope()["error"]["code"] == "request_too_large" and "16773201" not in error.message


def test_an_overloaded_backend_without_detail_is_still_a_429_to_retry():
    wire = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "busy")
    error = ServiceError.from_rpc_error(wire)
    assert error.http.status == 429 and error.headers["retry-after"] == "1"
