"""A procedural stand-in for a fleet of vLLM replicas: the scheduling benchmark's engine.

Not a model. Each replica speaks OpenAI HTTP (``/v1/chat/completions``, ``/v1/completions``,
streamed or not, ``/v1/models``, ``/health``) and exposes vLLM's scheduler metrics under
vLLM's names and types on ``/metrics``, so a picker reads it as it would read vLLM. What it
simulates is what decides time to first token on a real engine:

- a **prefix cache** over fixed-size blocks of prompt tokens (a token is a whitespace-separated
  word; each block's hash chains its predecessor's, as vLLM's do, so a block matches only after
  the same prefix), LRU-evicted beyond a bound of blocks;
- a bound on **running sequences** and a **FIFO queue** behind it;
- **service time** = ``prefill_seconds_per_token`` x the prompt tokens not found in the cache +
  ``decode_seconds_per_token`` x the output tokens; the first token leaves after the prefill and
  one decode step. Prefills take turns, one at a time per replica (a **prefill lane**): prefill
  is compute-bound, so on a GPU one sequence's long prefill delays the next one's first token,
  which is how a cache miss costs other requests too. Decoding sequences run side by side.
  Time passes in ``asyncio.sleep``, so a replica costs almost no CPU.

Simplifications, stated: decoding sequences do not slow each other or the prefills (no shared
batch step), and the prefix cache is a pool apart from the blocks running sequences hold
(``kv_cache_usage_perc`` is the share of ``kv_blocks`` that running sequences' tokens fill), so
nothing is ever preempted.

Like vLLM with ``--kv-events-config``, a replica can publish its prefix cache's **KV-cache events**
(``--events-port``): ``BlockStored`` for each block its prefill adds (its hash, its parent's, its
token ids) and ``BlockRemoved`` for each it evicts, on a ZMQ PUB socket, in vLLM's wire format
(topic, 8-byte sequence number, msgpack of ``[ts, [event, ...], rank]``, events as tagged maps), and
answers vLLM's ``/tokenize`` with the same token ids (a word's id is its CRC-32). Engines publish on one
port of their own host, so with events each replica listens on a loopback address of its own
(127.0.0.2, 127.0.0.3, ...).

Like vLLM with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, a replica serves **runtime LoRA
adapters** (``--lora-slots N``, default 4; 0 turns LoRA off):

- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"[, "load_inplace"]}`` answers 200 with vLLM's text
  ("Success: LoRA adapter '<name>' added successfully.") after ``--lora-load-ms`` (default 300): reading the
  weights from storage onto the device. vLLM does that in its engine core's loop, between two steps, so the replica
  **stalls** meanwhile: the load takes the prefill lane ahead of any queued prefill (it waits only for the prefill
  under way), and no decode step starts until it is done. Loads take turns. A name already loaded is vLLM's 400
  ("... has already been loaded.") unless ``load_inplace`` (a reload: the same cost, the same slot); a load of the
  name under way waits for it first, as vLLM's per-name lock does. **Unlike vLLM**, which takes any number of
  adapters and evicts the least recently used from its CPU cache (``--max-cpu-loras``), reloading it from storage
  on its next request without a word, a load beyond ``N`` adapters is refused, 400 ("max loaded adapters
  reached"): the platform must unload first, so a platform that loses track of what it loaded shows, instead of
  hiding in latency. ``N`` is thus vLLM's ``--max-loras`` and ``--max-cpu-loras`` at once, and as every loaded
  adapter can run, the batch never waits for a LoRA slot.
- ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``: 200 ("... removed successfully."), free of cost; a name not
  loaded is vLLM's 404 ("... cannot be found."). Sequences already running under it finish.
- A request whose ``model`` is a loaded adapter runs under it; a ``model`` that is neither the base (``sim``) nor a
  loaded adapter is vLLM's 404 ("The model `x` does not exist.", type ``NotFoundError``), also while its load is
  under way (vLLM lists an adapter once it is loaded). Errors are OpenAI envelopes carrying vLLM's types and codes.
  With LoRA off, the two routes answer 404 ``{"detail": "Not Found"}``, as vLLM does without runtime updating
  (its routes are not mounted).
- An adapter sequence costs what a base one does (``--lora-overhead``, default 0, adds that share to its prefill
  and decode time), but the prefix cache is **per adapter**, as vLLM's block hashes carry the adapter: each chain
  of block hashes starts from the adapter's name, so a prompt cached under the base (or another adapter) does not
  hit under an adapter. Its KV events carry ``lora_id`` (a number per load, as vLLM's counter gives) and
  ``lora_name``.
- ``GET /v1/models`` lists the base, then each loaded adapter (``root``: its ``lora_path``, ``parent``: the
  base). ``/metrics`` carries vLLM's ``vllm:lora_requests_info`` gauge in vLLM's shape: labels ``max_lora`` (N),
  ``running_lora_adapters`` and ``waiting_lora_adapters`` (the adapters of the sequences holding a slot and of
  those queued for one, comma-joined, sorted), its value the time it was set; a new series for each new label set,
  the stale ones left beside it (so a reader takes the series of the latest value, as it must with vLLM), the 8
  most recent kept. And the simulator's own counters, ``modelplex_sim_`` names: ``lora_loads_total`` (loads done,
  reloads included), ``lora_unloads_total``, ``lora_load_refusals_total{reason}`` (``slots_full``,
  ``already_loaded``, ``invalid``), ``lora_requests_total{lora_name}`` (requests served under each adapter),
  ``model_not_found_total`` and the gauge ``lora_adapters_loaded``.

Every replica runs in one process, one free port each (or ``--ports 8001,8002``):
``python -m bench.engine_sim --replicas 8`` prints ``READY <host:port> <host:port> ...`` once all listen
(``--max-running 4``, ``--lora-slots 2`` etc. set SimParams, each replica the same).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MODEL = "sim"
# Output tokens of a request that sets no max_tokens.
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class SimParams:
    """One replica's engine, in the units vLLM's own knobs use."""

    #: Tokens per KV block (vLLM's --block-size).
    block_tokens: int = 16
    #: Blocks the prefix cache keeps before evicting the least recently used.
    cache_blocks: int = 256
    #: Blocks running sequences' tokens may fill: the denominator of ``vllm:kv_cache_usage_perc``.
    #: Sized so that ``max_running`` of the benchmark's longest sequences fit (nothing is preempted).
    kv_blocks: int = 1024
    #: Sequences generating at once (vLLM's --max-num-seqs); more wait in FIFO order.
    max_running: int = 8
    #: Requests waiting beyond this many get 503 at once (memory stays bounded).
    max_waiting: int = 4096
    #: ~10k prompt tokens/s and ~100 output tokens/s per sequence: an 8B model on one current GPU,
    #: to an order of magnitude (what matters here is prefill's cost relative to decode's).
    prefill_seconds_per_token: float = 0.0001
    decode_seconds_per_token: float = 0.01
    #: Output tokens per streamed chunk (vLLM's --stream-interval): fewer writes, same timing.
    stream_interval: int = 8
    #: LoRA adapters loaded at once (vLLM's --max-loras and --max-cpu-loras in one); 0: LoRA off.
    lora_slots: int = 4
    #: How long loading one adapter takes, in milliseconds; the replica stalls meanwhile.
    lora_load_ms: float = 300.0
    #: An adapter sequence's prefill and decode take this share longer than a base one's (0: the same).
    lora_overhead: float = 0.0

    def service_seconds(self, uncached_prompt_tokens: float, output_tokens: float) -> float:
        """How long a sequence holds its slot once running (the prefill part of it also holds the lane)."""
        return self.prefill_seconds_per_token * uncached_prompt_tokens + self.decode_seconds_per_token * output_tokens

    def requests_per_second(self, uncached_prompt_tokens: float, output_tokens: float) -> float:
        """One replica's throughput for requests of this mean shape: the lane or the slots, whichever binds."""
        lane = 1 / (self.prefill_seconds_per_token * uncached_prompt_tokens)
        return min(lane, self.max_running / self.service_seconds(uncached_prompt_tokens, output_tokens))


