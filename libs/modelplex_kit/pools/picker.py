"""Which replica serves a request: the policies a pool can run.

``affinity`` (the default) weighs, in order: the longest prompt prefix a replica served recently (and
still holds, as far as its engine's answers taught the index: ``observed``), then the session the
client named (``prompt_cache_key``, ``user``: its replica wins when it holds as much of the prompt as
any), both only among replicas whose backlog (requests waiting for their first token) is within
``max_imbalance`` of the least backlogged one's, then the least load. The bound keeps one hot prefix
(or one chatty session) from piling onto one replica: past it, the request goes to the least loaded
replica, which then warms its own cache for that prefix. It counts requests that would delay a new
one's first token, not requests already decoding: spilling a prefix to a cold replica costs a whole
prefill there, which pays only when the warm replica's queue costs more. ``least_loaded`` and
``round_robin`` are there to compare against (and for engines without a prefix cache).

A pick costs a few microseconds per replica plus one hash per prompt block (the pool tests measure it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from modelplex_kit.pools.adapters import AdapterRef
from modelplex_kit.pools.load import ReplicaLoad
from modelplex_kit.pools.prefix import PrefixIndex, SessionIndex, block_hashes, stable_hash
from modelplex_kit.pools.settings import Policy

# Sessions remembered per pool (least recently used forgotten first).
_MAX_SESSIONS = 65536


class Reason(StrEnum):
    """Why a replica was picked (the ``reason`` label of the picks metric)."""

    SESSION = "session"
    PREFIX = "prefix"
    ENGINE_CACHE = "engine_cache"
    LOAD = "load"
    ROUND_ROBIN = "round_robin"
    RETRY = "retry"
    ONLY = "only"


@dataclass(frozen=True, slots=True)
class PickRequest:
    """What a request offers the picker: its rendered prompt and the session it names (either may be empty)."""

    prompt: str = ""
    session: str = ""
    #: The body of the engine's ``/tokenize`` for this prompt (vLLM's: ``prompt``, or ``messages`` with
    #: ``add_generation_prompt``), for pools that follow their engines' KV-cache events; None: none.
    tokenize: dict[str, Any] | None = None
    #: The LoRA adapter it runs under (None: the base model): it goes where that adapter is loaded.
    adapter: AdapterRef | None = None


class Candidate(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def load(self) -> ReplicaLoad: ...


@dataclass(frozen=True, slots=True)
class Pick:
    key: str
    reason: Reason
    #: Leading prompt blocks the index credited the chosen replica with, and how recently (in
    #: distinct blocks it served since) it had served the oldest of them: what ``observed`` checks.
    credited_blocks: int = 0
    recency: int = 0
    prompt_chars: int = 0
    #: What the pick taught the index (the prompt's block hashes, the session's hash; 0: none):
    #: what the other backend replicas of the model learn from it (sync.py).
    hashes: tuple[int, ...] = ()
    session_hash: int = 0


@dataclass(frozen=True, slots=True)
class CacheUse:
    """What the engine says it found in its prefix cache for a request (an OpenAI answer's
    ``usage.prompt_tokens`` and ``usage.prompt_tokens_details.cached_tokens``)."""

    prompt_tokens: int
    cached_tokens: int


class Picker:
    def __init__(
        self,
        policy: Policy,
        *,
        max_imbalance: float,
        block_chars: int,
        index_blocks: int,
        replica_cache_chars: int = 0,
    ) -> None:
        self._policy = policy
        self._max_imbalance = max_imbalance
        self._block_chars = block_chars
        self.prefixes = PrefixIndex(index_blocks, replica_cache_chars // block_chars)
        self.sessions = SessionIndex(_MAX_SESSIONS)
        self._turn = itertools.count()

    def pick(
        self, candidates: Sequence[Candidate], request: PickRequest, engine_cached: dict[str, int] | None = None
    ) -> Pick:
        """``candidates``: the replicas that may serve (at least one), in a stable order.
        ``engine_cached``: leading blocks of the prompt each replica's engine says it holds (its KV-cache
        events, kv_events.py), weighed where the prefix index knows nothing of the prompt."""
        if len(candidates) == 1:
            chosen, reason = candidates[0].key, Reason.ONLY
        elif self._policy == "round_robin":
            chosen, reason = candidates[next(self._turn) % len(candidates)].key, Reason.ROUND_ROBIN
        elif self._policy == "least_loaded":
            chosen, reason = self._least_loaded(candidates), Reason.LOAD
        else:
            return self._by_affinity(candidates, request, engine_cached)
        return Pick(chosen, reason)

    def prefix_unknown(self, candidates: Sequence[Candidate], request: PickRequest) -> bool:
        """Whether the prompt is long enough to be worth placing (a whole block) and the prefix index
        credits no candidate with its first block: then the engines' own events are worth asking
        (where the index knows it, this backend or a peer placed it, and the index answers alone)."""
        if self._policy != "affinity" or len(candidates) < 2:
            return False
        hashes = block_hashes(request.prompt[: self._block_chars], self._block_chars)
        return bool(hashes) and not any(self.prefixes.matches(hashes, (c.key for c in candidates)).values())

    def observed(self, pick: Pick, use: CacheUse) -> None:
        """The engine's answer to a pick: where the index credited the replica with a prefix, whether
        the engine still held it teaches the index how long that replica keeps prefixes."""
        if pick.credited_blocks == 0 or use.prompt_tokens <= 0 or pick.prompt_chars <= 0:
            return
        # Tokens to characters by the prompt's own ratio; one block of slack for the engine's
        # block boundaries and the last prompt token, which an engine always computes.
        cached_chars = use.cached_tokens * pick.prompt_chars / use.prompt_tokens
        kept = cached_chars >= (pick.credited_blocks - 1) * self._block_chars
        self.prefixes.learn(pick.key, pick.recency, kept=kept)

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

    def _by_affinity(
        self, candidates: Sequence[Candidate], request: PickRequest, engine_cached: dict[str, int] | None
    ) -> Pick:
        scores = {c.key: c.load.score() for c in candidates}
        backlogs = [c.load.backlog() for c in candidates]
        bound = self._max_imbalance * (min(backlogs) + 1.0)
        within = [c for c, backlog in zip(candidates, backlogs, strict=True) if backlog <= bound]
        hashes = block_hashes(request.prompt, self._block_chars) if request.prompt else []
        matched = self.prefixes.matches(hashes, (c.key for c in within)) if hashes else {}
        from_engines = engine_cached is not None and not any(matched.values())
        if from_engines and engine_cached is not None:
            matched = {c.key: engine_cached.get(c.key, 0) for c in within}
        chosen, reason = self._affine(within, scores, request.session, matched)
        if chosen is None:
            chosen, reason = self._least_loaded(candidates), Reason.LOAD
        if from_engines:
            # Token blocks, not the index's character blocks: nothing to check the engine's answer against.
            reason = Reason.ENGINE_CACHE if reason == Reason.PREFIX else reason
            matched = {}
        credited = matched.get(chosen, 0)
        # Before record(), which makes every block of this prompt the replica's most recent.
        recency = self.prefixes.recency(hashes[0], chosen) if credited else 0
        self.prefixes.record(hashes, chosen)
        session_hash = stable_hash(request.session) if request.session else 0
        if session_hash:
            self.sessions.record_hash(session_hash, chosen)
        return Pick(chosen, reason, credited, recency, len(request.prompt), tuple(hashes), session_hash)

    def learn_from_peer(self, replica: str, hashes: Sequence[int], session_hash: int) -> None:
        """Another backend replica of the model sent a prompt (and session) to this replica: the
        index and the session map take it as if this picker had, so both pick alike next time."""
        if hashes:
            self.prefixes.record(list(hashes), replica)
        if session_hash:
            self.sessions.record_hash(session_hash, replica)

    def _affine(
        self, within: Sequence[Candidate], scores: dict[str, float], session: str, matched: dict[str, int]
    ) -> tuple[str | None, Reason]:
        longest = max(matched.values(), default=0)
        known = self.sessions.get(session) if session else None
        # The session's replica, unless another holds more of this prompt: a session (an end user)
        # may move to another shared prompt, whose cache is elsewhere.
        if known is not None and any(c.key == known for c in within) and matched.get(known, 0) == longest:
            return known, Reason.SESSION
        if longest > 0:
            best = [key for key, depth in matched.items() if depth == longest]
            # The least loaded of them, ties to the first in key order: a tie-break by queued prefill
            # spread the hot prefix over more replicas' caches and missed more (docs/benchmarks.md).
            return min(best, key=scores.__getitem__), Reason.PREFIX
        return None, Reason.LOAD
