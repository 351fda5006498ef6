"""The local-directory object store: one file per object, its metadata in a sidecar JSON file.

A write goes to a temporary name and is renamed into place, so a reader never sees half an
object (nor half its metadata). Blocking file calls run in a worker thread, one chunk at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from modelplex_kit.objectstore import CHUNK_BYTES, StoredObject, TooLarge

_META = ".meta.json"
_PARTIAL = ".partial-"


class LocalObjectStore:
    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self._root / key).resolve()
        if not key or self._root.resolve() not in path.parents or path.name.endswith(_META) or _PARTIAL in path.name:
            raise ValueError(f"not an object key: {key!r}")
        return path

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str = "application/octet-stream",
        expires_at: int = 0,
        max_bytes: int = 0,
    ) -> StoredObject:
        path = self._path(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}{_PARTIAL}{uuid.uuid4().hex}")
        digest, size = hashlib.sha256(), 0
        file = await asyncio.to_thread(partial.open, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if max_bytes and size > max_bytes:
                    raise TooLarge(max_bytes)
                digest.update(chunk)
                await asyncio.to_thread(file.write, chunk)
        except BaseException:
            await asyncio.to_thread(file.close)
            partial.unlink(missing_ok=True)
            raise
        await asyncio.to_thread(file.close)
        stored = StoredObject(key, size, digest.hexdigest()[:32], content_type, expires_at)
        meta = {"etag": stored.etag, "content_type": content_type, "expires_at": expires_at}
        await asyncio.to_thread(self._replace_meta, path, json.dumps(meta))
        await asyncio.to_thread(os.replace, partial, path)
        return stored

    @staticmethod
    def _replace_meta(path: Path, text: str) -> None:
        # Renamed into place as the object is: rewriting the file itself would let a reader of an object being
        # replaced (a batch record polled while its worker updates it) find it empty, and the object absent.
        partial = path.with_name(f"{path.name}{_PARTIAL}meta-{uuid.uuid4().hex}")
        partial.write_text(text)
        os.replace(partial, path.with_name(path.name + _META))

    def _stat(self, key: str, path: Path) -> StoredObject | None:
        try:
            size = path.stat().st_size
            meta = json.loads(path.with_name(path.name + _META).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        return StoredObject(key, size, meta["etag"], meta["content_type"], meta["expires_at"])

    async def stat(self, key: str) -> StoredObject | None:
        return await asyncio.to_thread(self._stat, key, self._path(key))

    async def get(self, key: str, offset: int = 0, length: int = -1) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            file = await asyncio.to_thread(path.open, "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None
        try:
            await asyncio.to_thread(file.seek, offset)
            left = length if length >= 0 else float("inf")
            while left > 0 and (chunk := await asyncio.to_thread(file.read, int(min(CHUNK_BYTES, left)))):
                left -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(file.close)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        for victim in (path, path.with_name(path.name + _META)):
            await asyncio.to_thread(victim.unlink, missing_ok=True)

    def _keys(self, prefix: str) -> list[str]:
        keys = []
        for path in self._root.rglob("*"):
            name = path.name
            if path.is_file() and not name.endswith(_META) and _PARTIAL not in name:
                key = path.relative_to(self._root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    async def list(self, prefix: str) -> AsyncIterator[StoredObject]:
        for key in await asyncio.to_thread(self._keys, prefix):
            if (obj := await self.stat(key)) is not None:
                yield obj

    async def close(self) -> None:
        return None
