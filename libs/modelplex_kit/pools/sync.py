"""Backend replicas of one model agree where prefixes live: each shares its picks, every other learns them.

In a cluster a model's backend runs as several replicas, the edge spreading calls over them round
robin, and each replica's picker learns only from the requests it sees. Left alone, backend B never
learns that backend A put a tenant's prompt on engine replica 2 and puts it elsewhere: the tenant ends
up cached on as many engine replicas as there are backends, their caches evict each other, and prefix
affinity decays to round robin (docs/benchmarks.md, the scheduling section, measures it). So every
pick of the affinity picker — the replica, the prompt's block hashes (the same in every process,
prefix.py) and the session's hash — is published on a Redis pub/sub channel per pool, and every other
backend replica of the pool records it in its own index and session map as if it had picked it: all of
them hold the same view, a few milliseconds apart, whatever the engine (vLLM, llama.cpp's server and
Triton alike; none needs to publish anything).

Costs: one PUBLISH per batch of picks (batched over ``_BATCH_WINDOW_S``), about 8 bytes per prompt
block; each backend replica indexes every replica's picks (its index bound holds). Redis down or slow:
picks go on from each replica's own index (as with one backend), the unsent batch is dropped past a
bound, and the connection is retried. Redis restarted (a quick restart, a failover) leaves the pooled
connections dead though it is back: a command that fails on one is retried at once on a fresh one, so
the next batch is not dropped for it nor the subscription let go. A peer's pick for an engine replica
this backend does not know (another deployment on the same channel, a replica not yet discovered) is
ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from modelplex_kit import telemetry

log = logging.getLogger(__name__)

_MAGIC = b"MPS2"
_HEADER = struct.Struct("<4s8sH")  # magic, origin, records
_RECORD = struct.Struct("<HHQH")  # replica key length, adapter name length, session hash, block hashes
# Picks gathered into one message: a few ms add nothing a request would notice and save a round trip each.
_BATCH_WINDOW_S = 0.002
# Picks waiting while Redis is away, beyond which the oldest are dropped (memory stays bounded).
_MAX_PENDING = 4096
_BACKOFF_S = (0.2, 5.0)
# Leading blocks of one prompt shared (1 MB of characters): a peer needs the prefix, and a record's
# count is 16 bits. Longer prompts are still indexed in full where they were picked.
_MAX_BLOCKS = 4096


@dataclass(frozen=True, slots=True)
class SharedPick:
    """One pick as the other backend replicas learn it."""

    replica: str
    hashes: tuple[int, ...]
    session_hash: int = 0
    #: The LoRA adapter the request ran under there ("": the base): it is loaded on that replica.
    adapter: str = ""


def encode(origin: bytes, picks: Iterable[SharedPick]) -> bytes:
    picks = list(picks)
    parts = [_HEADER.pack(_MAGIC, origin, len(picks))]
    for pick in picks:
        key, adapter = pick.replica.encode(), pick.adapter.encode()
        parts.append(_RECORD.pack(len(key), len(adapter), pick.session_hash, len(pick.hashes)))
        parts.append(key)
        parts.append(adapter)
        parts.append(struct.pack(f"<{len(pick.hashes)}Q", *pick.hashes))
    return b"".join(parts)


def decode(data: bytes) -> tuple[bytes, list[SharedPick]]:
    """(origin, picks); ValueError for anything that is not one of our messages."""
    try:
        magic, origin, count = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC:
            raise ValueError("not a pick message")
        offset, picks = _HEADER.size, []
        for _ in range(count):
            key_length, adapter_length, session_hash, blocks = _RECORD.unpack_from(data, offset)
            offset += _RECORD.size
            key = data[offset : offset + key_length].decode()
            offset += key_length
            adapter = data[offset : offset + adapter_length].decode()
            offset += adapter_length
            hashes = struct.unpack_from(f"<{blocks}Q", data, offset)
            offset += 8 * blocks
            picks.append(SharedPick(key, hashes, session_hash, adapter))
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"bad pick message: {exc}") from exc
    return origin, picks


class PickSync:
    """Publishes this backend's picks and hands every other backend's to ``learn``, over Redis pub/sub.

    ``start()`` on the serving loop; ``share()`` never blocks and never raises."""

    def __init__(self, pool: str, url: str, channel: str, learn: Callable[[SharedPick], None]) -> None:
        self.url, self.channel = url, channel
        self._counted = {d: telemetry.POOL_SYNC.labels(pool, d) for d in ("published", "learned", "dropped")}
        self._learn = learn
        self.origin = os.urandom(8)
        self._pending: list[SharedPick] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.published = 0
        self.learned = 0
        self.dropped = 0
        self.listening = False  # subscribed to the channel, as far as this backend knows

    def start(self) -> None:
        if not self._tasks:
            import redis.asyncio as redis  # only a backend that shares its picks needs the client
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError

            # from_url retries nothing: the first command on a connection Redis closed (restarted since)
            # fails though Redis is up, which dropped a batch, and made the subscriber resubscribe (on
            # reconnecting) and then give that subscription up for a backoff. One immediate retry
            # reconnects (and resubscribes); Redis really away fails it too, into the backoffs below.
            # Connection errors only: a publish that timed out may have gone out.
            def retry_once() -> Retry:
                return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))

            self._redis = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2, retry=retry_once())
            # The subscriber waits as long as nobody picks: no read timeout, a ping instead.
            self._listener = redis.Redis.from_url(
                self.url,
                socket_connect_timeout=2,
                socket_keepalive=True,
                health_check_interval=15,
                retry=retry_once(),
            )
            self._tasks = [
                asyncio.create_task(self._publish_forever(), name=f"pick sync out {self.channel}"),
                asyncio.create_task(self._listen_forever(), name=f"pick sync in {self.channel}"),
            ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if hasattr(self, "_redis"):
            await self._redis.aclose()
            await self._listener.aclose()

    def share(self, pick: SharedPick) -> None:
        if len(pick.hashes) > _MAX_BLOCKS:
            pick = SharedPick(pick.replica, pick.hashes[:_MAX_BLOCKS], pick.session_hash, pick.adapter)
        self._pending.append(pick)
        if len(self._pending) > _MAX_PENDING:
            self._dropped(len(self._pending) - _MAX_PENDING)
            del self._pending[: len(self._pending) - _MAX_PENDING]
        self._wake.set()

    async def _publish_forever(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            await asyncio.sleep(_BATCH_WINDOW_S)
            self._wake.clear()
            batch, self._pending = self._pending, []
            try:
                await self._redis.publish(self.channel, encode(self.origin, batch))
            except Exception as exc:  # any Redis failure: picks go on locally
                self._dropped(len(batch))
                failures += 1
                if failures == 1:
                    log.warning("pool pick sync: cannot publish", extra={"channel": self.channel, "error": repr(exc)})
                await asyncio.sleep(_backoff(failures))
                continue
            self.published += len(batch)
            self._counted["published"].inc(len(batch))
            if failures:
                log.info("pool pick sync: publishing again", extra={"channel": self.channel})
            failures = 0

    async def _listen_forever(self) -> None:
        failures = 0
        while True:
            try:
                async with self._listener.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.listening = True
                    if failures:
                        log.info("pool pick sync: listening again", extra={"channel": self.channel})
                    failures = 0
                    async for message in pubsub.listen():
                        self._receive(message.get("data"))
            except asyncio.CancelledError:
                self.listening = False
                raise
            except Exception as exc:  # any Redis failure: reconnect
                self.listening = False
                failures += 1
                if failures == 1:
                    log.warning("pool pick sync: cannot listen", extra={"channel": self.channel, "error": repr(exc)})
                await asyncio.sleep(_backoff(failures))

    def _receive(self, data: object) -> None:
        if not isinstance(data, bytes):
            return
        try:
            origin, picks = decode(data)
        except ValueError:
            log.debug("pool pick sync: ignored a message that is not ours", extra={"channel": self.channel})
            return
        if origin == self.origin:
            return
        for pick in picks:
            self._learn(pick)
        self.learned += len(picks)
        self._counted["learned"].inc(len(picks))

    def _dropped(self, count: int) -> None:
        self.dropped += count
        self._counted["dropped"].inc(count)


def _backoff(failures: int) -> float:
    low, high = _BACKOFF_S
    return min(high, low * 2 ** (failures - 1))
