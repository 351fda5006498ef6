"""The one mapping of KServe v2 / Triton failures (every backend's Triton adapter uses it)."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from modelplex_kit.kserve_v2 import MAX_MESSAGE, upstream_error


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_a_refusal_shows_the_server_text_cut_to_one_cap_whatever_its_form():
    long = "bad sampling parameter " + "x" * 5000
    for error in (
        InferenceServerException(long, status="StatusCode.INVALID_ARGUMENT"),  # a unary call's status
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, long),  # a stream's status
        InferenceServerException(long),  # a stream's in-band error_message
    ):
        mapped = upstream_error(error, "m", "input")
        assert (mapped.status, mapped.param) == (grpc.StatusCode.INVALID_ARGUMENT, "input")
        assert "bad sampling parameter" in mapped.message
        assert len(mapped.message) <= MAX_MESSAGE + len("The inference server rejected the request: ")


@pytest.mark.parametrize(
    "error",
    [
        rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; 10.0.0.7:8001"),
        InferenceServerException("Request for unknown model: 'm' is not found", status="StatusCode.NOT_FOUND"),
        InferenceServerException("Request for unknown model: 'm' has no available versions"),  # in-band
    ],
)
def test_a_server_that_is_down_or_lacks_the_model_is_a_retryable_503_without_its_text(error):
    mapped = upstream_error(error, "m")
    assert mapped.status == grpc.StatusCode.UNAVAILABLE and "`m`" in mapped.message
    assert "10.0.0.7" not in mapped.message and "unknown model" not in mapped.message


def test_a_deadline_is_a_deadline():
    mapped = upstream_error(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "m")
    assert mapped.status == grpc.StatusCode.DEADLINE_EXCEEDED


def test_inputs_the_model_does_not_take_are_a_deployment_error_naming_the_input():
    mapped = upstream_error(InferenceServerException("unexpected inference input 'max_tokens' for model 'm'"), "m")
    assert mapped.status == grpc.StatusCode.INTERNAL and "'max_tokens'" in mapped.message


def test_other_server_failures_are_internal_without_the_server_text():
    mapped = upstream_error(InferenceServerException("Traceback ... /opt/x.py", status="StatusCode.INTERNAL"), "m")
    assert mapped.status == grpc.StatusCode.INTERNAL and "Traceback" not in mapped.message


def test_a_model_that_raised_is_internal_in_band_too():
    """tritonserver 2.51's in-band text for a decoupled Python model whose execute() raised (captured from
    the real server); before, any in-band text not naming a missing model was taken for a refusal (a 400)."""
    text = "Failed to process the request(s) for model 'dec_0', message: RuntimeError: boom\n\nAt:\n  /m/1/model.py(10)"
    mapped = upstream_error(InferenceServerException(text), "m", "prompt")
    assert mapped.status == grpc.StatusCode.INTERNAL and "boom" not in mapped.message and mapped.param is None
