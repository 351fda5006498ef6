"""Models as Kubernetes custom resources (``models.modelplex.io``) as the catalog's source.

The sync ``kubernetes`` client lists the namespace's Models, then watches from the
list's resourceVersion, resuming from the last event's after a dropped connection or a
watch timeout, relisting on 410 Gone, backing off on errors. It runs on a daemon
thread (a blocked watch must not hold up the catalog's exit) and hands each full set
of resources to the event loop, where ``ModelSpec`` (the file's loader model)
validates them. Each Model's ``status.conditions[Ready]`` is written back: whether it
is in the catalog and whether its backend is ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from modelplex_catalog.loader import ModelSpec
from modelplex_catalog.store import CatalogStore

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "modelplex.io", "v1alpha1", "models"
_SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# The CRD's spec is camelCase, as Kubernetes resources are; the loader's fields are the file's.
_FIELDS = {"contextLength": "context_length", "defaultMaxTokens": "default_max_tokens", "ownedBy": "owned_by"}

Resources = dict[str, dict[str, Any]]


def spec_from_resource(resource: dict[str, Any]) -> ModelSpec:
    """A Model resource as the catalog file's entry; raises ValidationError when invalid."""
    spec = {_FIELDS.get(key, key): value for key, value in (resource.get("spec") or {}).items()}
    metadata = resource.get("metadata") or {}
    spec.setdefault("id", metadata.get("name", ""))
    stamp = metadata.get("creationTimestamp")
    if stamp and "created" not in spec:
        spec["created"] = int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    return ModelSpec.model_validate(spec)


def api_client(api_url: str) -> client.ApiClient:
    """In the cluster: the pod's service account. ``api_url``: a plain URL (kubectl proxy, tests)."""
    if api_url:
        configuration = client.Configuration()
        configuration.host = api_url
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def default_namespace() -> str:
    try:
        with open(_SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return "default"


@dataclass
class ModelWatch:
    """List + watch of one namespace's Models on a thread; ``emit`` gets every new full set."""

    api: client.CustomObjectsApi
    namespace: str
    emit: Callable[[Resources], None]
    watch_timeout_seconds: int = 240
    backoff_max_seconds: float = 30.0
    stop: threading.Event = field(default_factory=threading.Event)
    resource_version: str | None = None
    resources: Resources = field(default_factory=dict)

    def run(self) -> None:
        backoff = 0.5
        while not self.stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                backoff = 0.5
            except ApiException as exc:
                if exc.status == 410:  # our resourceVersion is too old: start over from a fresh list
                    log.info("model watch expired (410 Gone); relisting")
                    self.resource_version = None
                    continue
                log.warning("model watch failed", extra={"status": exc.status, "reason": exc.reason})
            except Exception as exc:  # the API server went away mid-stream, DNS, TLS...
                log.warning("model watch interrupted", extra={"error": f"{type(exc).__name__}: {exc}"})
            self.stop.wait(backoff)
            backoff = min(backoff * 2, self.backoff_max_seconds)

    def _list(self) -> None:
        listing = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        self.resources = {item["metadata"]["name"]: item for item in listing.get("items", [])}
        self.resource_version = listing["metadata"]["resourceVersion"]
        self.emit(dict(self.resources))

    def _watch(self) -> None:
        stream = watch.Watch().stream(
            self.api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            resource_version=self.resource_version,
            timeout_seconds=self.watch_timeout_seconds,
            allow_watch_bookmarks=True,
        )
        for event in stream:
            if self.stop.is_set():
                return
            self._apply(event["type"], event["raw_object"])

    def _apply(self, kind: str, resource: dict[str, Any]) -> None:
        metadata = resource["metadata"]
        self.resource_version = metadata["resourceVersion"]
        if kind == "BOOKMARK":
            return
        if kind == "DELETED":
            self.resources.pop(metadata["name"], None)
        else:  # ADDED, MODIFIED
            self.resources[metadata["name"]] = resource
        self.emit(dict(self.resources))


class KubernetesSource:
    """Feeds the store from Model resources and writes their Ready condition back."""

    def __init__(
        self,
        store: CatalogStore,
        api: client.ApiClient,
        namespace: str,
        watch_timeout_seconds: int = 240,
        backoff_max_seconds: float = 30.0,
    ) -> None:
        self._store = store
        self._api = client.CustomObjectsApi(api)
        self._namespace = namespace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch = ModelWatch(self._api, namespace, self._emit, watch_timeout_seconds, backoff_max_seconds)
        self._resources: Resources = {}
        #: resource name -> why it is not in the catalog
        self._rejected: dict[str, str] = {}
        self._written: dict[str, tuple[str, str, str, int]] = {}
        self.synced = asyncio.Event()

    async def run(self) -> None:
        """Watches until cancelled, writing status after every change."""
        self._loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._watch.run, name="model-watch", daemon=True)
        thread.start()
        try:
            async for _view in self._store.views():
                if self.synced.is_set():
                    await self._write_statuses()
        finally:
            self._watch.stop.set()

    async def ready(self) -> bool:
        """For ``serve``: the catalog is SERVING once it has listed the Models (not an empty guess)."""
        return self.synced.is_set()

    def _emit(self, resources: Resources) -> None:  # on the watch thread
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._publish, resources)

    def _publish(self, resources: Resources) -> None:
        self._resources, self._rejected = resources, {}
        models, names = [], set()
        # Oldest first: when two Models claim a name, the one that had it keeps it.
        for name, resource in sorted(resources.items(), key=lambda kv: _created(kv[1])):
            try:
                spec = spec_from_resource(resource)
            except ValidationError as exc:
                self._rejected[name] = _brief(exc)
                continue
            taken = {spec.id, *spec.aliases} & names
            if taken:
                self._rejected[name] = f"name {sorted(taken)[0]!r} is already used by another Model"
                continue
            names |= {spec.id, *spec.aliases}
            models.append(spec.to_proto())
        self.synced.set()
        self._store.replace(models)  # a new revision: run()'s loop writes the statuses

    async def _write_statuses(self) -> None:
        for name, resource in list(self._resources.items()):
            condition = self._condition(name, resource)
            generation = resource["metadata"].get("generation", 0)
            key = (condition["status"], condition["reason"], condition["message"], generation)
            if self._written.get(name) == key:
                continue
            body = {"status": {"observedGeneration": generation, "conditions": [condition]}}
            try:
                await asyncio.to_thread(
                    self._api.patch_namespaced_custom_object_status,
                    GROUP, VERSION, self._namespace, PLURAL, name, body, _request_timeout=10,
                )  # fmt: skip
            except Exception as exc:  # written again on the next change; never stops the catalog
                log.warning("cannot write Model status", extra={"model": name, "error": f"{type(exc).__name__}"})
                continue
            self._written[name] = key

    def _condition(self, name: str, resource: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        if name in self._rejected:
            status, reason, message = "False", "InvalidSpec", self._rejected[name]
        else:
            model = self._store.view.resolve(spec_from_resource(resource).id)
            if model is None or not model.HasField("ready"):
                status, reason, message = "Unknown", "Probing", "the catalog has not reached the backend yet"
            elif model.ready:
                status, reason, message = "True", "BackendServing", "the backend serves this model"
            else:
                status, reason, message = "False", "BackendNotReady", model.ready_reason
        return {"type": "Ready", "status": status, "reason": reason, "message": message, "lastTransitionTime": now}


def _created(resource: dict[str, Any]) -> str:
    return resource.get("metadata", {}).get("creationTimestamp") or ""


def _brief(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "spec"
    return f"{where}: {first['msg']}" + (f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else "")
