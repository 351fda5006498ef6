"""Which replica serves a request: the policies a pool can run.

``affinity`` (the default) weighs, in order: the session the client named (``prompt_cache_key``,
``user``) and the longest prompt prefix a replica served recently, both only among replicas whose
load is within ``max_imbalance`` of the least loaded one's, then the least load. The bound keeps one
hot prefix (or one chatty session) from piling onto one replica: past it, the request goes to the
least loaded replica, which then warms its own cache for that prefix. ``least_loaded`` and
``round_robin`` are there to compare against (and for engines without a prefix cache).

A pick costs a few microseconds per replica plus one hash per prompt block (the pool tests measure it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from modelplex_kit.pools.load import ReplicaLoad
from modelplex_kit.pools.prefix import PrefixIndex, SessionIndex, block_hashes
from modelplex_kit.pools.settings import Policy

# Sessions remembered per pool (least recently used forgotten first).
_MAX_SESSIONS = 65536


class Reason(StrEnum):
    """Why a replica was picked (the ``reason`` label of the picks metric)."""

    SESSION = "session"
    PREFIX = "prefix"
    LOAD = "load"
    ROUND_ROBIN = "round_robin"
    RETRY = "retry"
    ONLY = "only"


@dataclass(frozen=True, slots=True)
class PickRequest:
    """What a request offers the picker: its rendered prompt and the session it names (either may be empty)."""

    prompt: str = ""
    session: str = ""


class Candidate(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def load(self) -> ReplicaLoad: ...


@dataclass(frozen=True, slots=True)
class Pick:
    key: str
    reason: Reason


class Picker:
    def __init__(self, policy: Policy, *, max_imbalance: float, block_chars: int, index_blocks: int) -> None:
        self._policy = policy
        self._max_imbalance = max_imbalance
        self._block_chars = block_chars
        self.prefixes = PrefixIndex(index_blocks)
        self.sessions = SessionIndex(_MAX_SESSIONS)
        self._turn = itertools.count()

    def pick(self, candidates: Sequence[Candidate], request: PickRequest) -> Pick:
        """``candidates``: the replicas that may serve (at least one), in a stable order."""
        if len(candidates) == 1:
            chosen, reason = candidates[0].key, Reason.ONLY
        elif self._policy == "round_robin":
            chosen, reason = candidates[next(self._turn) % len(candidates)].key, Reason.ROUND_ROBIN
        elif self._policy == "least_loaded":
            chosen, reason = self._least_loaded(candidates), Reason.LOAD
        else:
            chosen, reason = self._by_affinity(candidates, request)
        return Pick(chosen, reason)

    def forget(self, key: str) -> None:
        """A replica left the pool: whatever was cached on it is gone."""
        self.prefixes.forget(key)
        self.sessions.forget(key)

    def _least_loaded(self, candidates: Sequence[Candidate]) -> str:
        scores = [c.load.score() for c in candidates]
        low = min(scores)
        tied = [c for c, s in zip(candidates, scores, strict=True) if s == low]
        # Ties taken in turn: equal replicas (all idle, no metrics yet) share the work evenly.
        return tied[next(self._turn) % len(tied)].key

    def _by_affinity(self, candidates: Sequence[Candidate], request: PickRequest) -> tuple[str, Reason]:
        scores = {c.key: c.load.score() for c in candidates}
        bound = self._max_imbalance * (min(scores.values()) + 1.0)
        within = [c for c in candidates if scores[c.key] <= bound]
        hashes = block_hashes(request.prompt, self._block_chars) if request.prompt else []
        chosen, reason = self._affine(within, scores, request.session, hashes)
        if chosen is None:
            chosen, reason = self._least_loaded(candidates), Reason.LOAD
        self.prefixes.record(hashes, chosen)
        if request.session:
            self.sessions.record(request.session, chosen)
        return chosen, reason

    def _affine(
        self, within: Sequence[Candidate], scores: dict[str, float], session: str, hashes: list[int]
    ) -> tuple[str | None, Reason]:
        known = self.sessions.get(session) if session else None
        if known is not None and any(c.key == known for c in within):
            return known, Reason.SESSION
        if hashes:
            matched = self.prefixes.matches(hashes, (c.key for c in within))
            longest = max(matched.values(), default=0)
            if longest > 0:
                best = [key for key, depth in matched.items() if depth == longest]
                return min(best, key=scores.__getitem__), Reason.PREFIX
        return None, Reason.LOAD
