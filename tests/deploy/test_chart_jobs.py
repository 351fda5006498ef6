"""The jobs process in the chart: `python -m modelplex_edge.jobs` (the edge image) with the edge's stores,
catalog and gatekeeper. With every store shared by every pod (Redis and S3) it is a Deployment of its own,
scaled by KEDA on its queue to zero; otherwise a container in each edge pod sharing that pod's stores."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import pytest

from modelplex_edge.jobs.settings import JobsSettings
from modelplex_edge.settings import EdgeSettings
from tests.deploy.test_helm import CHART, RELEASE, container, env, find, one, render

JOBS = f"{RELEASE}-jobs"
EDGE = f"{RELEASE}-edge"
CATALOG_TARGET = f"{RELEASE}-catalog.mpx.svc.cluster.local:50051"
REDIS = {"gatekeeper": {"redis": {"url": "redis://redis.cache:6379/0"}}}
S3 = {"objectStore": {"kind": "s3", "bucket": "modelplex-objects", "secretName": "s3-credentials"}}
SHARED = REDIS | S3
KEDA = {"autoscaling": {"keda": {"enabled": True}}}


def _pod(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return one(objects, "Deployment", name)["spec"]["template"]["spec"]


def _containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["containers"]}


@pytest.fixture(scope="module")
def shared() -> list[dict[str, Any]]:
    return render(copy.deepcopy(SHARED | KEDA))


# ------------------------------------------------------------------ its own Deployment (shared stores)


def test_with_shared_stores_the_jobs_process_is_a_deployment_of_its_own(shared) -> None:
    pod = _pod(shared, JOBS)
    jobs = _containers(pod)["jobs"]
    edge = container(one(shared, "Deployment", EDGE), "edge")
    assert jobs["command"] == ["python", "-m", "modelplex_edge.jobs"]
    assert jobs["image"] == edge["image"]  # the edge's image, its own command
    assert jobs["ports"] == [{"name": "jobs-http", "containerPort": 8090, "protocol": "TCP"}]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        assert jobs[probe]["httpGet"] == {"path": path, "port": "jobs-http"}
    assert "jobs" not in _containers(_pod(shared, EDGE))
    # Nothing routes to it: no Service, no preStop; on SIGTERM its jobs go back to their queues.
    assert not [s for s in find(shared, "Service") if s["metadata"]["name"] == JOBS]
    assert "lifecycle" not in jobs
    assert pod["terminationGracePeriodSeconds"] == int(env(jobs)["MODELPLEX_GRACE_SECONDS"]) + 10


def test_it_reads_the_edges_stores_catalog_and_gatekeeper(shared) -> None:
    jobs = env(_containers(_pod(shared, JOBS))["jobs"])
    edge = env(container(one(shared, "Deployment", EDGE), "edge"))
    stores = {k: v for k, v in edge.items() if "_STORE" in k or "_REDIS_URL" in k or k.endswith("OBJECT_DIR")}
    assert stores and {k: jobs[k] for k in stores} == stores
    assert stores["MODELPLEX_EDGE_RESPONSES_STORE"] == stores["MODELPLEX_EDGE_BATCHES_STORE"] == "redis"
    assert stores["MODELPLEX_EDGE_BATCHES_REDIS_URL"] == "redis://redis.cache:6379/0"
    assert stores["MODELPLEX_EDGE_OBJECT_STORE"] == "s3"
    assert stores["MODELPLEX_EDGE_OBJECT_STORE_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "secret-access-key"}
    }
    assert jobs["MODELPLEX_EDGE_CATALOG_TARGET"] == edge["MODELPLEX_EDGE_CATALOG_TARGET"] == CATALOG_TARGET
    assert jobs["MODELPLEX_EDGE_GATEKEEPER_TARGET"] == edge["MODELPLEX_EDGE_GATEKEEPER_TARGET"]
    assert (jobs["MODELPLEX_JOBS_HOST"], jobs["MODELPLEX_JOBS_PORT"]) == ("0.0.0.0", "8090")


def test_the_rendered_settings_are_the_ones_the_jobs_process_reads(shared, monkeypatch) -> None:
    for name, value in env(_containers(_pod(shared, JOBS))["jobs"]).items():
        monkeypatch.setenv(name, value if isinstance(value, str) else "from-a-secret")
    edge, jobs = EdgeSettings(), JobsSettings()
    assert (edge.responses_store, edge.batches_store, edge.object_store) == ("redis", "redis", "s3")
    assert edge.catalog_target == CATALOG_TARGET
    assert (jobs.host, jobs.port, jobs.demand_target) == ("0.0.0.0", 8090, CATALOG_TARGET)


def test_it_gets_the_gatekeeper_sidecar_from_the_edges_template(shared) -> None:
    jobs_pod, edge_pod = _pod(shared, JOBS), _pod(shared, EDGE)
    assert _containers(jobs_pod)["gatekeeper"] == _containers(edge_pod)["gatekeeper"]
    volumes = {v["name"]: v for v in jobs_pod["volumes"]}
    assert volumes["gatekeeper-keys"] == {v["name"]: v for v in edge_pod["volumes"]}["gatekeeper-keys"]
    assert "gatekeeper-socket" in {m["name"] for m in _containers(jobs_pod)["jobs"]["volumeMounts"]}
    embedded = _pod(render(copy.deepcopy(SHARED) | {"gatekeeper": {**SHARED["gatekeeper"], "mode": "embedded"}}), JOBS)
    assert set(_containers(embedded)) == {"jobs"}
    assert env(_containers(embedded)["jobs"])["MODELPLEX_EDGE_GATEKEEPER_TARGET"] == "embedded"
    assert {"gatekeeper-keys", "gatekeeper-usage"} <= {m["name"] for m in _containers(embedded)["jobs"]["volumeMounts"]}


def test_keda_scales_it_on_its_queue_to_zero(shared) -> None:
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in find(shared, "ScaledObject")}
    obj = scaled[JOBS]
    assert obj["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert (obj["spec"]["minReplicaCount"], obj["spec"]["maxReplicaCount"]) == (0, 4)
    (trigger,) = obj["spec"]["triggers"]
    assert trigger == {
        "type": "external-push",
        "metadata": {"scalerAddress": f"{RELEASE}-catalog.mpx.svc:50051", "key": "jobs", "targetPerReplica": "4"},
    }
    assert "replicas" not in one(shared, "Deployment", JOBS)["spec"]  # KEDA's
    # The edge reports what it queues at once (a jobs Deployment at zero starts), the jobs process its queue.
    assert env(container(one(shared, "Deployment", EDGE), "edge"))["MODELPLEX_EDGE_DEMAND_TARGET"] == CATALOG_TARGET
    assert env(_containers(_pod(shared, JOBS))["jobs"])["MODELPLEX_JOBS_DEMAND_TARGET"] == CATALOG_TARGET
    tuned = render(copy.deepcopy(SHARED | KEDA) | {"jobs": {"autoscaling": {"minReplicas": 1, "targetPerReplica": 2}}})
    obj = one(tuned, "ScaledObject", JOBS)
    assert obj["spec"]["minReplicaCount"] == 1 and obj["spec"]["triggers"][0]["metadata"]["targetPerReplica"] == "2"


def test_without_keda_it_runs_its_replicas_and_reports_nothing() -> None:
    objects = render(copy.deepcopy(SHARED) | {"jobs": {"replicaCount": 2}})
    assert one(objects, "Deployment", JOBS)["spec"]["replicas"] == 2
    assert not find(objects, "ScaledObject")
    assert "MODELPLEX_JOBS_DEMAND_TARGET" not in env(_containers(_pod(objects, JOBS))["jobs"])
    assert "MODELPLEX_EDGE_DEMAND_TARGET" not in env(container(one(objects, "Deployment", EDGE), "edge"))


def test_its_network_policy_lets_nothing_in_but_metrics_and_lets_it_call_the_backends_and_catalog() -> None:
    objects = render(copy.deepcopy(SHARED) | {"models": [{"id": "m", "engine": {"kind": "llamacpp"}}]})
    policies = {p["metadata"]["name"]: p for p in find(objects, "NetworkPolicy")}
    assert policies[f"{RELEASE}-jobs-ingress"]["spec"]["ingress"] == []
    for target in ("catalog", "text"):
        (rule,) = policies[f"{RELEASE}-{target}-ingress"]["spec"]["ingress"]
        callers = [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule["from"]]
        assert callers == ["edge", "jobs"], target
    prometheus = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    monitored = render(
        copy.deepcopy(SHARED)
        | {
            "networkPolicy": {"enabled": True, "metricsFrom": prometheus},
            "monitoring": {"podMonitor": {"enabled": True}},
        }
    )
    policy = one(monitored, "NetworkPolicy", f"{RELEASE}-jobs-ingress")
    assert policy["spec"]["ingress"] == [{"from": prometheus, "ports": [{"port": "jobs-http"}]}]
    (monitor,) = find(monitored, "PodMonitor")
    assert {"port": "jobs-http", "path": "/metrics", "interval": "30s"} in monitor["spec"]["podMetricsEndpoints"]


# ------------------------------------------------------------------ beside each edge (the pod's own stores)


def test_without_shared_stores_it_runs_beside_each_edge_on_the_pods_stores() -> None:
    objects = render()
    assert not find(objects, "Deployment", JOBS) and not find(objects, "ScaledObject")
    pod = _pod(objects, EDGE)
    containers = _containers(pod)
    assert set(containers) == {"edge", "jobs", "gatekeeper"}
    jobs, edge = env(containers["jobs"]), env(containers["edge"])
    assert containers["jobs"]["command"] == ["python", "-m", "modelplex_edge.jobs"]
    assert containers["jobs"]["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "jobs-http"}
    # SQLite files and the local object store on the pod's own volume, which both processes mount.
    assert edge["MODELPLEX_EDGE_RESPONSES_STORE"] == edge["MODELPLEX_EDGE_BATCHES_STORE"] == "sqlite"
    for name in (
        "MODELPLEX_EDGE_RESPONSES_SQLITE_PATH",
        "MODELPLEX_EDGE_BATCHES_SQLITE_PATH",
        "MODELPLEX_EDGE_OBJECT_DIR",
    ):
        assert edge[name] == jobs[name] and edge[name].startswith("/var/lib/modelplex-state/")
    for c in ("edge", "jobs"):
        mounts = {m["name"]: m["mountPath"] for m in containers[c]["volumeMounts"]}
        assert mounts["jobs-state"] == "/var/lib/modelplex-state"
    assert {"name": "jobs-state", "emptyDir": {}} in pod["volumes"]
    # The pod's gatekeeper sidecar serves both.
    assert jobs["MODELPLEX_EDGE_GATEKEEPER_TARGET"] == edge["MODELPLEX_EDGE_GATEKEEPER_TARGET"]


def test_with_redis_alone_responses_are_shared_and_batches_stay_with_their_files() -> None:
    """Batch files live in each pod's local object store: a batch is run beside the edge that took its file."""
    pod = _pod(render(copy.deepcopy(REDIS)), EDGE)
    jobs = env(_containers(pod)["jobs"])
    assert jobs["MODELPLEX_EDGE_RESPONSES_STORE"] == "redis" and jobs["MODELPLEX_EDGE_BATCHES_STORE"] == "sqlite"


