"""An approximate index of which replicas recently served which prompt prefixes.

A prompt is cut into fixed-size blocks of characters and each block hashed with everything before
it (a chain), so a block's hash stands for the whole prefix up to its end: two prompts share the
first k hashes exactly when they share their first k blocks. The index maps a chain hash to the
few replicas that last served a prompt through it, least recently used evicted past a bound, so
memory stays fixed however many distinct prompts pass. It is approximate on purpose: an engine
evicts its own KV cache on its own schedule, which the index does not see; it learns how long each
replica keeps a prefix from the engine's answers (``learn``: a prefix it credited that the engine no
longer held), and credits no older blocks to that replica.

Characters, not tokens: the backend of a remote engine does not tokenize, and a block of a few
hundred characters matches a block of tokens closely enough to say where a cache is warm.

The hashes are the same in every process (CRC-32 and Adler-32, chained; str's hash() is salted per
process): backend replicas of one model share their picks (sync.py), so one's hashes must mean the
same prefix to the others. A collision costs one request its cache hit, nothing else.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping

# Replicas remembered per block: a prefix popular enough to be spread by the imbalance bound
# is warm on several replicas.
_REPLICAS_PER_BLOCK = 4
# The shortest horizon learned: one noisy answer cannot make a replica forget everything at once.
_MIN_HORIZON = 8
# How deep a pick looks for its prefix in a replica's LRU order (a bound on the pick's CPU where
# nothing was learned yet and a replica's order is long); deeper counts as this deep.
_MAX_RECENCY = 4096


def block_hashes(prompt: str, block_chars: int) -> list[int]:
    """The chain hashes of the prompt's whole blocks (a partial last block is left out: an
    engine caches whole blocks only)."""
    hashes, low, high = [], 0, 1
    for start in range(0, len(prompt) - block_chars + 1, block_chars):
        block = prompt[start : start + block_chars].encode("utf-8", "surrogatepass")
        low = zlib.crc32(block, low)
        high = zlib.adler32(block, high ^ low)
        hashes.append(high << 32 | low)
    return hashes


def deepest_holders(
    chain: Iterable[int], holders: Mapping[int, Iterable[str]], replicas: Iterable[str]
) -> dict[str, int]:
    """For each replica, how many leading keys of a chain it holds (``holders``: key -> replicas).
    The chain is consumed only as far as some replica still holds it (a lazy one stops early)."""
    matched = dict.fromkeys(replicas, 0)
    alive = set(matched)
    for depth, key in enumerate(chain, start=1):
        still = alive.intersection(holders.get(key, ()))
        if not still:
            break
        for replica in still:
            matched[replica] = depth
        alive = still
    return matched


def stable_hash(text: str) -> int:
    """A 64-bit hash of a whole string (a session key) that every process computes alike."""
    data = text.encode("utf-8", "surrogatepass")
    low = zlib.crc32(data)
    return zlib.adler32(data, low or 1) << 32 | low


class PrefixIndex:
    """``max_blocks``: blocks remembered in all. ``replica_blocks``: blocks one replica's cache holds
    (0: unknown). Each replica's blocks are also kept in the order it last served them, as its
    engine's LRU cache orders them; past the replica's horizon (``replica_blocks``, else what
    ``learn`` found from the engine's own answers) the least recently served are taken as
    evicted, so a prefix the replica no longer holds draws no requests to it."""

    def __init__(self, max_blocks: int, replica_blocks: int = 0) -> None:
        self._max = max_blocks
        self._default_horizon = replica_blocks or max_blocks
        self._blocks: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        self._held: dict[str, OrderedDict[int, None]] = {}
        self._horizon: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def matches(self, hashes: list[int], replicas: Iterable[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of the prompt it served recently."""
        return deepest_holders(hashes, self._blocks, replicas)

    def record(self, hashes: list[int], replica: str) -> None:
        """The replica is serving this prompt: its blocks are (about to be) in its cache."""
        blocks, held = self._blocks, self._held.setdefault(replica, OrderedDict())
        for block in hashes:
            holders = blocks.get(block)
            if holders is None:
                blocks[block] = (replica,)
            else:
                if holders[0] != replica:  # else (a prefix served again where it was) nothing moves but its age
                    kept = (replica, *(r for r in holders if r != replica))
                    blocks[block] = kept[:_REPLICAS_PER_BLOCK]
                    self._unhold(block, kept[_REPLICAS_PER_BLOCK:])
                blocks.move_to_end(block)
            held[block] = None
            held.move_to_end(block)
        while len(blocks) > self._max:
            self._unhold(*blocks.popitem(last=False))
        self._evict_beyond_horizon(replica)

    def _unhold(self, block: int, replicas: tuple[str, ...]) -> None:
        """The index forgot these replicas for this block: so do their LRU orders (memory stays
        bounded by the index's, whether or not a horizon was learned)."""
        for replica in replicas:
            held = self._held.get(replica)
            if held is not None:
                held.pop(block, None)

    def held(self, replica: str) -> int:
        """Blocks in the replica's LRU order."""
        return len(self._held.get(replica, ()))

    def recency(self, block: int, replica: str) -> int:
        """How many distinct blocks the replica served since it last served this one (its position
        from the recent end of the replica's LRU order; the horizon when it is not held, at most
        _MAX_RECENCY)."""
        deepest = min(self.horizon(replica), _MAX_RECENCY)
        for position, held in enumerate(reversed(self._held.get(replica, {}))):
            if held == block or position >= deepest:
                return position
        return deepest

    def horizon(self, replica: str) -> int:
        """Blocks the replica is taken to keep (what its engine's cache holds, as far as known)."""
        return self._horizon.get(replica, self._default_horizon)

    def learn(self, replica: str, recency: int, *, kept: bool) -> None:
        """The engine's answer to a prompt whose prefix the index credited to this replica, when its
        oldest credited block was ``recency`` blocks deep in the replica's LRU order: ``kept`` (the
        engine found it cached) or not (it had evicted it). An eviction at that depth means the
        replica keeps fewer blocks than that; a prefix kept near the horizon, that it may keep more.
        A replica that left the pool meanwhile is not learned about (its late answer is ignored)."""
        if replica not in self._held:
            return
        horizon = self.horizon(replica)
        if not kept and recency < horizon:
            # The first eviction seen sets the horizon; later ones move it halfway, so one answer
            # that missed for another reason (two requests prefilling the same prefix at once)
            # cannot make the replica forget most of what it holds.
            learned = recency if replica not in self._horizon else (horizon + recency) // 2
            self._horizon[replica] = max(learned, _MIN_HORIZON)
            self._evict_beyond_horizon(replica)
        elif kept and recency * 16 >= horizon * 15 and horizon < self._max:
            # Probe upward, a block at a time: blocks past the horizon are never credited, so their
            # hits are never seen; a prefix kept at its edge says the edge may lie further.
            self._horizon[replica] = horizon + 1

    def _evict_beyond_horizon(self, replica: str) -> None:
        held, horizon = self._held[replica], self.horizon(replica)
        while len(held) > horizon:
            evicted, _ = held.popitem(last=False)
            self._drop(evicted, replica)

    def _drop(self, block: int, replica: str) -> None:
        holders = self._blocks.get(block)
        if holders is None or replica not in holders:
            return
        kept = tuple(r for r in holders if r != replica)
        if kept:
            self._blocks[block] = kept
        else:
            del self._blocks[block]

    def forget(self, replica: str) -> None:
        """A replica left the pool (or restarted): its cache is gone, and what was learned of it."""
        self._held.pop(replica, None)
        self._horizon.pop(replica, None)
        for block, holders in list(self._blocks.items()):
            if replica in holders:
                kept = tuple(r for r in holders if r != replica)
                if kept:
                    self._blocks[block] = kept
                else:
                    del self._blocks[block]


class SessionIndex:
    """Session key (``prompt_cache_key``, ``user``) -> the replica that last served it, LRU-bounded.

    Keys are kept as their hashes: a client's long key costs no more memory than a short one."""

    def __init__(self, max_sessions: int) -> None:
        self._max = max_sessions
        self._sessions: OrderedDict[int, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        return self._sessions.get(stable_hash(key))

    def record(self, key: str, replica: str) -> None:
        self.record_hash(stable_hash(key), replica)

    def record_hash(self, key_hash: int, replica: str) -> None:
        """As ``record``, for a key known by its hash (a peer's pick)."""
        self._sessions.pop(key_hash, None)
        self._sessions[key_hash] = replica
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)

    def forget(self, replica: str) -> None:
        for key in [k for k, r in self._sessions.items() if r == replica]:
            del self._sessions[key]
