"""What each engine replica holds in its KV cache, as the engine itself says: vLLM's KV-cache events.

vLLM started with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557"}'`` publishes, after each engine step, a batch of what its block pool did:
``BlockStored`` (blocks now cached: their hashes, their parent's hash, their tokens),
``BlockRemoved`` (evicted) and ``AllBlocksCleared``. Every backend replica of a model subscribes to
every engine replica of its pool (``EngineCacheFeed``), so each one's view (``EngineCacheView``) is the
same exact picture, whichever backend sent the requests that filled the caches.

The wire (vLLM's ``ZmqEventPublisher``): a ZMQ PUB socket sending three frames per batch, the topic,
an 8-byte big-endian sequence number and the msgpack of ``[ts, [event, ...], data_parallel_rank]``,
each event a map with its ``type`` (msgspec's tagged structs; the array form, tag first, is read too).

The view keys blocks by their tokens, chained (a block's key stands for every token up to its end),
not by the engine's own hashes: those are seeded per engine (``PYTHONHASHSEED`` or a random seed) and
cannot be computed from a prompt here. A request's tokens come from the engine's ``/tokenize`` (the
picker asks for them only when its own prefix index knows nothing of the prompt).

A store that cannot be chained (its parent was stored before this backend subscribed: vLLM reports a block
when it first caches it, not when a request reuses it, unless asked per request with
``kv_cache_report_mode: full``, which this does not ask) teaches nothing; a skipped or restarted sequence
(the publisher drops past its high-water mark; an engine restarted) or an undecodable batch clears that
replica's view, which then holds what is stored from then on. Only the first KV-cache group is followed
(a hybrid model's sliding-window groups store and evict on their own schedule). Memory is bounded per
replica (``max_blocks``, about 400 bytes a block), oldest stored first out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from modelplex_kit import telemetry
from modelplex_kit.pools.prefix import deepest_holders

log = logging.getLogger(__name__)

EngineHash = bytes | int
# A subscriber whose socket failed waits this long before connecting again.
_RECONNECT_S = 1.0


def chain_key(parent: int, tokens: Sequence[int]) -> int:
    """The key of a block of tokens after the block keyed ``parent`` (0: the first block)."""
    data = array("q", tokens).tobytes()
    low = zlib.crc32(data, parent & 0xFFFFFFFF)
    high = zlib.adler32(data, (parent >> 32) ^ low or 1)
    return high << 32 | low


def token_block_keys(tokens: Sequence[int], block_size: int) -> Iterator[int]:
    """The chained keys of the whole blocks of a token sequence (an engine caches whole blocks only),
    one at a time: a lookup that misses early computes no more."""
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = chain_key(parent, tokens[start : start + block_size])
        yield parent


@dataclass(frozen=True, slots=True)
class Stored:
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    #: A block keyed by more than its tokens (a LoRA adapter, an image, a cache salt): no plain prompt matches it.
    plain: bool
    #: The KV-cache group (hybrid models: full attention, sliding window, ... each publish their own).
    group: int = 0


@dataclass(frozen=True, slots=True)
class Removed:
    block_hashes: list[EngineHash]
    group: int = 0


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared

# The fields of each event in vLLM's struct order (the array form), after its tag.
_FIELDS = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def decode_batch(payload: bytes) -> list[Event]:
    """One published batch's events (those this view does not know are left out)."""
    import msgpack

    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if not isinstance(batch, list | tuple) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KV event batch")
    return [event for raw in batch[1] if (event := _event(raw)) is not None]


def _event(raw: Any) -> Event | None:
    if isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        kind = raw[0]
        fields = dict(zip(_FIELDS.get(kind, ()), raw[1:], strict=False))
    elif isinstance(raw, dict):
        kind, fields = raw.get("type", ""), raw
    else:
        return None
    if kind == "BlockStored":
        plain = not fields.get("lora_id") and not fields.get("lora_name") and not any(fields.get("extra_keys") or ())
        return Stored(
            list(fields["block_hashes"]),
            fields.get("parent_block_hash"),
            list(fields["token_ids"]),
            int(fields["block_size"]),
            plain,
            int(fields.get("group_idx") or 0),
        )
    if kind == "BlockRemoved":
        return Removed(list(fields["block_hashes"]), int(fields.get("group_idx") or 0))
    if kind == "AllBlocksCleared":
        return Cleared()
    return None


