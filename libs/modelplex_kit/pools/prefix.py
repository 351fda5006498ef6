"""An approximate index of which replicas recently served which prompt prefixes.

A prompt is cut into fixed-size blocks of characters and each block hashed with everything before
it (a chain), so a block's hash stands for the whole prefix up to its end: two prompts share the
first k hashes exactly when they share their first k blocks. The index maps a chain hash to the
few replicas that last served a prompt through it, least recently used evicted past a bound, so
memory stays fixed however many distinct prompts pass. It is approximate on purpose: an engine
evicts its own KV cache on its own schedule, which the index does not see.

Characters, not tokens: the backend of a remote engine does not tokenize, and a block of a few
hundred characters matches a block of tokens closely enough to say where a cache is warm.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

# Replicas remembered per block: a prefix popular enough to be spread by the imbalance bound
# is warm on several replicas.
_REPLICAS_PER_BLOCK = 4


def block_hashes(prompt: str, block_chars: int) -> list[int]:
    """The chain hashes of the prompt's whole blocks (a partial last block is left out: an
    engine caches whole blocks only)."""
    hashes, previous = [], 0
    for start in range(0, len(prompt) - block_chars + 1, block_chars):
        previous = hash((previous, prompt[start : start + block_chars]))
        hashes.append(previous)
    return hashes


class PrefixIndex:
    def __init__(self, max_blocks: int) -> None:
        self._max = max_blocks
        self._blocks: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def matches(self, hashes: list[int], replicas: Iterable[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of the prompt it served recently."""
        matched = dict.fromkeys(replicas, 0)
        alive = set(matched)
        for depth, block in enumerate(hashes, start=1):
            holders = alive.intersection(self._blocks.get(block, ()))
            if not holders:
                break
            for replica in holders:
                matched[replica] = depth
            alive = holders
        return matched

    def record(self, hashes: list[int], replica: str) -> None:
        """The replica is serving this prompt: its blocks are (about to be) in its cache."""
        for block in hashes:
            holders = self._blocks.pop(block, ())
            self._blocks[block] = (replica, *(r for r in holders if r != replica))[:_REPLICAS_PER_BLOCK]
        while len(self._blocks) > self._max:
            self._blocks.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica left the pool (or restarted): its cache is gone."""
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
        return self._sessions.get(hash(key))

    def record(self, key: str, replica: str) -> None:
        self._sessions.pop(hash(key), None)
        self._sessions[hash(key)] = replica
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)

    def forget(self, replica: str) -> None:
        for key in [k for k, r in self._sessions.items() if r == replica]:
            del self._sessions[key]