def tokens_of(text: str) -> list[str]:
    """The simulator's tokenizer: whitespace-separated words."""
    return text.split()


def chat_text(messages: Iterable[dict]) -> str:
    """A chat rendered the way a chat template does: each message after its role marker, in order."""
    parts = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(f"<|{message.get('role', 'user')}|> {content}")
    return " ".join(parts)


def token_ids(tokens: list[str]) -> list[int]:
    """The ids /tokenize answers and the events carry: a word's CRC-32 (the same in every process)."""
    return [zlib.crc32(token.encode()) for token in tokens]


def block_hashes(tokens: list[str], block_tokens: int, adapter: str | None = None) -> list[int]:
    """One hash per full block, each chained to the one before (a block is only reused after the same prefix);
    under a LoRA adapter the chain starts from its name (its blocks are its own, as vLLM keys them)."""
    hashes, previous = [], 0 if adapter is None else hash(("lora", adapter))
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        previous = hash((previous, *tokens[start : start + block_tokens]))
        hashes.append(previous)
    return hashes


class PrefixCache:
    """Block hashes, least recently used first; bounded in blocks."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks are cached (those are touched, as a hit keeps a block warm)."""
        matched = 0
        for h in hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            matched += 1
        return matched

    def held(self, hashes: list[int]) -> int:
        """How many leading blocks are cached, touching nothing (the benchmark's probe)."""
        matched = 0
        for h in hashes:
            if h not in self._blocks:
                break
            matched += 1
        return matched

    def insert(self, hashes: list[int]) -> tuple[list[int], list[int]]:
        """Caches the blocks; returns the positions (in ``hashes``) of those it did not hold before, and
        the hashes it evicted to make room (what a KV-cache event publisher reports)."""
        added, evicted = [], []
        for i, h in enumerate(hashes):
            if h not in self._blocks:
                added.append(i)
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            evicted.append(self._blocks.popitem(last=False)[0])
        return added, evicted


