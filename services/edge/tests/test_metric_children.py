"""The edge's per-request metrics reuse their labelled children instead of calling labels() each time."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
from prometheus_client import Counter
from prometheus_client.metrics import MetricWrapperBase

from modelplex_edge.admission import DevKeyAdmission
from modelplex_edge.app import create_app
from modelplex_edge.settings import EdgeSettings
from modelplex_kit.telemetry import labelled


def test_labelled_returns_the_same_child_that_labels_made():
    metric = Counter("modelplex_test_labelled_total", "a test counter", ["a", "b"])
    child = labelled(metric, "x", "y")
    assert labelled(metric, "x", "y") is child is metric.labels("x", "y")
    child.inc()
    assert metric.labels("x", "y")._value.get() == 1
    assert labelled(metric, "x", "z") is not child


async def test_a_repeated_request_calls_labels_no_more(monkeypatch):
    calls: list[tuple] = []
    original = MetricWrapperBase.labels

    def counted(self, *labels, **kw):
        calls.append(labels)
        return original(self, *labels, **kw)

    monkeypatch.setattr(MetricWrapperBase, "labels", counted)
    app = create_app(EdgeSettings())
    app.state.edge = SimpleNamespace(admission=DevKeyAdmission("k"), settings=EdgeSettings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as edge:
        for _ in range(2):  # the same refusal twice: the same route and status labels
            assert (await edge.post("/v1/embeddings", content=b"{}", headers={"Authorization": "Bearer k"})).is_error
        first = len(calls)
        assert (await edge.post("/v1/embeddings", content=b"{}", headers={"Authorization": "Bearer k"})).is_error
    assert len(calls) == first  # the third request made no labels() call
