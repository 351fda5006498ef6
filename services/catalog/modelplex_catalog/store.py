"""The live catalog: the current view plus change notification.

Models come from a source (the YAML file, polled here, or Kubernetes Model
resources, see ``kube.py``); readiness comes from the backends (``readiness.py``).
Every change to either publishes a new revision to the watchers. A bad edit is
logged and ignored, so a typo never empties the catalog of a running cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from modelplex.v1 import catalog_pb2
from modelplex_catalog.loader import parse_catalog
from modelplex_kit.catalog_view import CatalogView

log = logging.getLogger(__name__)


class CatalogStore:
    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._digest = b""
        self._changed = asyncio.Condition()
        self._models: tuple[catalog_pb2.Model, ...] = ()
        #: backend target -> (ready, reason), as the readiness follower last saw it
        self._readiness: dict[str, tuple[bool, str]] = {}
        self._wakers: set[asyncio.Task] = set()
        self.view = CatalogView()
        if path is not None and not self.reload():
            raise SystemExit(f"catalog: cannot load {path}")

    def reload(self) -> bool:
        """Loads the file if its content changed; returns False when it is invalid."""
        assert self._path is not None
        try:
            raw = self._path.read_bytes()
        except OSError as exc:
            log.error("catalog file unreadable", extra={"path": str(self._path), "error": str(exc)})
            return False
        digest = hashlib.sha256(raw).digest()
        if digest == self._digest:
            return True
        try:
            models = parse_catalog(raw.decode("utf-8"))
        except ValueError as exc:
            log.error("catalog file invalid; keeping the previous revision", extra={"error": str(exc)})
            return False
        if not self.replace(models):
            return False
        self._digest = digest
        return True

    def replace(self, models: Iterable[catalog_pb2.Model]) -> bool:
        """Publishes a new set of models; False (and no change) when two share a name."""
        models = tuple(models)
        try:
            self._publish(models)
        except ValueError as exc:
            log.error("catalog invalid; keeping the previous revision", extra={"error": str(exc)})
            return False
        log.info("catalog loaded", extra={"revision": self.view.revision, "models": [m.id for m in models]})
        return True

    def set_readiness(self, target: str, ready: bool | None, reason: str = "") -> bool:
        """Records a backend's readiness (None: unknown, routed); True when that changed what the catalog says."""
        state = None if ready is None else (ready, reason)
        if self._readiness.get(target) == state:
            return False
        if state is None:
            del self._readiness[target]
        else:
            self._readiness[target] = state
        if any(model.backend_target == target for model in self._models):
            self._publish(self._models)
            return True
        return False

    def forget_readiness(self, targets: Iterable[str]) -> None:
        for target in targets:
            self._readiness.pop(target, None)

    def _publish(self, models: tuple[catalog_pb2.Model, ...]) -> None:
        view = CatalogView.build((self._with_readiness(m) for m in models), self.view.revision + 1)
        self._models, self.view = models, view
        self._notify()

    def _with_readiness(self, model: catalog_pb2.Model) -> catalog_pb2.Model:
        state = self._readiness.get(model.backend_target)
        if state is None:
            return model
        copy = catalog_pb2.Model()
        copy.CopyFrom(model)
        copy.ready, copy.ready_reason = state
        return copy

    def _notify(self) -> None:
        # Wakes the watchers from any code path (sync or async) running on the loop.
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # nobody can be waiting without a loop (tests, startup)
        task = asyncio.ensure_future(self._wake())
        self._wakers.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._wakers.discard)

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload()

    async def views(self) -> AsyncIterator[CatalogView]:
        """The current view, then every later one, until the caller stops."""
        seen = self.view
        yield seen
        while True:
            revision = seen.revision
            async with self._changed:
                await self._changed.wait_for(lambda rev=revision: self.view.revision != rev)
            seen = self.view
            yield seen
