"""Models as Kubernetes custom resources (``models.modelplex.io``) as the catalog's source.

The kit's list + watch loop (``modelplex_kit.kube``) lists the namespace's Models, then
watches from the list's resourceVersion, resuming from the last event's after a dropped
connection or a watch timeout, relisting on 410 Gone, backing off on errors. It runs on a
daemon thread (a blocked watch must not hold up the catalog's exit) and hands each full
set of resources to the event loop, where ``ModelSpec`` (the file's loader model)
validates them. Each Model's ``status.conditions[Ready]`` is written back: whether it
is in the catalog and whether its backend is ready.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from kubernetes import client
from pydantic import ValidationError

from modelplex_catalog.loader import ModelSpec, with_bases
from modelplex_catalog.store import CatalogStore
from modelplex_kit.kube import ListWatch, api_client, default_namespace

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "modelplex.io", "v1alpha1", "models"
# The CRD's spec is camelCase, as Kubernetes resources are; the loader's fields are the file's.
_FIELDS = {
    "contextLength": "context_length",
    "defaultMaxTokens": "default_max_tokens",
    "ownedBy": "owned_by",
    "scaleToZero": "scale_to_zero",
    "coldStartTimeout": "cold_start_timeout",
}

Resources = dict[str, dict[str, Any]]
__all__ = ["KubernetesSource", "api_client", "default_namespace", "model_watch", "spec_from_resource"]


def spec_from_resource(resource: dict[str, Any]) -> ModelSpec:
    """A Model resource as the catalog file's entry; raises ValidationError when invalid."""
    spec = {_FIELDS.get(key, key): value for key, value in (resource.get("spec") or {}).items()}
    metadata = resource.get("metadata") or {}
    spec.setdefault("id", metadata.get("name", ""))
    stamp = metadata.get("creationTimestamp")
    if stamp and "created" not in spec:
        spec["created"] = int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    return ModelSpec.model_validate(spec)


def model_watch(
    api: client.CustomObjectsApi,
    namespace: str,
    emit: Callable[[Resources], None],
    watch_timeout_seconds: int = 240,
    backoff_max_seconds: float = 30.0,
) -> ListWatch:
    """List + watch of one namespace's Models (the kit's loop); ``emit`` gets every new full set."""
    lister = functools.partial(api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
    return ListWatch(lister, emit, "models", watch_timeout_seconds, backoff_max_seconds)


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
        self._watch = model_watch(self._api, namespace, self._emit, watch_timeout_seconds, backoff_max_seconds)
        self._resources: Resources = {}
        #: resource name -> why it is not in the catalog
        self._rejected: dict[str, str] = {}
        self._written: dict[str, tuple[str, str, str, int]] = {}
        self.synced = asyncio.Event()

    async def run(self) -> None:
        """Watches until cancelled, writing status after every change."""
        self._loop = asyncio.get_running_loop()
        self._watch.start()
        try:
            async for _view in self._store.views():
                if self.synced.is_set():
                    await self._write_statuses()
        finally:
            self._watch.close()

    async def ready(self) -> bool:
        """For ``serve``: the catalog is SERVING once it has listed the Models (not an empty guess)."""
        return self.synced.is_set()

    def _emit(self, resources: Resources) -> None:  # on the watch thread
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._publish, resources)

    def _publish(self, resources: Resources) -> None:
        self._resources, self._rejected = resources, {}
        specs, names, resource_of = [], set(), {}
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
            specs.append(spec)
            resource_of[spec.id] = name
        # An adapter's base may be another Model: completed once all are read.
        specs, refused = with_bases(specs)
        for model_id, why in refused.items():
            self._rejected[resource_of[model_id]] = why
        self.synced.set()
        self._store.replace(spec.to_proto() for spec in specs)  # a new revision: run()'s loop writes the statuses

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
