"""The S3-protocol object store (AWS S3, GCS's interoperability API, MinIO, Ceph RGW), over ``obstore``.

``obstore`` (Rust's ``object_store`` in one wheel, no Python dependencies, imported in milliseconds)
was chosen over ``aiobotocore`` (botocore's 15 packages and ~50 MB, imported in ~1 s); both stream
multipart uploads and ranged GETs. It is imported only when a service opens an ``s3`` store.

- A put shorter than one part is a single PUT; a longer one is a multipart upload of ``part_bytes``
  parts, at most two in flight (so a writer holds about three parts). S3 shows an object only when
  its PUT or its multipart completion lands, so a reader never sees half of one; a stream that fails
  or passes ``max_bytes`` aborts its upload, leaving nothing (no hidden parts either).
- The content type is the object's ``Content-Type``; the expiry is user metadata
  (``x-amz-meta-expires-at``, Unix seconds), read back by ``stat`` and ``list`` (a HEAD per object:
  S3's listing carries no metadata).
- The ETag is S3's: the content's MD5 for a single PUT; for a multipart upload S3 gives the MD5 of
  the parts' MD5s with ``-<parts>``, which is hashed again (MD5) to keep 32 hex characters.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING

from modelplex_kit.objectstore import CHUNK_BYTES, StoredObject, TooLarge

if TYPE_CHECKING:
    from obstore.store import S3Store

EXPIRES_AT = "expires-at"
#: S3's smallest part (all but the last); also where a put turns into a multipart upload.
MIN_PART_BYTES = 5 * 1024 * 1024
_PARTS_IN_FLIGHT = 2
_HEADS_IN_FLIGHT = 16
_HEX32 = re.compile(r"[0-9a-f]{32}")


def check_key(key: str) -> str:
    """The keys the local store takes: relative, no empty, ``.`` or ``..`` segments."""
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"not an object key: {key!r}")
    return key


def etag_of(s3_etag: str | None) -> str:
    raw = (s3_etag or "").strip('"')
    return raw if _HEX32.fullmatch(raw) else hashlib.md5(raw.encode()).hexdigest()  # an id, not security


class S3ObjectStore:
    def __init__(self, store: S3Store, part_bytes: int = 8 * 1024 * 1024) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes must be at least {MIN_PART_BYTES} (S3's smallest part)")
        self._store, self._part_bytes = store, part_bytes

    @classmethod
    def connect(
        cls,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str = "",
        region: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        virtual_hosted: bool = False,
        part_bytes: int = 8 * 1024 * 1024,
        timeout_seconds: float = 300.0,
    ) -> S3ObjectStore:
        """An empty credential or region falls back to the environment (``AWS_*``, an instance role)."""
        from obstore.store import S3Store

        config: dict[str, object] = {"virtual_hosted_style_request": virtual_hosted}
        if endpoint_url:
            config["endpoint"] = endpoint_url
        if region:
            config["region"] = region
        if access_key_id:
            config["access_key_id"] = access_key_id
            config["secret_access_key"] = secret_access_key
        client = {
            "allow_http": endpoint_url.startswith("http://"),
            "connect_timeout": "5s",
            # One GET streams a whole download to a possibly slow client: bound it generously.
            "timeout": f"{int(timeout_seconds)}s",
        }
        store = S3Store(bucket, prefix=prefix.strip("/") or None, config=config, client_options=client)
        return cls(store, part_bytes)

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str = "application/octet-stream",
        expires_at: int = 0,
        max_bytes: int = 0,
    ) -> StoredObject:
        import obstore

        check_key(key)
        stream = _Counted(chunks, max_bytes)
        head = await stream.read_up_to(self._part_bytes)
        attributes = {"Content-Type": content_type, EXPIRES_AT: str(expires_at)}
        if stream.done:
            result = await obstore.put_async(self._store, key, head, attributes=attributes, use_multipart=False)
        else:
            # obstore aborts the multipart upload when the stream raises (TooLarge included).
            result = await obstore.put_async(
                self._store, key, stream.rest(head), attributes=attributes, use_multipart=True,
                chunk_size=self._part_bytes, max_concurrency=_PARTS_IN_FLIGHT,
            )
        return StoredObject(key, stream.size, etag_of(result["e_tag"]), content_type, expires_at)

    async def stat(self, key: str) -> StoredObject | None:
        import obstore

        try:
            result = await obstore.get_async(self._store, check_key(key), options={"head": True})
        except FileNotFoundError:
            return None
        return _stored(key, result.meta, result.attributes)

    async def get(self, key: str, offset: int = 0, length: int = -1) -> AsyncIterator[bytes]:
        import obstore
        from obstore.exceptions import BaseError

        check_key(key)
        if length == 0 or offset < 0:
            if await self.stat(key) is None:
                raise KeyError(key)
            return
        wanted = {"offset": offset} if length < 0 else (offset, offset + length)
        try:
            result = await obstore.get_async(self._store, key, options={"range": wanted})
        except FileNotFoundError:
            raise KeyError(key) from None
        except BaseError:
            # S3 answers 416 to a range starting at or past the end; the contract is "no bytes".
            stored = await self.stat(key)
            if stored is None:
                raise KeyError(key) from None
            if offset >= stored.size:
                return
            raise
        async for chunk in result.stream(min_chunk_size=CHUNK_BYTES):
            yield bytes(chunk)

    async def delete(self, key: str) -> None:
        import obstore

        await obstore.delete_async(self._store, check_key(key))  # S3's DELETE of an absent key succeeds

    async def list(self, prefix: str) -> AsyncIterator[StoredObject]:
        import obstore

        heads = asyncio.Semaphore(_HEADS_IN_FLIGHT)

        async def stat(key: str) -> StoredObject | None:
            async with heads:
                return await self.stat(key)

        # obstore matches whole path segments ("a/b" is under "a", "ab/c" is not), the contract any
        # string prefix: list the prefix's folder and filter. S3 lists keys in UTF-8 byte order,
        # which is Python's str order; each page's HEADs run at once.
        folder = prefix.rpartition("/")[0] or None
        async for page in obstore.list(self._store, folder, chunk_size=1000):
            keys = sorted(meta["path"] for meta in page if meta["path"].startswith(prefix))
            for found in await asyncio.gather(*(stat(key) for key in keys)):
                if found is not None:  # deleted since the listing
                    yield found

    async def close(self) -> None:
        return None  # obstore's client holds no connection that needs closing


def _stored(key: str, meta, attributes) -> StoredObject:
    content_type = attributes.get("Content-Type") or "application/octet-stream"
    expires_at = int(attributes.get(EXPIRES_AT) or 0)
    return StoredObject(key, meta["size"], etag_of(meta["e_tag"]), content_type, expires_at)


class _Counted:
    """A put's stream: counts its bytes and stops it with TooLarge past ``max_bytes``."""

    def __init__(self, chunks: AsyncIterable[bytes], max_bytes: int) -> None:
        self._chunks, self._max = chunks.__aiter__(), max_bytes
        self.size, self.done = 0, False

    async def _next(self) -> bytes | None:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.done = True
            return None
        self.size += len(chunk)
        if self._max and self.size > self._max:
            raise TooLarge(self._max)
        return chunk

    async def read_up_to(self, limit: int) -> bytes:
        """At least ``limit`` bytes, or the whole stream if shorter (then ``done``)."""
        head = bytearray()
        while len(head) < limit and (chunk := await self._next()) is not None:
            head += chunk
        return bytes(head)

    async def rest(self, head: bytes) -> AsyncIterator[bytes]:
        yield head
        while (chunk := await self._next()) is not None:
            yield chunk
