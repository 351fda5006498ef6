"""LoRA adapters on a pool's replicas: which replica holds which adapter, loading one on demand.

A request for an adapter (``PickRequest.adapter``) goes to a replica that holds it, unless those are
much busier than the least backlogged replica (the picker's imbalance bound), then to one with room
for it, where the pool loads it first (vLLM's ``/v1/load_lora_adapter``); it never goes to a replica
that could not take it while another could. A replica holds at most ``pool_adapter_slots`` adapters:
to load another, the one used least recently that nothing runs on (no request of this backend, none
the engine reports running or waiting) is unloaded first. No such one: the request waits for one
(bounded), then gets a 503.

The pool tracks loads itself (it made them): vLLM's ``vllm:lora_requests_info`` is a gauge whose value
is a timestamp and whose label sets pile up, so it is read only for what runs now (the newest series),
to keep another backend's running adapter from being unloaded. Where the view is wrong anyway (the
engine restarted and lost its adapters, another backend replica unloaded one), the engine answers the
adapter's name with a 404: the pool takes it as not loaded, loads it again and retries once.

Several backend replicas learn each other's placements from their shared picks (sync.py), as they
learn prefixes: every one sends an adapter's requests to the replicas that hold it.

``pool_adapter_slots`` also works around a vLLM defect (CPU path, vllm-project/vllm #48421): with every
one of ``--max-loras`` slots filled, requests for the base model run under the adapter in the last slot.
Kept at ``max_loras - 1`` (the chart's default), the last slot is never filled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from modelplex_kit import telemetry
from modelplex_kit.errors import unavailable
from modelplex_kit.pools.load import ReplicaLoad

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """An adapter a request runs under: its name (the engine's model name for it) and its weights."""

    name: str
    source: str


@runtime_checkable
class AdapterLoading(Protocol):
    """A replica client whose engine loads LoRA adapters at run time (vLLM's runtime LoRA endpoints)."""

    async def load_adapter(self, adapter: AdapterRef) -> None:
        """Loads it (an adapter already loaded there counts as loaded); ServiceError when it cannot."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Unloads it (one not loaded there counts as unloaded); ServiceError when the engine fails."""
        ...


class _Candidate(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def load(self) -> ReplicaLoad: ...


@dataclass
class _Held:
    """What one replica holds, as this backend knows it."""

    loaded: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)  # oldest use first
    loading: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    running: collections.Counter[str] = field(default_factory=collections.Counter)
    busy_on_engine: frozenset[str] = frozenset()  # what the engine's metrics say runs or waits there
    # Adapters other backend replicas sent requests for here since the last scrape (their shared picks):
    # in use, though neither this backend's count nor the last scrape shows it yet.
    busy_on_peers: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def occupied(self) -> int:
        return len(self.loaded) + len(self.loading)

    def idle(self) -> list[str]:
        busy = self.busy_on_engine | self.busy_on_peers
        return [name for name in self.loaded if not self.running[name] and name not in busy]


class AdapterPlacement:
    def __init__(self, pool: str, slots: int, wait_seconds: float) -> None:
        self._pool = pool
        self._slots = slots
        self._wait_seconds = wait_seconds
        self._held: dict[str, _Held] = collections.defaultdict(_Held)

    # -- picking -------------------------------------------------------------
    def holds(self, replica: str, name: str) -> bool:
        """Loaded there, or being loaded (a request arriving meanwhile waits for that load, not another)."""
        held = self._held.get(replica)
        return held is not None and (name in held.loaded or name in held.loading)

    def has_room(self, replica: str) -> bool:
        held = self._held.get(replica)
        return held is None or self._slots <= 0 or held.occupied() < self._slots or bool(held.idle())

    def narrow(
        self, candidates: Sequence[_Candidate], name: str, *, prefer_holders: bool, max_imbalance: float
    ) -> list[_Candidate]:
        """The candidates a request for adapter ``name`` may go to: with ``prefer_holders`` (the affinity
        policy), the replicas that hold it unless the least backlogged of them is past the imbalance bound;
        else, or then, those with room to load it. All of them when none has room (it waits for one)."""
        if prefer_holders:
            holders = [c for c in candidates if self.holds(c.key, name)]
            if holders:
                bound = max_imbalance * (min(c.load.backlog() for c in candidates) + 1.0)
                if min(c.load.backlog() for c in holders) <= bound:
                    return holders
        placeable = [c for c in candidates if self.holds(c.key, name) or self.has_room(c.key)]
        return placeable or list(candidates)

    # -- running a request -----------------------------------------------------
    @contextlib.asynccontextmanager
    async def holding(self, replica: str, client: AdapterLoading, adapter: AdapterRef) -> AsyncIterator[None]:
        """The adapter loaded on the replica for as long as the request runs there."""
        held = self._held[replica]
        held.running[adapter.name] += 1  # first: nothing may unload it while it loads
        try:
            await self._ensure(replica, held, client, adapter)
            yield
        finally:
            held.running[adapter.name] -= 1
            if not held.running[adapter.name]:
                del held.running[adapter.name]
                held.changed.set()

    def lost(self, replica: str, name: str) -> None:
        """The engine says it does not have the adapter (it restarted, another backend unloaded it)."""
        held = self._held.get(replica)
        if held is not None and held.loaded.pop(name, 0) is None:
            held.changed.set()

    def learned(self, replica: str, name: str) -> None:
        """Another backend replica ran the adapter there (its shared pick): it is loaded there."""
        held = self._held[replica]
        held.loaded[name] = None
        held.loaded.move_to_end(name)
        held.busy_on_peers.add(name)
        # A view, not a load: past the slots, the oldest idle entries are taken as unloaded by that peer.
        while self._slots > 0 and len(held.loaded) > self._slots and (idle := held.idle()):
            held.loaded.pop(idle[0])

    def engine_says(self, replica: str, busy: frozenset[str]) -> None:
        """What a scrape says runs or waits on the replica under an adapter (any backend's requests)."""
        held = self._held.get(replica)
        if held is not None and held.busy_on_engine != busy:
            held.busy_on_engine = busy
            held.changed.set()

    def peers_counted(self, replica: str) -> None:
        """A scrape tick passed: the engine's figures now show the peers' requests (or could not be read:
        either way they count no longer, so a replica whose metrics fail does not stay busy forever)."""
        held = self._held.get(replica)
        if held is not None and held.busy_on_peers:
            held.busy_on_peers.clear()
            held.changed.set()

    def forget(self, replica: str) -> None:
        self._held.pop(replica, None)

    # -- loads and unloads -----------------------------------------------------
    async def _ensure(self, replica: str, held: _Held, client: AdapterLoading, adapter: AdapterRef) -> None:
        name = adapter.name
        while True:
            if name in held.loaded:
                held.loaded.move_to_end(name)
                telemetry.POOL_ADAPTER_LOADS.labels(self._pool, "hit").inc()
                return
            if name in held.loading:
                await asyncio.shield(held.loading[name])  # its failure is this request's too
                continue
            if self._slots <= 0 or held.occupied() < self._slots:
                await self._load(replica, held, client, adapter)
                return
            victims = held.idle()
            if victims:
                await self._unload(replica, held, client, victims[0])
            else:
                await self._wait_for_room(held)

    async def _load(self, replica: str, held: _Held, client: AdapterLoading, adapter: AdapterRef) -> None:
        loading = held.loading[adapter.name] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        try:
            await client.load_adapter(adapter)
        except Exception as exc:
            telemetry.POOL_ADAPTER_LOADS.labels(self._pool, "failed").inc()
            loading.set_exception(exc)
            loading.exception()  # retrieved: waiters get it; none waiting is no error
            raise
        except BaseException:  # this request was cancelled: a waiting one loads it itself
            loading.set_result(None)
            raise
        else:
            held.loaded[adapter.name] = None
            loading.set_result(None)
            telemetry.POOL_ADAPTER_LOADS.labels(self._pool, "cold").inc()
            telemetry.POOL_ADAPTER_LOAD_SECONDS.labels(self._pool).observe(time.perf_counter() - started)
            log.info("pool adapter loaded", extra={"pool": self._pool, "replica": replica, "adapter": adapter.name})
        finally:
            del held.loading[adapter.name]
            held.changed.set()

    async def _unload(self, replica: str, held: _Held, client: AdapterLoading, name: str) -> None:
        del held.loaded[name]  # at once: no other request picks it meanwhile
        telemetry.POOL_ADAPTER_EVICTIONS.labels(self._pool).inc()
        try:
            await client.unload_adapter(name)
        except Exception:
            # Its slot may still be taken on the engine: the next load there tells (a refusal, a 503).
            log.warning("pool adapter unload failed", extra={"pool": self._pool, "replica": replica, "adapter": name})
        log.info("pool adapter unloaded", extra={"pool": self._pool, "replica": replica, "adapter": name})

    async def _wait_for_room(self, held: _Held) -> None:
        held.changed.clear()
        try:
            async with asyncio.timeout(self._wait_seconds):
                await held.changed.wait()
        except TimeoutError:
            raise unavailable("Every LoRA slot of the model server is busy; retry shortly.", retry_after=2) from None