def test_disabled_there_is_no_jobs_process() -> None:
    for values in ({"jobs": {"enabled": False}}, SHARED | {"jobs": {"enabled": False}} | KEDA):
        objects = render(copy.deepcopy(values))
        assert not find(objects, "Deployment", JOBS)
        assert "jobs" not in _containers(_pod(objects, EDGE))
        assert not [o for o in find(objects, "ScaledObject") if o["metadata"]["name"] == JOBS]
    edge = env(container(one(render({"jobs": {"enabled": False}}), "Deployment", EDGE), "edge"))
    assert "MODELPLEX_EDGE_BATCHES_STORE" not in edge  # each edge's memory, as before


@pytest.mark.parametrize(
    "values",
    [
        {"jobs": {"replicas": 2}},
        {"jobs": {"port": 0}},
        {"jobs": {"shutdown": {"graceSeconds": 0}}},
        {"jobs": {"autoscaling": {"minReplicas": -1}}},
    ],
)
def test_schema_refuses_bad_jobs_values(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_render_refuses_a_maximum_below_the_minimum() -> None:
    values = SHARED | KEDA | {"jobs": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}}
    with pytest.raises(helm.HelmRenderError, match=r"jobs\.autoscaling\.maxReplicas \(2\) is below minReplicas \(3\)"):
        render(copy.deepcopy(values))