class EngineCacheView:
    """For each engine replica, the blocks its KV cache holds, keyed by their chained tokens."""

    def __init__(self, max_blocks_per_replica: int) -> None:
        self._max = max_blocks_per_replica
        self._held: dict[str, OrderedDict[EngineHash, int]] = {}  # replica -> engine hash -> chain key
        # chain key -> replica -> how many of its engine hashes chain to that key (two may: the same
        # tokens under a salt the view cannot see); the replica holds the key while any does.
        self._holders: dict[int, dict[str, int]] = {}
        #: Tokens per block, as the engines' stores say (0: nothing stored yet).
        self.block_size = 0

    def held(self, replica: str) -> int:
        return len(self._held.get(replica, ()))

    def apply(self, replica: str, events: Iterable[Event]) -> None:
        # Group 0 only: a hybrid model's other groups (sliding windows) store and evict the same hashes on
        # their own schedule, and skip blocks; the first group is the one a whole prefix lives in.
        for event in events:
            if isinstance(event, Stored):
                if event.group == 0:
                    self._stored(replica, event)
            elif isinstance(event, Removed):
                if event.group == 0:
                    self._removed(replica, event.block_hashes)
            else:
                self.forget(replica)

    def _stored(self, replica: str, event: Stored) -> None:
        held = self._held.setdefault(replica, OrderedDict())
        size = event.block_size
        if not event.plain or size <= 0 or len(event.token_ids) != size * len(event.block_hashes):
            return  # not whole blocks of plain tokens (a partial block, another layout): not a prefix here
        if self.block_size and size != self.block_size:
            return  # one block size per view: the engines of one model share theirs
        if event.parent_block_hash is None:
            parent = 0
        elif (known := held.get(event.parent_block_hash)) is not None:
            parent = known
        else:
            return  # its prefix was stored before this view began: the chain cannot be followed
        self.block_size = size
        for i, engine_hash in enumerate(event.block_hashes):
            parent = chain_key(parent, event.token_ids[i * size : (i + 1) * size])
            if engine_hash in held:
                held.move_to_end(engine_hash)  # stored again (reported once more: vLLM's "full" report mode)
                continue
            held[engine_hash] = parent
            counts = self._holders.setdefault(parent, {})
            counts[replica] = counts.get(replica, 0) + 1
        while len(held) > self._max:
            self._unhold(replica, held.popitem(last=False)[1])

    def _removed(self, replica: str, hashes: Iterable[EngineHash]) -> None:
        held = self._held.get(replica)
        if held is None:
            return
        for engine_hash in hashes:
            key = held.pop(engine_hash, None)
            if key is not None:
                self._unhold(replica, key)

    def _unhold(self, replica: str, key: int) -> None:
        counts = self._holders.get(key)
        if counts is None or replica not in counts:
            return
        counts[replica] -= 1
        if counts[replica] <= 0:
            del counts[replica]
            if not counts:
                del self._holders[key]

    def forget(self, replica: str) -> None:
        """The replica's cache is empty (cleared, restarted) or it left the pool."""
        for key in (self._held.pop(replica, None) or {}).values():
            counts = self._holders.get(key)
            if counts is not None and counts.pop(replica, None) is not None and not counts:
                del self._holders[key]

    def matches(self, tokens: Sequence[int], replicas: Iterable[str]) -> dict[str, int]:
        """For each replica, how many leading whole blocks of these tokens its cache holds."""
        if self.block_size <= 0:
            return dict.fromkeys(replicas, 0)
        return deepest_holders(token_block_keys(tokens, self.block_size), self._holders, replicas)


def events_address(replica_key: str, port: int) -> str:
    """The ZMQ address of a replica's publisher: its host (the key's, without its port) and ``port``."""
    host = replica_key.rsplit(":", 1)[0] if ":" in replica_key else replica_key
    return f"tcp://{host}:{port}"


class EngineCacheFeed:
    """One subscription per engine replica, each applying its replica's events to the shared view."""

    def __init__(self, pool: str, view: EngineCacheView, port: int, topic: str = "") -> None:
        self._pool = pool
        self.view = view
        self._port = port
        self._topic = topic.encode()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def follow(self, replica: str) -> None:
        if replica not in self._tasks:
            self._tasks[replica] = asyncio.create_task(self._subscribe(replica))

    def unfollow(self, replica: str) -> None:
        task = self._tasks.pop(replica, None)
        if task is not None:
            task.cancel()
        self.view.forget(replica)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _subscribe(self, replica: str) -> None:
        import zmq
        import zmq.asyncio

        address = events_address(replica, self._port)
        counted = telemetry.POOL_KV_EVENTS
        while True:
            socket = None
            try:
                socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
                socket.setsockopt(zmq.IPV6, 1)  # dual stack: an IPv6 pod address connects, an IPv4 one too
                socket.setsockopt(zmq.SUBSCRIBE, self._topic)
                socket.setsockopt(zmq.RCVHWM, 100_000)
                socket.connect(address)
                log.info("kv events subscribed", extra={"pool": self._pool, "replica": replica, "address": address})
                await self._receive(replica, socket, counted)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kv events subscription failed", extra={"pool": self._pool, "replica": replica})
            finally:
                if socket is not None:
                    socket.close(linger=0)
            self.view.forget(replica)
            await asyncio.sleep(_RECONNECT_S)

    async def _receive(self, replica: str, socket: Any, counted: Any) -> None:
        last: int | None = None
        while True:
            frames = await socket.recv_multipart()
            if len(frames) < 3:
                continue
            seq = int.from_bytes(frames[-2], "big")
            if last is not None and seq != last + 1:
                # Dropped batches (the publisher's high-water mark) or a restarted engine (its sequence
                # starts again): what the view holds of this replica can no longer be trusted.
                counted.labels(self._pool, "gap").inc()
                self.view.forget(replica)
            last = seq
            try:
                events = decode_batch(frames[-1])
            except Exception:
                # What it removed cannot be known: the view of this replica starts again, as after a gap.
                counted.labels(self._pool, "undecodable").inc()
                self.view.forget(replica)
                continue
            self.view.apply(replica, events)
            counted.labels(self._pool, "batch").inc()