class EventPublisher:
    """vLLM's ZmqEventPublisher, as a subscriber sees it: one batch per cache change."""

    def __init__(self, address: str) -> None:
        import zmq

        self._socket = zmq.Context.instance().socket(zmq.PUB)
        self._socket.bind(address)
        self._seq = 0
        self._noblock = zmq.NOBLOCK

    def publish(self, events: list[dict]) -> None:
        import msgpack

        payload = msgpack.packb([time.time(), events, 0])
        # A PUB socket drops past its high-water mark rather than block (a slow subscriber loses batches).
        self._socket.send_multipart((b"", self._seq.to_bytes(8, "big"), payload), flags=self._noblock)
        self._seq += 1

    def close(self) -> None:
        self._socket.close(linger=0)


def cache_events(
    tokens: list[str],
    hashes: list[int],
    added: list[int],
    evicted: list[int],
    block_tokens: int,
    adapter: Adapter | None = None,
) -> list[dict]:
    """The BlockStored (one per added block, chained on its parent) and BlockRemoved events of an insert."""
    events: list[dict] = []
    for i in added:
        block = tokens[i * block_tokens : (i + 1) * block_tokens]
        events.append(
            {
                "type": "BlockStored",
                "block_hashes": [hashes[i]],
                "parent_block_hash": hashes[i - 1] if i else None,
                "token_ids": token_ids(block),
                "block_size": block_tokens,
                "lora_id": None if adapter is None else adapter.lora_id,
                "medium": "GPU",
                "lora_name": None if adapter is None else adapter.name,
            }
        )
    if evicted:
        events.append({"type": "BlockRemoved", "block_hashes": evicted, "medium": "GPU"})
    return events


