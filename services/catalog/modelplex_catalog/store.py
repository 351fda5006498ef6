"""The live catalog: the current view plus change notification.

A poller re-reads the file when its content changes. A bad edit is logged and
ignored, so a typo never empties the catalog of a running cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from modelplex_catalog.loader import parse_catalog
from modelplex_kit.catalog_view import CatalogView

log = logging.getLogger(__name__)


class CatalogStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._digest = b""
        self._changed = asyncio.Condition()
        self.view = CatalogView()
        if not self.reload():
            raise SystemExit(f"catalog: cannot load {path}")

    def reload(self) -> bool:
        """Loads the file if its content changed; returns False when it is invalid."""
        try:
            raw = self._path.read_bytes()
        except OSError as exc:
            log.error("catalog file unreadable", extra={"path": str(self._path), "error": str(exc)})
            return False
        digest = hashlib.sha256(raw).digest()
        if digest == self._digest:
            return True
        try:
            view = CatalogView.build(parse_catalog(raw.decode("utf-8")), self.view.revision + 1)
        except ValueError as exc:
            log.error("catalog file invalid; keeping the previous revision", extra={"error": str(exc)})
            return False
        self._digest, self.view = digest, view
        log.info("catalog loaded", extra={"revision": view.revision, "models": [m.id for m in view.models]})
        return True

    async def poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            revision = self.view.revision
            self.reload()
            if self.view.revision != revision:
                async with self._changed:
                    self._changed.notify_all()

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
