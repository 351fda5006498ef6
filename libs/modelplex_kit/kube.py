"""Talking to the Kubernetes API server: the client, the namespace, and one list + watch loop.

Shared by the catalog (Model resources) and the engine pools' discovery (EndpointSlices,
InferencePools, Pods). The sync ``kubernetes`` client runs on a daemon thread (a blocked watch
must not hold up a process's exit); :class:`ListWatch` hands every new full set of objects to a
callback, which the callers move onto their event loop.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

_SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

#: object name -> the object as the API server wrote it (JSON)
Objects = dict[str, dict[str, Any]]


def api_client(api_url: str = "") -> client.ApiClient:
    """In the cluster: the pod's service account (token and CA). ``api_url``: a plain URL (kubectl proxy, tests)."""
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
    """The pod's own namespace: its service account's namespace file, else ``POD_NAMESPACE``, else "default"."""
    try:
        with open(_SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return os.environ.get("POD_NAMESPACE") or "default"


@dataclass
class ListWatch:
    """List + watch of one collection on a thread; ``emit`` gets every new full set of objects.

    ``lister`` is a ``kubernetes`` list function with its positional arguments bound (and any
    ``label_selector``/``field_selector``). The watch resumes from the last event's
    resourceVersion after a dropped connection or a server-side timeout, relists on 410 Gone
    and backs off (doubling up to ``backoff_max_seconds``) on any other error.
    """

    lister: Callable[..., Any]
    emit: Callable[[Objects], None]
    what: str = "objects"
    watch_timeout_seconds: int = 240
    backoff_max_seconds: float = 30.0
    stop: threading.Event = field(default_factory=threading.Event)
    resource_version: str | None = None
    objects: Objects = field(default_factory=dict)
    _watch: watch.Watch | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"watch-{self.what}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Ends the loop; an open watch is cut at once (its socket shut), not at its next event."""
        self.stop.set()
        if self._watch is not None:
            self._watch.stop()

    def run(self) -> None:
        backoff = 0.5
        while not self.stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._follow()
                backoff = 0.5
            except ApiException as exc:
                if exc.status == 410:  # our resourceVersion is too old: start over from a fresh list
                    log.info("watch expired (410 Gone); relisting", extra={"what": self.what})
                    self.resource_version = None
                    continue
                log.warning("watch failed", extra={"what": self.what, "status": exc.status, "reason": exc.reason})
            except Exception as exc:  # the API server went away mid-stream, DNS, TLS...
                log.warning("watch interrupted", extra={"what": self.what, "error": f"{type(exc).__name__}: {exc}"})
            self.stop.wait(backoff)
            backoff = min(backoff * 2, self.backoff_max_seconds)

    def _list(self) -> None:
        # Raw JSON, whatever the API: typed clients would turn objects into their model classes.
        listing = json.loads(self.lister(_preload_content=False, _request_timeout=(10, 60)).data)
        self.objects = {item["metadata"]["name"]: item for item in listing.get("items") or []}
        self.resource_version = listing["metadata"]["resourceVersion"]
        if not self.stop.is_set():
            self.emit(dict(self.objects))

    def _follow(self) -> None:
        self._watch = watch.Watch()
        stream = self._watch.stream(
            # Through a partial, which declares no return type: events stay the JSON the API server
            # wrote (typed models would choke on a bookmark's bare metadata).
            functools.partial(self.lister),
            resource_version=self.resource_version,
            timeout_seconds=self.watch_timeout_seconds,
            allow_watch_bookmarks=True,
            # The server ends a watch after timeout_seconds; silence well beyond that is a dead
            # connection (a half-open socket never errors by itself): read again from a new one.
            _request_timeout=(10, self.watch_timeout_seconds + max(5, self.watch_timeout_seconds // 4)),
        )
        for event in stream:
            if self.stop.is_set():
                return
            self._apply(event["type"], event["raw_object"])

    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        metadata = obj["metadata"]
        self.resource_version = metadata["resourceVersion"]
        if kind == "BOOKMARK":
            return
        if kind == "DELETED":
            self.objects.pop(metadata["name"], None)
        else:  # ADDED, MODIFIED
            self.objects[metadata["name"]] = obj
        self.emit(dict(self.objects))