class Saturated(Exception):
    """The replica's queue is full."""


@dataclass(frozen=True)
class Adapter:
    """A loaded LoRA adapter, as vLLM's LoRARequest names it."""

    name: str
    path: str
    lora_id: int
    loaded_at: float


class LoadRefused(Exception):
    """A LoRA load vLLM (or the simulator's slot bound) answers with an error."""

    def __init__(self, status: int, message: str, kind: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.reason = status, message, kind, reason


class Lane:
    """One holder at a time, first come first served, except that an urgent taker (a LoRA load: in vLLM a call
    the engine core serves between two steps) goes before every queued one."""

    def __init__(self) -> None:
        self._busy = False
        self._queues: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (deque(), deque())

    @contextlib.asynccontextmanager
    async def hold(self, *, urgent: bool = False) -> AsyncIterator[None]:
        await self._acquire(self._queues[0 if urgent else 1])
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, queue: deque[asyncio.Future[None]]) -> None:
        if not self._busy and not any(self._queues):
            self._busy = True
            return
        turn = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn  # handed over by _release, still busy
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()
            else:
                queue.remove(turn)
            raise

    def _release(self) -> None:
        for queue in self._queues:
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self._busy = False


@dataclass
class Admission:
    """What the scheduler decided for one sequence once it got a slot."""

    prompt_tokens: int
    cached_tokens: int

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class Replica:
    """One simulated engine: slots, a FIFO queue, the prefix cache, LoRA adapters and vLLM's metrics."""

    #: Stale ``vllm:lora_requests_info`` series kept beside the current one (vLLM keeps them all).
    LORA_INFO_SERIES = 8

    def __init__(self, params: SimParams) -> None:
        self.params = params
        self.cache = PrefixCache(params.cache_blocks)
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._held_tokens = 0
        self._prefill_lane = Lane()
        self._stepping = asyncio.Event()  # clear while a LoRA load stalls the engine
        self._stepping.set()
        self.adapters: dict[str, Adapter] = {}  # loaded, in the order they were (first) loaded
        self._loading: dict[str, asyncio.Future[None]] = {}  # names being loaded: each holds a slot
        self._lora_ids = 0
        self._adapters_running: dict[str, int] = {}
        self._adapters_waiting: dict[str, int] = {}
        self._lora_info_series: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._lora_info_time = 0.0
        self.events: EventPublisher | None = None  # set by serve() with an events port
        self.host = "127.0.0.1"
        self.port = 0  # set by serve()
        self.runner: web.AppRunner | None = None
        self.registry = CollectorRegistry()
        labels = {"model_name": MODEL, "engine": "0"}
        self.m_running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.m_waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.m_kv = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.m_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        self.m_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            list(labels),
            registry=self.registry,
        ).labels(**labels)
        # The simulator's own counters (not vLLM's): what the benchmark reads of adapter placement.
        self.m_lora_loads = Counter(
            "modelplex_sim_lora_loads", "LoRA adapter loads done (reloads included).", registry=self.registry
        )
        self.m_lora_unloads = Counter("modelplex_sim_lora_unloads", "LoRA adapter unloads.", registry=self.registry)
        self.m_lora_refusals = Counter(
            "modelplex_sim_lora_load_refusals",
            "LoRA adapter loads refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("slots_full", "already_loaded", "invalid"):
            self.m_lora_refusals.labels(reason=reason)
        self.m_lora_requests = Counter(
            "modelplex_sim_lora_requests",
            "Requests under each LoRA adapter (its name found loaded).",
            ["lora_name"],
            registry=self.registry,
        )
        self.m_not_found = Counter(
            "modelplex_sim_model_not_found", "Requests for a model neither the base nor loaded.", registry=self.registry
        )
        self.m_loaded = Gauge("modelplex_sim_lora_adapters_loaded", "LoRA adapters loaded now.", registry=self.registry)
        self.m_lora_info = None
        if params.lora_slots > 0:  # vLLM has the gauge only with LoRA enabled
            self.m_lora_info = Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                registry=self.registry,
            )
            self._publish_lora_info()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- LoRA adapters ---------------------------------------------------------
    def adapter(self, model: str) -> Adapter | None:
        """The loaded adapter a request's ``model`` names (None: the base); KeyError: neither."""
        if model == MODEL:
            return None
        return self.adapters[model]

    async def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> Adapter:
        """Loads (or with ``inplace`` reloads) an adapter, stalling the engine for ``lora_load_ms``; LoadRefused."""
        if not name or not path:
            raise LoadRefused(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", "invalid")
        while name in self._loading:  # vLLM's per-name lock: the second load sees the first one's outcome
            await asyncio.shield(self._loading[name])
        if name in self.adapters and not inplace:
            message = f"The lora adapter '{name}' has already been loaded."
            raise LoadRefused(400, message, "InvalidUserInput", "already_loaded")
        if name not in self.adapters and len(self.adapters.keys() | self._loading.keys()) >= self.params.lora_slots:
            message = (
                f"max loaded adapters reached ({self.params.lora_slots}): unload one before loading '{name}' "
                f"(loaded: {', '.join(self.adapters)})"
            )
            raise LoadRefused(400, message, "BadRequestError", "slots_full")
        done = self._loading[name] = asyncio.get_running_loop().create_future()
        try:
            async with self._prefill_lane.hold(urgent=True):
                self._stepping.clear()
                try:
                    await asyncio.sleep(self.params.lora_load_ms / 1000)
                finally:
                    self._stepping.set()
            self._lora_ids += 1
            adapter = self.adapters[name] = Adapter(name, path, self._lora_ids, time.time())  # a reload keeps its place
            self.m_lora_loads.inc()
            self.m_loaded.set(len(self.adapters))
            return adapter
        finally:
            del self._loading[name]
            done.set_result(None)

    async def unload_adapter(self, name: str) -> None:
        """Unloads an adapter (its running sequences finish); KeyError if it is not loaded."""
        while name in self._loading:
            await asyncio.shield(self._loading[name])
        del self.adapters[name]
        self.m_lora_unloads.inc()
        self.m_loaded.set(len(self.adapters))

    def refused(self, reason: str) -> None:
        self.m_lora_refusals.labels(reason=reason).inc()

    def _count_adapter(self, adapter: Adapter | None, *, waiting: int = 0, running: int = 0) -> None:
        """A sequence under ``adapter`` joins (+1) or leaves (-1) the queue or the running ones."""
        if adapter is None or self.m_lora_info is None:
            return
        for counts, change in ((self._adapters_waiting, waiting), (self._adapters_running, running)):
            n = counts.get(adapter.name, 0) + change
            if n:
                counts[adapter.name] = n
            else:
                counts.pop(adapter.name, None)
        self._publish_lora_info()

    def _publish_lora_info(self) -> None:
        """vLLM's shape: one series per label set, its value the time it was last set; stale ones stay (bounded)."""
        assert self.m_lora_info is not None
        labels = (
            str(self.params.lora_slots),
            ",".join(sorted(self._adapters_waiting)),
            ",".join(sorted(self._adapters_running)),
        )
        if self._lora_info_series and next(reversed(self._lora_info_series)) == labels:
            return
        # Strictly increasing, so the latest series is the current one even within one clock tick.
        self._lora_info_time = max(time.time(), self._lora_info_time + 1e-6)
        self.m_lora_info.labels(*labels).set(self._lora_info_time)
        self._lora_info_series[labels] = None
        self._lora_info_series.move_to_end(labels)
        while len(self._lora_info_series) > self.LORA_INFO_SERIES:
            self.m_lora_info.remove(*self._lora_info_series.popitem(last=False)[0])

    # -- sequences ---------------------------------------------------------------
    async def generate(
        self, prompt: list[str], max_tokens: int, adapter: Adapter | None = None
    ) -> AsyncIterator[Admission | int]:
        """Yields the Admission once its prefill starts, then counts of tokens as they are generated."""
        await self._acquire_slot(adapter)
        held = len(prompt) + max_tokens
        self._hold(held)
        slower = 1 + (self.params.lora_overhead if adapter is not None else 0)
        try:
            async with self._prefill_lane.hold():  # first come first served, LoRA loads first
                admission = self._schedule(prompt, adapter)
                yield admission
                await asyncio.sleep(self.params.prefill_seconds_per_token * admission.uncached_tokens * slower)
                self._insert(prompt, adapter)
            left = max_tokens
            while left > 0:  # the first token alone (time to first token), then stream_interval at a time
                step = 1 if left == max_tokens else min(left, self.params.stream_interval)
                await self._stepping.wait()  # no step starts while a LoRA load stalls the engine
                await asyncio.sleep(self.params.decode_seconds_per_token * step * slower)
                left -= step
                yield step
        finally:
            self._count_adapter(adapter, running=-1)
            self._hold(-held)
            self._release_slot()

    def _insert(self, prompt: list[str], adapter: Adapter | None) -> None:
        hashes = block_hashes(prompt, self.params.block_tokens, None if adapter is None else adapter.name)
        added, evicted = self.cache.insert(hashes)
        if self.events is not None and (added or evicted):
            self.events.publish(cache_events(prompt, hashes, added, evicted, self.params.block_tokens, adapter))

    def _schedule(self, prompt: list[str], adapter: Adapter | None) -> Admission:
        """The prefix is looked up when the prefill starts (as vLLM's scheduler does), not on arrival."""
        hashes = block_hashes(prompt, self.params.block_tokens, None if adapter is None else adapter.name)
        matched = self.cache.match(hashes)
        # As vLLM: the last prompt token is always computed (its logits give the first output token).
        cached = min(matched * self.params.block_tokens, max(0, len(prompt) - 1))
        self.m_queries.inc(len(prompt))
        self.m_hits.inc(cached)
        return Admission(prompt_tokens=len(prompt), cached_tokens=cached)

    async def _acquire_slot(self, adapter: Adapter | None = None) -> None:
        if self.running < self.params.max_running and not self._waiting:
            self.running += 1
            self._publish()
            self._count_adapter(adapter, running=+1)
            return
        if len(self._waiting) >= self.params.max_waiting:
            raise Saturated
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._publish()
        self._count_adapter(adapter, waiting=+1)
        try:
            await turn  # the slot is handed over by _release_slot, already counted as running
        except asyncio.CancelledError:
            self._count_adapter(adapter, waiting=-1)
            if turn.done() and not turn.cancelled():
                self._release_slot()  # handed a slot just as the client left: pass it on
            else:
                self._waiting.remove(turn)
                self._publish()
            raise
        self._count_adapter(adapter, waiting=-1, running=+1)

    def _release_slot(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self._publish()
                return
        self.running -= 1
        self._publish()

    def _hold(self, tokens: int) -> None:
        self._held_tokens += tokens
        blocks = math.ceil(self._held_tokens / self.params.block_tokens)
        self.m_kv.set(min(1.0, blocks / self.params.kv_blocks))

    def _publish(self) -> None:
        self.m_running.set(self.running)
        self.m_waiting.set(len(self._waiting))


# -- OpenAI HTTP -------------------------------------------------------------
def _usage(admission: Admission, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": admission.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": admission.prompt_tokens + completion_tokens,
        # vLLM's --enable-prompt-tokens-details
        "prompt_tokens_details": {"cached_tokens": admission.cached_tokens},
    }


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _error(status: int, message: str, kind: str, *, param: str | None = None, code: int | None = None) -> web.Response:
    """An OpenAI error envelope (vLLM's own errors carry their HTTP status as ``code``)."""
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)


def _lora_off() -> web.Response:
    """What vLLM answers on a LoRA route it has not mounted (no runtime updating): FastAPI's 404."""
    return web.json_response({"detail": "Not Found"}, status=404)


class ReplicaApp:
    """The HTTP face of one Replica."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_post("/tokenize", self.tokenize)
        self.app.router.add_post("/v1/load_lora_adapter", self.load_lora_adapter)
        self.app.router.add_post("/v1/unload_lora_adapter", self.unload_lora_adapter)
        # The simulator's own probe, not vLLM's: how much of a chat its prefix cache holds now.
        self.app.router.add_post("/sim/cached", self.cached)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        card = {"object": "model", "owned_by": "engine_sim", "max_model_len": 1 << 20}
        data = [card | {"id": MODEL, "created": 0, "root": MODEL, "parent": None}]
        data += [
            card | {"id": a.name, "created": int(a.loaded_at), "root": a.path, "parent": MODEL}
            for a in self.replica.adapters.values()
        ]
        return web.json_response({"object": "list", "data": data})

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's ``/v1/load_lora_adapter``: ``{"lora_name", "lora_path"[, "load_inplace"]}`` -> 200 text."""
        if self.replica.params.lora_slots <= 0:
            return _lora_off()
        try:
            body = await request.json()
            name, path, inplace = body.get("lora_name"), body.get("lora_path"), bool(body.get("load_inplace"))
        except (ValueError, TypeError, AttributeError) as exc:
            self.replica.refused("invalid")
            return _error(400, f"bad request: {exc!r}", "BadRequestError", code=400)
        try:
            await self.replica.load_adapter(str(name or ""), str(path or ""), inplace=inplace)
        except LoadRefused as refusal:
            self.replica.refused(refusal.reason)
            return _error(refusal.status, refusal.message, refusal.kind, code=refusal.status)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """vLLM's ``/v1/unload_lora_adapter``: ``{"lora_name"}`` -> 200 text, or 404 for a name not loaded."""
        if self.replica.params.lora_slots <= 0:
            return _lora_off()
        try:
            name = (await request.json()).get("lora_name")
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, f"bad request: {exc!r}", "BadRequestError", code=400)
        if not name:
            return _error(
                400, "either 'lora_name' and 'lora_int_id' needs to be provided.", "InvalidUserInput", code=400
            )
        try:
            await self.replica.unload_adapter(str(name))
        except KeyError:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", code=404)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.replica.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/tokenize``: ``{"messages": [...]}`` or ``{"prompt": "..."}`` -> ``{"tokens": [...]}``."""
        try:
            body = await request.json()
            text = chat_text(body["messages"]) if "messages" in body else str(body["prompt"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _error(400, f"bad request: {exc!r}", "invalid_request_error")
        ids = token_ids(tokens_of(text))
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": 1 << 20})

    async def cached(self, request: web.Request) -> web.Response:
        """``{"messages": [...][, "model": adapter]}`` -> ``{"cached_tokens": n}``: the leading tokens its cache
        holds, under the base or the adapter named (loaded or not: blocks outlive an unload)."""
        try:
            body = await request.json()
            tokens = tokens_of(chat_text(body["messages"]))
            model = body.get("model") or MODEL
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _error(400, f"bad request: {exc!r}", "invalid_request_error")
        block = self.replica.params.block_tokens
        hashes = block_hashes(tokens, block, None if model == MODEL else str(model))
        return web.json_response({"cached_tokens": self.replica.cache.held(hashes) * block})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _answer(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            text = chat_text(body["messages"]) if chat else str(body["prompt"])
            limit = body.get("max_tokens", body.get("max_completion_tokens"))
            max_tokens = DEFAULT_MAX_TOKENS if limit is None else int(limit)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _error(400, f"bad request: {exc!r}", "invalid_request_error")
        if max_tokens < 1:
            return _error(400, "max_tokens must be at least 1", "invalid_request_error")
        model = str(body.get("model") or MODEL)
        try:
            adapter = self.replica.adapter(model)
        except KeyError:
            self.replica.m_not_found.inc()
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", param="model", code=404)
        if adapter is not None:
            self.replica.m_lora_requests.labels(lora_name=adapter.name).inc()
        run = Run(chat=chat, model=model)
        generation = self.replica.generate(tokens_of(text), max_tokens, adapter)
        try:
            if body.get("stream"):
                return await run.stream(request, generation)
            return await run.whole(generation)
        except Saturated:
            return _error(503, "the simulated engine's queue is full", "server_error")
        finally:
            await generation.aclose()


@dataclass
class Run:
    """One request's answer, in chat or legacy-completions shape."""

    chat: bool
    model: str

    def _choice(self, text: str, finish: str | None, *, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        return {"index": 0, key: {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}

    def _object(self, *, chunk: bool) -> str:
        kind = "chat.completion" if self.chat else "text_completion"
        return kind + (".chunk" if chunk and self.chat else "")

    def _frame(self, choices: list, usage: dict | None = None) -> dict:
        out = {"id": "cmpl-sim", "object": self._object(chunk=True), "created": int(time.time()), "model": self.model}
        return out | {"choices": choices} | ({"usage": usage} if usage is not None else {})

    async def whole(self, generation: AsyncIterator[Admission | int]) -> web.Response:
        admission, produced = None, 0
        async for event in generation:
            if isinstance(event, Admission):
                admission = event
            else:
                produced += event
        assert admission is not None
        return web.json_response(
            {
                "id": "cmpl-sim",
                "object": self._object(chunk=False),
                "created": int(time.time()),
                "model": self.model,
                "choices": [self._choice("tok " * produced, "length", delta=False)],
                "usage": _usage(admission, produced),
            }
        )

    async def stream(self, request: web.Request, generation: AsyncIterator[Admission | int]) -> web.StreamResponse:
        first = await anext(generation)  # queued until scheduled; Saturated before any byte is sent
        assert isinstance(first, Admission)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        produced = 0
        async for step in generation:
            assert isinstance(step, int)
            produced += step
            await response.write(_sse(self._frame([self._choice("tok " * step, None, delta=True)])))
        await response.write(_sse(self._frame([self._choice("", "length", delta=True)])))
        await response.write(_sse(self._frame([], _usage(first, produced))))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def serve(
    params: SimParams, replicas: int, host: str = "127.0.0.1", events_port: int = 0, ports: list[int] | None = None
) -> list[Replica]:
    """Starts ``replicas`` replicas in this event loop, each on a free port (``Replica.port``) or on the given
    ``ports``; with an ``events_port``, each on its own loopback address, publishing its KV-cache events on
    that port."""
    started = []
    for i in range(replicas):
        replica = Replica(params)
        replica.host = f"127.0.0.{i + 2}" if events_port else host
        if events_port:
            replica.events = EventPublisher(f"tcp://{replica.host}:{events_port}")
        runner = web.AppRunner(ReplicaApp(replica).app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, replica.host, ports[i] if ports else 0).start()
        replica.port = runner.addresses[0][1]
        replica.runner = runner
        started.append(replica)
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--events-port", type=int, default=0, help="publish KV-cache events on this port (0: none)")
    parser.add_argument("--ports", default="", help="comma-separated ports, one per replica (default: free ones)")
    defaults = SimParams()
    for name in SimParams.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)), default=None)
    args = parser.parse_args()
    chosen = {name: getattr(args, name) for name in SimParams.__dataclass_fields__ if getattr(args, name) is not None}
    params = SimParams(**chosen)
    disable_created_metrics()  # no *_created series: a scraper reads only what vLLM's /metrics has

    async def run() -> None:
        ports = [int(p) for p in args.ports.split(",")] if args.ports else None
        count = len(ports) if ports else args.replicas
        replicas = await serve(params, count, events_port=args.events_port, ports=ports)
        print("READY " + " ".join(f"{r.host}:{r.port}" for r in replicas), flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
