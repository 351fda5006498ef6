"""OpenAI's rate-limit header formats, and the stream client's failure path."""

from __future__ import annotations

import grpc
import pytest

from modelplex.v1 import gatekeeper_pb2 as pb
from modelplex_edge.admission import Ask
from modelplex_edge.gatekeeper_client import GatekeeperAdmission, denial_error, duration, rate_headers
from modelplex_kit.errors import ServiceError
from tests.support.ports import free_port


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0ms"), (120, "120ms"), (999, "999ms"), (1000, "1s"), (1500, "1.5s"), (59_999, "59.999s"),
     (360_000, "6m0s"), (61_500, "1m1.5s"), (3_723_000, "1h2m3s")],
)
def test_durations_in_openai_format(ms, text):
    assert duration(ms) == text


def test_a_429_carries_retry_after_and_every_header():
    reply = pb.AdmitReply(
        limits_requests=True, limits_tokens=True,
        rate_limit=pb.RateLimitState(limit_requests=3, remaining_requests=0, reset_requests_ms=59_100,
                                     limit_tokens=100, remaining_tokens=40, reset_tokens_ms=250),
        denial=pb.Denial(status=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], code="rate_limit_exceeded",
                         type="requests", message="Rate limit reached", retry_after_ms=19_700),
    )
    error = denial_error(reply, Ask(("Bearer k",), "chat.completions", "m"), "k")
    assert error.http.status == 429 and error.envelope()["error"]["type"] == "requests"
    assert error.headers["retry-after"] == "20" and error.headers["retry-after-ms"] == "19700"
    assert error.headers["x-ratelimit-reset-requests"] == "59.1s"
    assert error.headers["x-ratelimit-reset-tokens"] == "250ms"
    assert rate_headers(pb.AdmitReply()) == {}  # a key without limits claims none


async def test_an_unreachable_sidecar_is_a_503_with_retry_after():
    admission = GatekeeperAdmission(f"127.0.0.1:{free_port()}", timeout_seconds=0.5)
    with pytest.raises(ServiceError) as caught:
        await admission.admit(Ask(("Bearer sk-some-key-0123456789",), "chat.completions", "m"))
    await admission.close()
    assert caught.value.http.status == 503 and int(caught.value.headers["retry-after"]) >= 1
    assert "sk-some-key" not in caught.value.message
