"""Files in the (local) object store: scoped by project, expiring on schedule, swept."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from modelplex_edge.endpoints.files.store import FileStore
from modelplex_kit.objectstore import LocalObjectStore


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_scoped_expiring_and_swept(tmp_path):
    objects = LocalObjectStore(tmp_path)
    files = FileStore(objects)
    now = int(time.time())
    kept = await files.put("alpha", _chunks(b"a\n", b"b\n"), filename="in.jsonl", purpose="batch", expires_at=now + 60)
    gone = await files.put("alpha", _chunks(b"c\n"), filename="old.jsonl", purpose="batch", expires_at=now - 1)
    assert kept.bytes == 4
    assert b"".join([c async for c in files.content("alpha", kept.id)]) == b"a\nb\n"
    # Another project sees nothing; an expired file is gone before the sweep removes its bytes.
    assert await files.get("beta", kept.id) is None
    assert not await files.delete("beta", kept.id)
    assert await files.get("alpha", gone.id) is None
    assert [r.id for r in await files.list("alpha")] == [kept.id]
    assert await files.sweep(now) == 2  # the expired file's content and record
    assert len([obj async for obj in objects.list("files/")]) == 2  # what is left: the kept file and record
    assert await files.delete("alpha", kept.id)
    assert [obj async for obj in objects.list("files/")] == []


async def test_ids_that_are_not_file_ids_are_not_found(tmp_path):
    files = FileStore(LocalObjectStore(tmp_path))
    for bad in ("../etc", "file-x.json", "batch_1", "file-a/b"):
        assert await files.get("alpha", bad) is None
