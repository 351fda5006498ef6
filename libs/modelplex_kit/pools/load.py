"""A replica's load: what its own metrics endpoint says, corrected by this backend's in-flight count.

Engines publish their queue in Prometheus text: vLLM (``vllm:num_requests_waiting``,
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``), llama.cpp's server when started with
``--metrics`` (``llamacpp:requests_deferred``, ``llamacpp:requests_processing``,
``llamacpp:kv_cache_usage_ratio``), Triton (``nv_inference_pending_request_count``). A scrape is a few
hundred ms old when read; the backend's own count of requests it has in flight on the replica is
exact for its share, so a replica's load is the scrape plus what this backend started there since,
and never less than this backend's own in-flight count (a failed or stale scrape cannot make a busy
replica look idle). With several backend replicas sharing their picks (sync.py), the requests the others
sent there count too, as waiting, until the next scrape tick.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Series (summed over their label sets, e.g. vLLM's per-engine ones) -> which figure they give.
_WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred", "nv_inference_pending_request_count")
_RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")
_WANTED = frozenset(_WAITING + _RUNNING + _KV_USAGE)
_LORA_INFO = "vllm:lora_requests_info"
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One scrape of a replica's metrics."""

    running: float
    waiting: float
    # 0..1: how full the KV cache is (a full one preempts, so it weighs as queueing soon).
    kv_cache_usage: float
    # LoRA adapters the engine runs or queues requests under (vLLM's vllm:lora_requests_info, newest series).
    lora_busy: frozenset[str] = field(default_factory=frozenset)


def parse_engine_load(text: str) -> EngineLoad | None:
    """The load figures in a Prometheus text exposition; None when it has none of them (an engine
    whose metrics say nothing of its queue is judged by in-flight counts alone)."""
    sums: dict[str, float] = {}
    lora = _NewestLoraInfo()
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        name = line[:brace] if brace >= 0 else line.split(" ", 1)[0]
        if name == _LORA_INFO:
            lora.offer(line)
            continue
        if name not in _WANTED:
            continue
        rest = line[line.rfind("}") + 1 :] if brace >= 0 else line[len(name) :]
        try:
            sums[name] = sums.get(name, 0.0) + float(rest.split()[0])
        except (IndexError, ValueError):
            continue
    if not sums:
        return None
    return EngineLoad(
        running=sum(sums.get(n, 0.0) for n in _RUNNING),
        waiting=sum(sums.get(n, 0.0) for n in _WAITING),
        kv_cache_usage=max((sums[n] for n in _KV_USAGE if n in sums), default=0.0),
        lora_busy=lora.busy,
    )


class _NewestLoraInfo:
    """vLLM's ``vllm:lora_requests_info``: a gauge whose value is when it was set and whose label sets
    (``running_lora_adapters``, ``waiting_lora_adapters``: comma-joined names) pile up; only the
    series set last says what runs now."""

    def __init__(self) -> None:
        self._when = float("-inf")
        self.busy: frozenset[str] = frozenset()

    def offer(self, line: str) -> None:
        try:
            when = float(line[line.rfind("}") + 1 :].split()[0])
        except (IndexError, ValueError):
            return
        if when <= self._when:
            return
        labels = dict(_LABEL.findall(line[line.find("{") : line.rfind("}") + 1]))
        names = f"{labels.get('running_lora_adapters', '')},{labels.get('waiting_lora_adapters', '')}"
        self._when, self.busy = when, frozenset(name for name in names.split(",") if name)


class ReplicaLoad:
    """The load figures of one replica, as the picker reads them."""

    __slots__ = ("_in_flight_at_scrape", "_peer_since_scrape", "_scraped", "in_flight", "prefilling")

    def __init__(self) -> None:
        self.in_flight = 0
        # This backend's requests there not yet answering (queued, or in their prefill).
        self.prefilling = 0
        self._scraped: EngineLoad | None = None
        self._in_flight_at_scrape = 0
        # Requests other backend replicas sent here since the last scrape (their shared picks, sync.py):
        # the next scrape counts them, until then they would be invisible here.
        self._peer_since_scrape = 0

    def started(self) -> None:
        self.in_flight += 1

    def peer_started(self) -> None:
        """Another backend replica sent a request here (taken as waiting until the next scrape says)."""
        self._peer_since_scrape += 1

    def finished(self) -> None:
        self.in_flight -= 1

    def scraped(self, load: EngineLoad | None) -> None:
        """A fresh scrape (None: the engine publishes no queue figures)."""
        self._scraped = load
        self._in_flight_at_scrape = self.in_flight
        self.peers_counted()

    def peers_counted(self) -> None:
        """The scrape tick passed (the engine's figures include the other backends' requests, or could
        not be read: either way they count no longer, so a failing scrape cannot inflate the load)."""
        self._peer_since_scrape = 0

    @property
    def engine(self) -> EngineLoad | None:
        return self._scraped

    def requests(self) -> float:
        """Requests the replica is running or queueing, as best known now."""
        if self._scraped is None:
            return float(self.in_flight + self._peer_since_scrape)
        # The scrape counted this backend's requests of then; what it started or finished since
        # moves the figure by as much. Never below what this backend alone has there.
        total = self._scraped.running + self._scraped.waiting + self._since_scrape()
        return max(float(self.in_flight), total)

    def queue(self) -> float:
        """Requests waiting for the engine to start them (in-flight ones where the engine does not say)."""
        if self._scraped is None:
            return float(self.in_flight + self._peer_since_scrape)
        return max(self._scraped.waiting + self._since_scrape(), 0.0)

    def pending(self) -> float:
        """Requests ahead of a new one's first token: the engine's queue, or this backend's requests
        there not yet answering, whichever says more. Requests already decoding are left out: they
        hold a slot but do not hold back the next prefill."""
        if self._scraped is None:
            return float(self.in_flight + self._peer_since_scrape)
        return max(float(self.prefilling + self._peer_since_scrape), self.queue())

    def _since_scrape(self) -> int:
        return self.in_flight - self._in_flight_at_scrape + self._peer_since_scrape

    def score(self) -> float:
        """What the picker minimises: requests, with a nearly full KV cache counting as more
        (the engine will preempt or queue the next one)."""
        return self.requests() + self._kv_pressure()

    def backlog(self) -> float:
        """What the imbalance bound compares: pending requests, a nearly full KV cache counting as more."""
        return self.pending() + self._kv_pressure()

    def _kv_pressure(self) -> float:
        usage = self._scraped.kv_cache_usage if self._scraped is not None else 0.0
        return 4.0 * (usage - 0.9) / 0.1 if usage > 0.9 else 0.0


class Prefill:
    """One request counted in its replica's ``prefilling`` until ``done``: its first answer item, or
    its end (idempotent)."""

    __slots__ = ("_load",)

    def __init__(self, load: ReplicaLoad) -> None:
        self._load: ReplicaLoad | None = load
        load.prefilling += 1

    def done(self) -> None:
        if self._load is not None:
            self._load.prefilling -= 1
            self._load = None
