"""The gatekeeper's Prometheus series (served on MODELPLEX_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

USAGE_LABELS = ("key", "project", "model")

REQUESTS = Counter(
    "modelplex_gatekeeper_requests_total", "Decisions, by key and outcome.", ("key", "project", "model", "outcome")
)
TOKENS = Counter(
    "modelplex_gatekeeper_tokens_total",
    "Tokens used, by key, project, model and kind (prompt, completion, cached_prompt).",
    (*USAGE_LABELS, "kind"),
)
UNITS = Counter(
    "modelplex_gatekeeper_units_total",
    "Non-token units used (images, audio seconds, characters), by key, project, model and unit.",
    (*USAGE_LABELS, "unit"),
)
REDIS_UP = Gauge("modelplex_gatekeeper_redis_up", "1 while Redis answers, 0 during an outage.")
REDIS_FAILURES = Counter(
    "modelplex_gatekeeper_redis_failures_total",
    "Decisions Redis could not make, by what was done instead (local limiter or refused).",
    ("fallback",),
)
