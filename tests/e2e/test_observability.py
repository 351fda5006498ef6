"""What operators see: Prometheus metrics on the edge, probes."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_metrics_count_requests_and_tokens(stack, client):
    client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    text = httpx.get(f"http://127.0.0.1:{stack.edge_port}/metrics").text
    assert 'modelplex_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'modelplex_http_request_duration_seconds_bucket{le="0.001",route="/v1/chat/completions"}' in text
    assert 'modelplex_tokens_total{kind="completion",model="smollm2-135m-instruct"}' in text


def test_probes_need_no_key(stack):
    base = f"http://127.0.0.1:{stack.edge_port}"
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
