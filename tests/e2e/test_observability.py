"""What operators see: Prometheus metrics on the edge, probes."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.e2e


def _metric(text: str, prefix: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert lines, f"no sample starting with {prefix}"
    return float(lines[0].rsplit(" ", 1)[1])


def test_metrics_count_requests_tokens_and_latencies_per_model(stack, client):
    client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Count to five."}], max_tokens=8, stream=True
    )
    assert sum(1 for _ in stream) > 2
    text = httpx.get(f"http://127.0.0.1:{stack.edge_port}/metrics").text
    assert 'modelplex_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'modelplex_http_request_duration_seconds_bucket{le="0.001",route="/v1/chat/completions"}' in text
    model = 'model="smollm2-135m-instruct"'
    labels = f'endpoint="chat.completions",{model}'
    assert _metric(text, f"modelplex_generation_tokens_total{{{model}}}") >= 3
    assert _metric(text, f"modelplex_prompt_tokens_total{{{model}}}") > 0
    assert _metric(text, f"modelplex_e2e_request_latency_seconds_count{{{labels}}}") >= 2
    assert _metric(text, f"modelplex_time_to_first_token_seconds_count{{{labels}}}") >= 1
    assert _metric(text, f"modelplex_inter_token_latency_seconds_count{{{labels}}}") >= 1
    assert _metric(text, f"modelplex_num_requests_running{{{labels}}}") == 0


def test_probes_need_no_key(stack):
    base = f"http://127.0.0.1:{stack.edge_port}"
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
