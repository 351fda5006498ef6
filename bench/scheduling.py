"""make bench: which engine replica a request goes to, and what that does to time to first token.

Eight simulated vLLM replicas (bench/engine_sim.py: a prefix cache, slots and a FIFO queue; a
procedural stand-in, not a model) behind one model of the real text backend
(``python -m modelplex_text``, engine ``openai``, ``MODELPLEX_TEXT_UPSTREAM_URL`` listing every
replica), driven over gRPC by an open-loop Poisson client, once per number of text backend replicas
(1, 2, 3: one gRPC channel over their addresses with round_robin, as the edge calls them; with more
than one they share their picks through a real Redis, ``MODELPLEX_TEXT_POOL_SYNC_URL``, as the chart
wires them), pool policy (``MODELPLEX_TEXT_POOL_POLICY``: round_robin, least_loaded, affinity) and load. The workload is
multi-tenant: each request is one tenant's long system prompt (tenants Zipf-distributed) plus a
unique user message, from one of many end users (``user``; no ``prompt_cache_key``, so the picker
must find shared prefixes itself).

Capacity, from the simulator's parameters: what the fleet serves when nothing is cached, replicas x
the lesser of one replica's prefill lane (1 / the prefill time of the mean prompt) and its running
slots (slots / the mean service time: prefill of every prompt token + decode of every output
token); with the default parameters the lane binds. As nothing cached is assumed, every policy is
stable at every load measured here and each figure is a steady state, not a function of the run's
length; cache hits turn into headroom below it. The prefix cache of a replica holds about two tenants' system
prompts: the regime where placement matters (a fleet whose every replica holds every shared
prefix needs no affinity).

TTFT is timed from each request's scheduled arrival (so a late client does not hide queueing) to
the first streamed text; the first ``--warmup`` seconds of arrivals are not measured. The hit
rate is the simulators' own ``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` counters
over the measured window. CPU: the backend process's CPU time per request (from /proc), and the
picker's own cost per pick timed in-process when the pool module offers a picker to time.

With ``--lora``, a section of its own: where LoRA adapters are loaded. 4 replicas that hold 4 adapters each
(the simulator's ``--lora-slots`` and the backend's ``MODELPLEX_TEXT_POOL_ADAPTER_SLOTS``), 16 adapters by Zipf
popularity, each request ``GenerateRequest.adapter`` plus a short prompt; affinity against round robin with 1
and 2 backends at 60 % of capacity; cold loads per 1000 requests from the simulators' own
``modelplex_sim_lora_loads_total``, TTFT as above (``LoraWorkload``, ``run_lora``).

    python -m bench.scheduling [--loads 0.5 0.8 0.95] [--policies round_robin least_loaded affinity]
    python -m bench.scheduling --lora [--backends 1 2] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.engine_sim import MODEL, SimParams, chat_text, tokens_of
from bench.platform_overhead import KEEP_MARKER
from modelplex.v1 import common_pb2, text_pb2, text_pb2_grpc
from modelplex_kit.children import tied_to_parent
from modelplex_kit.devstack import free_port

HEADING = "## Scheduling across engine replicas (bench/scheduling.py)"
# A run with --kv-events writes a section of its own beside it.
EVENTS_HEADING = "## Scheduling with the engines' KV-cache events (bench/scheduling.py --kv-events)"
# And a run with --lora (LoRA adapters: where each is loaded) one of its own.
LORA_HEADING = "## Scheduling LoRA adapters across engine replicas (bench/scheduling.py --lora)"


def heading(args) -> str:
    if getattr(args, "lora", False):
        return LORA_HEADING
    return EVENTS_HEADING if args.kv_events else HEADING


POLICIES = ("round_robin", "least_loaded", "affinity")
PREFIX_COUNTERS = ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries")
PICKER = "affinity"
BASELINE = "round_robin"
BAR_LOAD = 0.8
BAR_FACTOR = 2.0
# With several text backends, the picker's figures stay within this of one backend's (issue 24).
HOLD_WITHIN = 0.15


@dataclass(frozen=True)
class Workload:
    """Tenants' system prompts (Zipf popularity) + unique user messages + output lengths."""

    tenants: int = 6
    system_tokens: tuple[int, int] = (1000, 3000)
    zipf_s: float = 1.1
    tail_tokens: tuple[int, int] = (50, 250)
    output_tokens: tuple[int, int] = (16, 48)
    end_users: int = 1000
    seed: int = 18
    #: Leads each system prompt's words (tenant t's are f"{word}{t}w{i}").
    word: str = "t"

    def system_prompts(self) -> list[str]:
        rng = random.Random(self.seed)
        lengths = [rng.randint(*self.system_tokens) for _ in range(self.tenants)]
        return [" ".join(f"{self.word}{t}w{i}" for i in range(n)) for t, n in enumerate(lengths)]

    def popularity(self) -> list[float]:
        raw = [1 / (rank + 1) ** self.zipf_s for rank in range(self.tenants)]
        return [w / sum(raw) for w in raw]

    def messages(self, tenant: int, tail: str, prompts: list[str]) -> list[dict]:
        return [{"role": "system", "content": prompts[tenant]}, {"role": "user", "content": tail}]

    def system_prompt_tokens(self) -> list[int]:
        """Each tenant's prompt tokens without the user message, as the simulator renders and counts them."""
        return _system_prompt_tokens(self)

    def mean_prompt_tokens(self) -> float:
        """Exact for the system prompts, the mean for the tails."""
        rendered = self.system_prompt_tokens()
        return sum(w * n for w, n in zip(self.popularity(), rendered, strict=True)) + sum(self.tail_tokens) / 2

    def mean_output_tokens(self) -> float:
        return sum(self.output_tokens) / 2


@functools.cache
def _system_prompt_tokens(workload: Workload) -> list[int]:
    prompts = workload.system_prompts()
    return [len(tokens_of(chat_text(workload.messages(t, "", prompts)))) for t in range(workload.tenants)]


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the run's start
    tenant: int
    user: str
    tail: str
    max_tokens: int
    measured: bool


def arrivals(workload: Workload, rate: float, warmup: float, seconds: float, seed: int) -> list[Arrival]:
    """Open-loop Poisson arrivals over warmup + seconds (the same sequence for every policy at one rate)."""
    rng = random.Random(seed)
    out, now, i = [], 0.0, 0
    while True:
        now += rng.expovariate(rate)
        if now >= warmup + seconds:
            return out
        tenant = rng.choices(range(workload.tenants), workload.popularity())[0]
        tail = " ".join(f"r{i}w{j}" for j in range(rng.randint(*workload.tail_tokens)))
        user = f"tenant{tenant}-user{rng.randrange(workload.end_users)}"
        out.append(Arrival(now, tenant, user, tail, rng.randint(*workload.output_tokens), now >= warmup))
        i += 1


def capacity(params: SimParams, workload: Workload, replicas: int) -> float:
    """Requests per second the fleet serves with no cache hit at all (see the module docstring)."""
    return replicas * params.requests_per_second(workload.mean_prompt_tokens(), workload.mean_output_tokens())


# -- processes ---------------------------------------------------------------
@dataclass
class Simulators:
    popen: subprocess.Popen
    addresses: list[str]  # host:port of each replica

    @classmethod
    def start(cls, replicas: int, params: SimParams, events_port: int = 0) -> Simulators:
        flags = [f"--{name.replace('_', '-')}={getattr(params, name)}" for name in SimParams.__dataclass_fields__]
        flags += [f"--replicas={replicas}", f"--events-port={events_port}"]
        popen = subprocess.Popen(
            [sys.executable, "-m", "bench.engine_sim", *flags],
            stdout=subprocess.PIPE,
            text=True,
            **tied_to_parent(),
        )
        line = popen.stdout.readline()
        if not line.startswith("READY "):
            popen.kill()
            raise RuntimeError(f"engine simulator did not start: {line!r}")
        return cls(popen, line.split()[1:])

    def urls(self) -> list[str]:
        return [f"http://{address}/v1" for address in self.addresses]

    def counters(self, names: tuple[str, ...] = PREFIX_COUNTERS) -> dict[str, float]:
        """Counters summed over every replica (vLLM's prefix-cache counters unless ``names`` says)."""
        totals = dict.fromkeys(names, 0.0)
        for address in self.addresses:
            for family in self._families(address):
                if family.name in totals:
                    totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return totals

    def by_label(self, family_name: str, label: str) -> dict[str, float]:
        """One counter summed over every replica by one label's value (``modelplex_sim_lora_requests`` by
        ``lora_name``, say)."""
        out: dict[str, float] = {}
        for address in self.addresses:
            for family in self._families(address):
                if family.name == family_name:
                    for sample in family.samples:
                        if sample.name.endswith("_total"):
                            key = sample.labels.get(label, "")
                            out[key] = out.get(key, 0.0) + sample.value
        return out

    def loaded_adapters(self) -> list[list[str]]:
        """The LoRA adapters each replica has loaded now (its ``/v1/models`` past the base)."""
        out = []
        for address in self.addresses:
            with urllib.request.urlopen(f"http://{address}/v1/models", timeout=10) as reply:
                out.append([m["id"] for m in json.load(reply)["data"] if m["id"] != MODEL])
        return out

    @staticmethod
    def _families(address: str):
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            return list(text_string_to_metric_families(reply.read().decode()))

    def holders(self, chats: list[list[dict]], tokens: list[int], block_tokens: int) -> list[int]:
        """For each chat (a tenant's system prompt), how many replicas' caches hold all of its whole blocks."""
        counts = []
        for messages, n in zip(chats, tokens, strict=True):
            body = json.dumps({"messages": messages}).encode()
            held = 0
            for address in self.addresses:
                request = urllib.request.Request(f"http://{address}/sim/cached", data=body, method="POST")
                with urllib.request.urlopen(request, timeout=10) as reply:
                    held += json.load(reply)["cached_tokens"] >= n - n % block_tokens
            counts.append(held)
        return counts

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)


class SpreadSampler:
    """Samples, once a second from a thread, how many replicas hold each tenant's system prompt."""

    def __init__(self, sims: Simulators, workload: Workload, block_tokens: int) -> None:
        prompts = workload.system_prompts()
        self._args = (
            [workload.messages(t, "", prompts)[:1] for t in range(workload.tenants)],
            workload.system_prompt_tokens(),
            block_tokens,
        )
        self._sims, self._samples = sims, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._samples.append(self._sims.holders(*self._args))

    def stop(self) -> float:
        """The mean over samples and tenants of replicas holding a tenant's prompt (nan: no sample)."""
        self._stop.set()
        self._thread.join(30)
        values = [n for sample in self._samples for n in sample]
        return sum(values) / len(values) if values else float("nan")


@dataclass(frozen=True)
class Picks:
    """The backend's ``modelplex_pool_picks_total``, summed by reason and by replica."""

    by_reason: dict[str, float]
    by_replica: dict[str, float]

    def __sub__(self, earlier: Picks) -> Picks:
        return Picks(
            {k: v - earlier.by_reason.get(k, 0.0) for k, v in self.by_reason.items()},
            {k: v - earlier.by_replica.get(k, 0.0) for k, v in self.by_replica.items()},
        )

    def summary(self) -> str:
        """Shares of picks by reason, and the busiest replica's share (1/replicas when even)."""
        total = sum(self.by_reason.values())
        if not total:
            return "-"
        reasons = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(self.by_reason.items(), key=lambda kv: -kv[1]))
        return f"{reasons}; busiest replica {max(self.by_replica.values()) / total:.0%}"


@dataclass
class Backend:
    popen: subprocess.Popen
    target: str
    log: Path
    metrics_port: int

    @classmethod
    def start(
        cls,
        urls: list[str],
        policy: str,
        log_dir: Path,
        name: str = "text",
        sync_url: str = "",
        events_port: int = 0,
        extra_env: dict[str, str] | None = None,
    ) -> Backend:
        target, metrics_port = f"127.0.0.1:{free_port()}", free_port()
        env = os.environ | {
            "MODELPLEX_TEXT_POOL_SYNC_URL": sync_url,
            "MODELPLEX_TEXT_POOL_KV_EVENTS_PORT": str(events_port),
            "MODELPLEX_METRICS_PORT": str(metrics_port),
            "MODELPLEX_TEXT_LISTEN": target,
            "MODELPLEX_TEXT_ENGINE": "openai",
            "MODELPLEX_TEXT_UPSTREAM_URL": ",".join(urls),
            "MODELPLEX_TEXT_UPSTREAM_MODEL": MODEL,
            "MODELPLEX_TEXT_POOL_POLICY": policy,
            "MODELPLEX_LOG_LEVEL": "warning",
        }
        env |= extra_env or {}
        log = log_dir / f"{name}-{policy}.log"
        with log.open("a") as sink:
            popen = subprocess.Popen(
                [sys.executable, "-m", "modelplex_text"],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                **tied_to_parent(),
            )
        return cls(popen, target, log, metrics_port)

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"text backend exited ({self.popen.returncode}): {self.log.read_text()[-2000:]}")
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"text backend not serving on {self.target}")

    def picks(self) -> Picks:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            families = text_string_to_metric_families(reply.read().decode())
        by_reason: dict[str, float] = {}
        by_replica: dict[str, float] = {}
        for family in families:
            if family.name != "modelplex_pool_picks":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    reason, replica = sample.labels["reason"], sample.labels["replica"]
                    by_reason[reason] = by_reason.get(reason, 0.0) + sample.value
                    by_replica[replica] = by_replica.get(replica, 0.0) + sample.value
        return Picks(by_reason, by_replica)

    def by_label(self, family_name: str, label: str) -> dict[str, float]:
        """One of the backend's counters by one label's value (``""``: a counter without it)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            families = text_string_to_metric_families(reply.read().decode())
        out: dict[str, float] = {}
        for family in families:
            if family.name == family_name:
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        key = sample.labels.get(label, "")
                        out[key] = out.get(key, 0.0) + sample.value
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the backend process so far."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass
class Backends:
    """Several text backend replicas serving one model, called as the edge calls them: one gRPC
    channel over every replica's address with the round_robin policy (services/edge/backends.py)."""

    members: list[Backend]

    @classmethod
    def start(
        cls,
        count: int,
        urls: list[str],
        policy: str,
        log_dir: Path,
        sync_url: str = "",
        events_port: int = 0,
        extra_env: dict[str, str] | None = None,
    ) -> Backends:
        members = [
            Backend.start(urls, policy, log_dir, f"text{i}", sync_url, events_port, extra_env) for i in range(count)
        ]
        group = cls(members)
        try:
            for backend in members:
                backend.wait_serving(timeout=120)
        except BaseException:
            group.stop()
            raise
        return group

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(b.target for b in self.members)

    def picks(self) -> Picks:
        total = Picks({}, {})
        for backend in self.members:
            one = backend.picks()
            for into, add in ((total.by_reason, one.by_reason), (total.by_replica, one.by_replica)):
                for k, v in add.items():
                    into[k] = into.get(k, 0.0) + v
        return total

    def by_label(self, family_name: str, label: str) -> dict[str, float]:
        total: dict[str, float] = {}
        for backend in self.members:
            for k, v in backend.by_label(family_name, label).items():
                total[k] = total.get(k, 0.0) + v
        return total

    def cpu_seconds(self) -> float:
        return sum(b.cpu_seconds() for b in self.members)

    def stop(self) -> None:
        for backend in self.members:
            backend.stop()


# -- one run -------------------------------------------------------------------
@dataclass
class Outcome:
    ttft: float | None = None  # seconds, None: failed
    error: str = ""
    cached_tokens: int = 0  # as the engine reported them in the final usage


@dataclass
class RunResult:
    policy: str
    backends: int
    load: float
    rate: float
    ttfts_ms: list[float]
    errors: int
    hit_rate: float
    #: Share of requests whose tenant's system prompt was not (wholly) cached where they ran.
    prefix_miss_rate: float
    backend_cpu_ms_per_request: float
    picks: Picks
    #: Replicas whose cache held a tenant's system prompt, mean over tenants and the window's samples.
    replicas_per_tenant: float = float("nan")
    error_examples: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.ttfts_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _request(arrival: Arrival, prompts: list[str], workload: Workload, index: int) -> text_pb2.GenerateRequest:
    messages = [
        text_pb2.ChatMessage(role=m["role"], content=[text_pb2.ContentPart(text=m["content"])])
        for m in workload.messages(arrival.tenant, arrival.tail, prompts)
    ]
    return text_pb2.GenerateRequest(
        meta=common_pb2.RequestMeta(request_id=f"sched-{index}", end_user=arrival.user),
        user=arrival.user,  # as the edge sets it from the body's `user`
        model=MODEL,
        chat=text_pb2.ChatInput(messages=messages),
        sampling=text_pb2.SamplingParams(max_tokens=arrival.max_tokens),
    )


async def _one(stub, request: text_pb2.GenerateRequest, due: float) -> Outcome:
    outcome = Outcome()
    try:
        async for message in stub.GenerateStream(request, timeout=120):
            if outcome.ttft is None and any(d.text for d in message.deltas):
                outcome.ttft = time.perf_counter() - due
            if message.HasField("usage"):
                outcome.cached_tokens = message.usage.cached_prompt_tokens
    except grpc.aio.AioRpcError as exc:
        return Outcome(error=f"{exc.code().name}: {exc.details()}")
    return outcome if outcome.ttft is not None else Outcome(error="no text streamed")


async def drive(
    target: str, plan: list[Arrival], workload: Workload, on_warm, build=None
) -> list[tuple[Arrival, Outcome]]:
    """Sends every arrival at its time (open loop); calls ``on_warm()`` when the measured window opens.
    ``build``: the GenerateRequest of an arrival (``_request`` unless given)."""
    build = build or _request
    prompts = workload.system_prompts()
    async with grpc.aio.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")]) as channel:
        stub = text_pb2_grpc.TextGenerationServiceStub(channel)
        start = time.perf_counter()
        tasks, warm = [], None
        for i, arrival in enumerate(plan):
            if arrival.measured and warm is None:  # off the loop: arrivals keep their times
                warm = asyncio.create_task(asyncio.to_thread(on_warm))
            due = start + arrival.at
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(stub, build(arrival, prompts, workload, i), due)))
        outcomes = await asyncio.gather(*tasks)
        if warm is not None:
            await warm
    return list(zip(plan, outcomes, strict=True))


def _missed_prefix(arrival: Arrival, outcome: Outcome, workload: Workload) -> bool:
    """Fewer tokens cached than the system prompt's full blocks: its prefill (or part of it) was paid again."""
    system = workload.system_prompt_tokens()[arrival.tenant]
    return outcome.ttft is not None and outcome.cached_tokens < system - SimParams().block_tokens


def run_one(policy: str, load: float, backends: int, args, log_dir: Path) -> RunResult:
    params, workload = args.sim, Workload()
    rate = load * capacity(params, workload, args.replicas)
    plan = arrivals(workload, rate, args.warmup, args.seconds, seed=int(load * 1000))
    events_port = free_port() if args.kv_events else 0
    sims = Simulators.start(args.replicas, params, events_port)
    spread = SpreadSampler(sims, workload, params.block_tokens)
    # Several backends share their picks through a Redis, as the chart wires them (README, engine pools).
    sync_url = args.sync_url if backends > 1 else ""
    try:
        group = Backends.start(backends, sims.urls(), policy, log_dir, sync_url, events_port)
        try:
            marks: dict[str, float | dict] = {}

            def on_warm() -> None:
                marks["counters"], marks["cpu"], marks["picks"] = (
                    sims.counters(),
                    group.cpu_seconds(),
                    group.picks(),
                )
                spread.start()

            results = asyncio.run(drive(group.target, plan, workload, on_warm))
            replicas_per_tenant = spread.stop()
            cpu = group.cpu_seconds() - marks["cpu"]
            after, picks = sims.counters(), group.picks() - marks["picks"]
        finally:
            group.stop()
    finally:
        sims.stop()
    before = marks["counters"]
    measured = [(a, o) for a, o in results if a.measured]
    hits = after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"]
    queries = after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"]
    failed = [o.error for _, o in measured if o.ttft is None]
    return RunResult(
        policy=policy,
        backends=backends,
        load=load,
        rate=rate,
        ttfts_ms=[o.ttft * 1e3 for _, o in measured if o.ttft is not None],
        errors=len(failed),
        hit_rate=hits / queries if queries else 0.0,
        prefix_miss_rate=sum(_missed_prefix(a, o, workload) for a, o in measured) / max(1, len(measured)),
        backend_cpu_ms_per_request=cpu * 1e3 / max(1, len(measured)),
        picks=picks,
        replicas_per_tenant=replicas_per_tenant,
        error_examples=sorted(set(failed))[:3],
    )


# -- the picker's own cost -------------------------------------------------------
@dataclass
class _Candidate:
    """A replica as the picker sees it: its key and load (scraped figures as under this benchmark's load)."""

    key: str
    load: object


def picker_cost_us(args, picks: int = 3000) -> dict[str, float]:
    """µs of CPU per pick, per policy, timed in-process on this workload's requests: what the text
    backend does per request to choose (rendering the prompt for the prefix index, then the pick)
    with the pool's default settings, over ``args.replicas`` replicas. Empty without engine pools."""
    try:
        from modelplex_kit.pools.load import EngineLoad, ReplicaLoad
        from modelplex_kit.pools.picker import Picker
        from modelplex_kit.pools.settings import PoolSettings
        from modelplex_text.adapters.openai_wire import pick_request
    except ImportError:
        return {}
    workload, settings = Workload(), PoolSettings()
    prompts = workload.system_prompts()
    plan = arrivals(workload, rate=50.0, warmup=0.0, seconds=picks / 50.0, seed=1)[:picks]
    requests = [_request(a, prompts, workload, i) for i, a in enumerate(plan)]
    out = {}
    for policy in args.policies:
        candidates = [_Candidate(f"10.0.0.{i}:8000", ReplicaLoad()) for i in range(args.replicas)]
        for i, c in enumerate(candidates):
            c.load.scraped(EngineLoad(running=i % 4, waiting=i % 2, kv_cache_usage=0.3))
        picker = Picker(
            policy,
            max_imbalance=settings.pool_max_imbalance,
            block_chars=settings.pool_prefix_block_chars,
            index_blocks=settings.pool_prefix_index_blocks,
        )
        start = time.process_time()
        for request in requests:
            picker.pick(candidates, pick_request(request))
        out[policy] = (time.process_time() - start) / len(requests) * 1e6
    return out


# -- report ----------------------------------------------------------------------
def report(results: list[RunResult], args, wall: float, picker_us: dict[str, float]) -> str:
    params, workload = SimParams(), Workload()
    cap = capacity(params, workload, args.replicas)
    prompt, out = workload.mean_prompt_tokens(), workload.mean_output_tokens()
    service, lane_s = params.service_seconds(prompt, out), params.prefill_seconds_per_token * prompt
    lines = [
        heading(args),
        "",
        f"{args.replicas} engine replicas behind one model, by the number of text backend replicas (called as the "
        "edge calls them: one gRPC channel, round_robin; several share their picks through a real Redis, "
        "`MODELPLEX_TEXT_POOL_SYNC_URL`, as the chart wires them"
        + ("" if args.share_picks else "; **not in this run**")
        + (
            "; the engines publish their KV-cache events and every backend follows them, "
            "`MODELPLEX_TEXT_POOL_KV_EVENTS_PORT`"
            if args.kv_events
            else ""
        )
        + ") and the text backend's pool policy "
        "(`MODELPLEX_TEXT_POOL_POLICY`). `make bench` runs it; `make bench-scheduling` runs it alone.",
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"{time.strftime('%Y-%m-%d')}; whole run {wall:.0f} s.",
        f"- Engines: bench/engine_sim.py, a procedural stand-in for vLLM (not a model): per replica "
        f"{params.max_running} running sequences, a FIFO queue and one prefill at a time, a prefix cache of "
        f"{params.cache_blocks} blocks "
        f"of {params.block_tokens} tokens (LRU), prefill {params.prefill_seconds_per_token * 1e3:g} ms per uncached "
        f"prompt token, decode {params.decode_seconds_per_token * 1e3:g} ms per output token; vLLM's metric names.",
        f"- Workload: {workload.tenants} tenants' system prompts of {workload.system_tokens[0]}-"
        f"{workload.system_tokens[1]} tokens, Zipf(s={workload.zipf_s}) popularity, each request with a unique user "
        f"message of {workload.tail_tokens[0]}-{workload.tail_tokens[1]} tokens and {workload.output_tokens[0]}-"
        f"{workload.output_tokens[1]} output tokens, `user` one of {workload.end_users} end users, no "
        "`prompt_cache_key`; open-loop Poisson arrivals; the same arrivals for every policy at one load.",
        f"- Capacity, with nothing cached (mean prompt {prompt:.0f} tokens, {out:.0f} output tokens): per replica "
        f"the lesser of the prefill lane, 1 / {lane_s:.3f} s, and {params.max_running} slots / {service:.3f} s; "
        f"x {args.replicas} = {cap:.1f} requests/s. Loads are shares of that; cache hits are headroom below it.",
        f"- Each run: {args.warmup:g} s of warm-up arrivals, then {args.seconds:g} s measured; TTFT from the "
        "scheduled arrival to the first streamed text, through the real text backend over gRPC; hit rate = the "
        "simulators' `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` (tokens) over the measured window.",
        "",
        "| backends | load | policy | req/s | TTFT p50 ms | TTFT p99 ms | cache hit rate | prefix missed "
        "| replicas per tenant | backend CPU ms/req | errors | picks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.backends} | {r.load:.0%} | {r.policy} | {r.rate:.1f} | {r.percentile(0.5):.0f} | "
            f"{r.percentile(0.99):.0f} | {r.hit_rate:.1%} | {r.prefix_miss_rate:.1%} | {r.replicas_per_tenant:.1f} | "
            f"{r.backend_cpu_ms_per_request:.2f} | {r.errors} | {r.picks.summary()} |"
        )
    lines += ["", *_bars(results)]
    lines += [
        "",
        "Reading the numbers: *prefix missed* is the share of requests whose tenant's system prompt was not "
        "cached on the replica that ran them (from each answer's `cached_tokens`): those pay its whole prefill "
        "and hold the replica's prefill lane meanwhile, so once more than 1 % of requests miss, p99 TTFT is a "
        "miss's TTFT whatever the policy. Affinity keeps misses rare in two ways (README, 'what the picker "
        "weighs'): its prefix index credits a replica only within the cache horizon learned from the same "
        "`cached_tokens` (a prefix the engine had evicted teaches it how long that replica keeps one), and its "
        "imbalance bound counts requests waiting for their first token, not those decoding, so the hot tenant "
        "spills to a cold replica only when its queue costs more than a prefill there. *picks*: the backend's "
        "`modelplex_pool_picks_total` by reason, and the busiest replica's share of all picks (1/8 = 13 % when "
        "even). *replicas per tenant*: how many replicas' caches held a tenant's whole system prompt, sampled "
        "each second (the simulators' own probe): 1 is a tenant in one place; round robin spreads each over "
        "several, as each backend alone did before they shared their picks. The shared 2-core machine adds "
        "tens of ms of jitter to every figure, more with every backend process; p99 rests on the few "
        "slowest of a few hundred requests per run, so a run with 1 % of misses or more shows one in its p99.",
    ]
    lines += [
        "",
        "The picker's own cost, CPU per request in-process (the prompt rendered for the prefix index, then the "
        f"pick over {args.replicas} replicas; pool defaults): "
        + ", ".join(f"{policy} {us:.1f} µs" for policy, us in picker_us.items())
        + ". The backend's CPU per request in the table includes it and everything else the backend does."
        if picker_us
        else "The picker's own cost: the text backend has no engine pools to time.",
    ]
    examples = sorted({e for r in results for e in r.error_examples})
    if examples:
        lines += ["", "Errors seen: " + "; ".join(f"`{e}`" for e in examples[:5])]
    return "\n".join(lines)


def _bars(results: list[RunResult]) -> list[str]:
    """The bar per backend count (issue 18, then issue 24's with several backends), and the 3-backend check."""
    at = {(r.policy, r.backends, r.load): r for r in results}
    lines = []
    for backends in sorted({r.backends for r in results}):
        picker, base = at.get((PICKER, backends, BAR_LOAD)), at.get((BASELINE, backends, BAR_LOAD))
        if picker is None or base is None:
            lines.append(f"- {backends} backend(s), {BAR_LOAD:.0%} load: not measured in this run.")
            continue
        p99, hits = _ratios(picker, base)
        verdict = "met" if p99 >= BAR_FACTOR and hits >= BAR_FACTOR else "not met"
        lines.append(
            f"- {backends} backend(s): at {BAR_LOAD:.0%} load {PICKER} beats {BASELINE} by {p99:.2f}x on p99 TTFT "
            f"and {hits:.2f}x on hit rate (bar {BAR_FACTOR:g}x on both): **{verdict}**."
        )
    one, most = at.get((PICKER, 1, BAR_LOAD)), max((r.backends for r in results), default=1)
    many = at.get((PICKER, most, BAR_LOAD))
    if one is not None and many is not None and most > 1:
        p99_worse = many.percentile(0.99) / one.percentile(0.99) - 1
        hits_worse = 1 - many.hit_rate / one.hit_rate if one.hit_rate else float("nan")
        verdict = "met" if p99_worse <= HOLD_WITHIN and hits_worse <= HOLD_WITHIN else "not met"
        lines.append(
            f"- {most} backends against 1 ({PICKER}, {BAR_LOAD:.0%} load): p99 TTFT {p99_worse:+.0%}, hit rate "
            f"{-hits_worse:+.0%} (bar: within {HOLD_WITHIN:.0%}): **{verdict}**."
        )
    return ["Bars at " + f"{BAR_LOAD:.0%} load:", "", *lines]


def _ratios(picker: RunResult, base: RunResult) -> tuple[float, float]:
    p99 = base.percentile(0.99) / picker.percentile(0.99)
    hits = picker.hit_rate / base.hit_rate if base.hit_rate else float("inf")
    return p99, hits


# -- the LoRA variant (--lora) ------------------------------------------------------
# Adapter-affinity picking vs round robin with more adapters than one replica holds (issue: LoRA pools).
LORA_POLICIES = ("affinity", "round_robin")
LORA_BAR_FACTOR = 2.0
LORA_BAR_LOAD = 0.6


@dataclass(frozen=True)
class LoraWorkload(Workload):
    """Requests under one of ``tenants`` LoRA adapters (Zipf popularity), each a short per-adapter system
    prompt plus a unique user message: placement of adapters, not of prefixes, is what is measured."""

    tenants: int = 16
    system_tokens: tuple[int, int] = (64, 128)
    zipf_s: float = 1.0
    tail_tokens: tuple[int, int] = (16, 48)
    output_tokens: tuple[int, int] = (300, 700)
    seed: int = 24
    word: str = "a"

    @property
    def adapters(self) -> int:
        return self.tenants

    def names(self) -> list[str]:
        return [f"lora-{i:02d}" for i in range(self.adapters)]

    def adapter(self, index: int) -> text_pb2.LoraAdapter:
        name = self.names()[index]
        return text_pb2.LoraAdapter(name=name, source=f"/adapters/{name}", rank=16)


def lora_engine(slots: int = 4, load_ms: float = 300.0) -> SimParams:
    """The replicas of the LoRA variant: 32 running sequences (enough that slots rarely make a request wait below
    ~70 % of them), chat-length decodes (~5 s: a replica serves ~6 requests/s, so the stalls of round robin's loads,
    ``load_ms`` each, leave it standing at the load measured), the KV blocks for all of them (no KV pressure in the
    picker's score), a streamed chunk per 64 tokens (the first token alone: the machine's CPU goes to the platform,
    not to streaming)."""
    return SimParams(
        max_running=32, kv_blocks=32 * 2048 // 16, stream_interval=64, lora_slots=slots, lora_load_ms=load_ms
    )


def lora_plan(
    workload: LoraWorkload, params: SimParams, replicas: int, load: float, warmup: float, seconds: float
) -> tuple[float, list[Arrival]]:
    """The rate (``load`` x capacity) and the arrivals of a LoRA run: the same for every policy at one load."""
    rate = load * capacity(params, workload, replicas)
    return rate, arrivals(workload, rate, warmup, seconds, seed=int(load * 1000) + 1)


def _lora_request(arrival: Arrival, prompts: list[str], workload: LoraWorkload, index: int) -> text_pb2.GenerateRequest:
    request = _request(arrival, prompts, workload, index)
    request.adapter.CopyFrom(workload.adapter(arrival.tenant))
    return request


class PlacementSampler:
    """Samples, once a second from a thread, which adapters each replica has loaded."""

    def __init__(self, sims: Simulators) -> None:
        self._sims, self.samples = sims, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(self._sims.loaded_adapters())

    def stop(self, hottest: str) -> tuple[float, float]:
        """(mean replicas holding ``hottest``, mean distinct adapters loaded somewhere); nan: no sample."""
        self._stop.set()
        self._thread.join(30)
        if not self.samples:
            return float("nan"), float("nan")
        holders = [sum(hottest in loaded for loaded in sample) for sample in self.samples]
        distinct = [len({name for loaded in sample for name in loaded}) for sample in self.samples]
        return sum(holders) / len(holders), sum(distinct) / len(distinct)


SIM_LORA = ("modelplex_sim_lora_loads", "modelplex_sim_lora_unloads", "modelplex_sim_model_not_found")
REFUSALS = "modelplex_sim_lora_load_refusals"


@dataclass
class LoraResult:
    policy: str
    backends: int
    load: float
    rate: float
    ttfts_ms: list[float]
    measured: int  # requests arriving in the measured window
    errors: int
    #: The simulators' counters over the measured window (SIM_LORA), and the pool's own by outcome.
    sim: dict[str, float]
    pool_loads: dict[str, float]
    pool_evictions: float
    picks: Picks
    #: Loads the simulators refused over the measured window, by reason (slots_full, already_loaded, invalid).
    refusals: dict[str, float] = field(default_factory=dict)
    #: Every request of the run (warm-up included): sent, answered, and served under each adapter's name.
    sent: int = 0
    answered: int = 0
    served_by_adapter: dict[str, float] = field(default_factory=dict)
    hottest_replicas: float = float("nan")
    adapters_placed: float = float("nan")
    error_examples: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.ttfts_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def share_slower(self, ms: float) -> float:
        """The share of answered measured requests whose TTFT exceeded ``ms``."""
        return sum(t > ms for t in self.ttfts_ms) / len(self.ttfts_ms) if self.ttfts_ms else float("nan")

    @property
    def cold_per_1000(self) -> float:
        return self.sim["modelplex_sim_lora_loads"] * 1000 / max(1, self.measured)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def run_lora(
    policy: str,
    load: float,
    backends: int,
    args,
    log_dir: Path,
    workload: LoraWorkload | None = None,
    params: SimParams | None = None,
) -> LoraResult:
    """One LoRA run: ``args.replicas`` simulators with ``params.lora_slots`` adapter slots each, ``backends`` text
    backends holding at most ``args.adapter_slots`` adapters per replica (MODELPLEX_TEXT_POOL_ADAPTER_SLOTS)."""
    workload, params = workload or LoraWorkload(), params or lora_engine()
    rate, plan = lora_plan(workload, params, args.replicas, load, args.warmup, args.seconds)
    sims = Simulators.start(args.replicas, params)
    placements = PlacementSampler(sims)
    sync_url = args.sync_url if backends > 1 else ""
    env = {"MODELPLEX_TEXT_POOL_ADAPTER_SLOTS": str(args.adapter_slots)}
    try:
        group = Backends.start(backends, sims.urls(), policy, log_dir, sync_url, extra_env=env)
        try:
            marks: dict = {}

            def on_warm() -> None:
                marks["sim"] = sims.counters(SIM_LORA)
                marks["refusals"] = sims.by_label(REFUSALS, "reason")
                marks["pool"] = group.by_label("modelplex_pool_adapter_loads", "outcome")
                marks["evictions"] = sum(group.by_label("modelplex_pool_adapter_evictions", "pool").values())
                marks["picks"] = group.picks()
                placements.start()

            results = asyncio.run(drive(group.target, plan, workload, on_warm, _lora_request))  # type: ignore[arg-type]
            hottest, placed = placements.stop(workload.names()[0])
            sim = _delta(sims.counters(SIM_LORA), marks.get("sim", {}))
            refusals = _delta(sims.by_label(REFUSALS, "reason"), marks.get("refusals", {}))
            pool = _delta(group.by_label("modelplex_pool_adapter_loads", "outcome"), marks.get("pool", {}))
            evictions = sum(group.by_label("modelplex_pool_adapter_evictions", "pool").values())
            evictions -= marks.get("evictions", 0.0)
            picks = group.picks() - marks.get("picks", Picks({}, {}))
            served = sims.by_label("modelplex_sim_lora_requests", "lora_name")
        finally:
            group.stop()
    finally:
        sims.stop()
    measured = [(a, o) for a, o in results if a.measured]
    failed = [o.error for _, o in measured if o.ttft is None]
    return LoraResult(
        policy=policy,
        backends=backends,
        load=load,
        rate=rate,
        ttfts_ms=[o.ttft * 1e3 for _, o in measured if o.ttft is not None],
        measured=len(measured),
        errors=len(failed),
        sim=sim,
        pool_loads=pool,
        pool_evictions=evictions,
        picks=picks,
        refusals=refusals,
        sent=len(results),
        answered=sum(o.ttft is not None for _, o in results),
        served_by_adapter=served,
        hottest_replicas=hottest,
        adapters_placed=placed,
        error_examples=sorted({o.error for _, o in results if o.ttft is None})[:3],
    )


def lora_report(results: list[LoraResult], args, wall: float) -> str:
    params = lora_engine(args.adapter_slots, args.lora_load_ms)
    workload = LoraWorkload(tenants=args.adapters, zipf_s=args.zipf)
    cap = capacity(params, workload, args.replicas)  # type: ignore[arg-type]
    prompt, out = workload.mean_prompt_tokens(), workload.mean_output_tokens()
    service, lane_s = params.service_seconds(prompt, out), params.prefill_seconds_per_token * prompt
    top = workload.popularity()
    slots = args.replicas * args.adapter_slots
    lines = [
        LORA_HEADING,
        "",
        f"{args.adapters} LoRA adapters over {args.replicas} engine replicas that hold {args.adapter_slots} each "
        f"({slots} slots in all): the text backend's adapter-affinity picking (`MODELPLEX_TEXT_POOL_POLICY=affinity`) "
        "against round robin, with 1 and with 2 text backend replicas (called as the edge calls them; 2 share their "
        "picks, adapter placements included, through a real Redis, `MODELPLEX_TEXT_POOL_SYNC_URL`"
        + ("" if args.share_picks else "; **not in this run**")
        + "). Each request's `GenerateRequest.adapter` names its adapter; "
        "the pool loads it on the picked replica first where needed (vLLM's `/v1/load_lora_adapter`), unloading the "
        "least recently used idle one beyond `MODELPLEX_TEXT_POOL_ADAPTER_SLOTS="
        f"{args.adapter_slots}`. `make bench` and `make bench-scheduling` run it (`python -m bench.scheduling "
        "--lora`).",
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"{time.strftime('%Y-%m-%d')}; whole run {wall:.0f} s.",
        f"- Engines: bench/engine_sim.py with runtime LoRA (`--lora-slots {params.lora_slots}`: a load beyond them is "
        f"refused; `--lora-load-ms {params.lora_load_ms:g}`: a load stalls its replica, prefills and decode steps, "
        f"that long): per replica {params.max_running} running sequences and a FIFO queue, one prefill at a time "
        f"({params.prefill_seconds_per_token * 1e3:g} ms per uncached prompt token, a prefix cache per adapter), "
        f"decode {params.decode_seconds_per_token * 1e3:g} ms per output token, a streamed chunk per "
        f"{params.stream_interval} tokens (the first token alone). All {params.lora_slots} slots are the pool's: the "
        "simulator refuses a load beyond its slots (vLLM would evict one itself), so a platform that overfills a "
        "replica shows as errors here.",
        f"- Workload: {workload.adapters} adapters, Zipf(s={workload.zipf_s:g}) popularity (the hottest "
        f"{top[0]:.0%} of requests, the top 4 {sum(top[:4]):.0%}, the coldest {top[-1]:.1%}); each request is its "
        f"adapter's system prompt of {workload.system_tokens[0]}-{workload.system_tokens[1]} tokens and a unique "
        f"user message of {workload.tail_tokens[0]}-{workload.tail_tokens[1]} tokens (prefills of ~"
        f"{lane_s * 1e3:.0f} ms: prefix caching is secondary), {workload.output_tokens[0]}-"
        f"{workload.output_tokens[1]} output tokens; open-loop Poisson arrivals, the same for every policy.",
        f"- Capacity with no adapter load at all (mean prompt {prompt:.0f} tokens, {out:.0f} output tokens): per "
        f"replica the lesser of the prefill lane, 1 / {lane_s:.3f} s, and {params.max_running} slots / "
        f"{service:.2f} s; x {args.replicas} = {cap:.1f} requests/s. Loads are shares of that; every adapter load "
        f"stalls its replica {params.lora_load_ms:g} ms on top.",
        f"- Each run: {args.warmup:g} s of warm-up arrivals (the adapters placed, the slots filled), then "
        f"{args.seconds:g} s measured. *cold loads / 1000 req*: the simulators' own `modelplex_sim_lora_loads_total` "
        "from the measured window's start until its last request ended, per 1000 requests arriving in it; *pool "
        "hit / cold / failed*: the backends' `modelplex_pool_adapter_loads_total` by outcome over the same span; "
        "TTFT from the scheduled arrival to the first streamed text, through the real text backend over gRPC, "
        "answered requests only.",
        "",
        "| backends | load | policy | req/s | requests | cold loads / 1000 req | TTFT p50 ms | TTFT p99 ms "
        "| TTFT > 1 s | errors | pool hit / cold / failed | evictions | engines refused: load, slots full / "
        "load, already loaded / request, no such adapter | replicas holding the "
        "hottest | adapters placed | picks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        pool = " / ".join(f"{r.pool_loads.get(k, 0.0):.0f}" for k in ("hit", "cold", "failed"))
        lines.append(
            f"| {r.backends} | {r.load:.0%} | {r.policy} | {r.rate:.1f} | {r.measured} | {r.cold_per_1000:.0f} | "
            f"{r.percentile(0.5):.0f} | {r.percentile(0.99):.0f} | {r.share_slower(1000):.1%} | {r.errors} | {pool} "
            f"| {r.pool_evictions:.0f} | {r.refusals.get('slots_full', 0.0):.0f} / "
            f"{r.refusals.get('already_loaded', 0.0):.0f} / {r.sim['modelplex_sim_model_not_found']:.0f} | "
            f"{r.hottest_replicas:.1f} | {r.adapters_placed:.1f} | {r.picks.summary()} |"
        )
    lines += ["", *_lora_bars(results)]
    lines += [
        "",
        "Reading the numbers (modelplex_kit/pools/adapters.py, `AdapterPlacement.narrow`): under affinity a request "
        "goes to the replicas holding its adapter unless the least backlogged of them is past the imbalance bound "
        "(requests waiting for a first token, against 4 x the least backlogged replica's + 1), else to a replica with "
        "room, where it is loaded; so an adapter lives on one replica (*picks* `only`: one candidate left) and only "
        "the hottest spreads, once its replica queues. Round robin ignores placement but not room: it picks among "
        "the replicas holding the adapter or with room for it, and a replica has room only while one of its "
        "adapters runs nothing, so with ~20 running sequences per replica round robin is often left with the "
        "holders alone, and loads on far fewer than the ~half of its requests an LRU of 4 over this Zipf would. A "
        "request whose adapter is nowhere loaded while no replica has room waits on the replica picked for one of "
        "its adapters to go idle (`MODELPLEX_TEXT_POOL_ADAPTER_WAIT_SECONDS`, 30 s, then 503): that wait, not the "
        f"{params.lora_load_ms:g} ms load, makes the long tails (*TTFT > 1 s*). With {slots} slots for "
        f"{workload.adapters} adapters, the hottest adapter's second replica evicts another adapter, which evicts "
        "another where it comes back: affinity's cold loads. Every load stalls every request on its replica "
        "meanwhile. *engines refused* (`modelplex_sim_lora_load_refusals_total`, "
        "`modelplex_sim_model_not_found_total`): a load of an adapter already loaded is another backend's load (the "
        "pool takes it as loaded, no harm); a load beyond the slots the pool takes as the adapter's fault (a 400, "
        "INVALID_ARGUMENT, not retried) and its requests fail; a request for an adapter the replica no longer has "
        "(another backend unloaded it) is reloaded and retried once, then fails (NOT_FOUND). Backends share their "
        "placements (a peer's pick loads the adapter into this backend's view and keeps it in use there until the "
        "next scrape tick, so no backend unloads an adapter under a peer's request on its way); what is left are "
        "races inside a scrape interval. *replicas holding the "
        "hottest*: how many replicas had the most popular adapter loaded, sampled each second; *adapters placed*: "
        f"how many of the {workload.adapters} were loaded anywhere. "
        "*picks*: the backends' `modelplex_pool_picks_total` by reason, and the busiest replica's share. The shared "
        "2-core machine adds tens of ms of jitter; p99 rests on the few slowest of a few hundred requests.",
    ]
    examples = sorted({e for r in results for e in r.error_examples})
    if examples:
        lines += ["", "Errors seen: " + "; ".join(f"`{e[:300]}`" for e in examples[:3])]
    return "\n".join(lines)


def _lora_bars(results: list[LoraResult]) -> list[str]:
    """The issue's bar: affinity beats round robin by 2x on cold loads per 1000 requests and on p99 TTFT."""
    at = {(r.policy, r.backends, r.load): r for r in results}
    lines = []
    for backends in sorted({r.backends for r in results}):
        for load in sorted({r.load for r in results if r.backends == backends}):
            picker, base = at.get(("affinity", backends, load)), at.get(("round_robin", backends, load))
            if picker is None or base is None:
                lines.append(f"- {backends} backend(s), {load:.0%} load: not measured in this run.")
                continue
            cold, p99 = lora_ratios(picker, base)
            met = cold <= 1 / LORA_BAR_FACTOR and p99 <= 1 / LORA_BAR_FACTOR
            lines.append(
                f"- {backends} backend(s), {load:.0%} load: affinity / round robin = {cold:.3f} on cold loads per "
                f"1000 requests ({_beats(cold)}), {p99:.3f} on p99 TTFT ({_beats(p99)}); bar {LORA_BAR_FACTOR:g}x "
                f"on both: **{'met' if met else 'not met'}** (errors: affinity {picker.errors}, round robin "
                f"{base.errors})."
            )
    return ["Bars (affinity / round robin: the bar wants both at most 0.5):", "", *lines]


def lora_ratios(picker: LoraResult, base: LoraResult) -> tuple[float, float]:
    """affinity / round robin on cold loads per 1000 requests and on p99 TTFT (below 1: affinity better)."""
    cold = picker.cold_per_1000 / base.cold_per_1000 if base.cold_per_1000 else float("nan")
    return cold, picker.percentile(0.99) / base.percentile(0.99)


def _beats(ratio: float) -> str:
    if ratio != ratio:  # nan
        return "n/a"
    return f"{1 / ratio:.1f}x better" if ratio > 0 else "none at all under affinity"


def lora_main(args) -> None:
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="modelplex-sched-lora-"))
    workload = LoraWorkload(tenants=args.adapters, zipf_s=args.zipf)
    params = lora_engine(args.adapter_slots, args.lora_load_ms)
    redis = None
    if args.share_picks and max(args.backends) > 1:
        from tests.support.redis_server import RedisServer

        (log_dir / "redis").mkdir()
        redis = RedisServer(log_dir / "redis").start()
    args.sync_url = redis.url if redis is not None else ""
    results = []
    try:
        for backends in args.backends:
            for load in args.loads:
                for policy in args.policies:
                    r = run_lora(policy, load, backends, args, log_dir, workload, params)
                    print(
                        f"lora backends={backends} load={load:.0%} {policy:<12} cold/1000={r.cold_per_1000:.0f} "
                        f"p50={r.percentile(0.5):.0f}ms p99={r.percentile(0.99):.0f}ms errors={r.errors} "
                        f"refused={r.refusals} "
                        f"hottest on {r.hottest_replicas:.1f} placed {r.adapters_placed:.1f} {r.picks.summary()}",
                        file=sys.stderr,
                        flush=True,
                    )
                    results.append(r)
    finally:
        if redis is not None:
            redis.stop()
    section = lora_report(results, args, time.monotonic() - started)
    print(section)
    if args.write:
        write_section(args.write, section, LORA_HEADING)


def write_section(target: Path, section: str, title: str = HEADING) -> None:
    """Replaces this section of ``target`` where it stands, or adds it last above `make bench`'s keep-marker."""
    text = target.read_text() if target.exists() else ""
    measured, marker, kept = text.partition(KEEP_MARKER)
    if title in measured:
        before, _, after = measured.partition(title)
        rest = after.split("\n## ", 1)
        measured = before + section + ("\n\n## " + rest[1] if len(rest) > 1 else "\n\n")
    else:
        measured = measured.rstrip("\n") + "\n\n" + section + "\n\n"
    target.write_text(measured + (marker or KEEP_MARKER) + kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, help="engine replicas (8; --lora: 4)")
    parser.add_argument("--loads", type=float, nargs="+", help="shares of capacity (0.5 0.8 0.95; --lora: 0.6)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, help="(all; --lora: affinity round_robin)")
    parser.add_argument(
        "--backends", type=int, nargs="+", help="text backend replicas behind the model, per phase (1 2 3; --lora: 1 2)"
    )
    parser.add_argument(
        "--no-share-picks",
        dest="share_picks",
        action="store_false",
        help="several backends without a Redis to share their picks (each learns alone, as before issue 24)",
    )
    parser.add_argument(
        "--kv-events",
        action="store_true",
        help="the engines publish their KV-cache events and every backend follows them (as vLLM with the chart)",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="LoRA adapters: adapter-affinity picking vs round robin, more adapters than one replica holds",
    )
    parser.add_argument("--adapters", type=int, default=16, help="--lora: adapters the requests use")
    parser.add_argument("--zipf", type=float, default=1.0, help="--lora: the adapters' Zipf popularity exponent")
    parser.add_argument(
        "--adapter-slots",
        type=int,
        default=4,
        help="--lora: adapters per replica (the simulators' --lora-slots and MODELPLEX_TEXT_POOL_ADAPTER_SLOTS)",
    )
    parser.add_argument("--lora-load-ms", type=float, default=300.0, help="--lora: one adapter load's stall")
    parser.add_argument("--warmup", type=float, help="seconds of arrivals not measured (3; --lora: 8)")
    parser.add_argument("--seconds", type=float, help="seconds of measured arrivals per run (10; --lora: 30)")
    parser.add_argument("--cache-blocks", type=int, default=SimParams.cache_blocks, help="each replica's prefix cache")
    parser.add_argument("--write", type=Path, help="also put the section into this markdown file (docs/benchmarks.md)")
    args = parser.parse_args()
    lora = args.lora
    defaults = {
        "replicas": 4 if lora else 8,
        "loads": [LORA_BAR_LOAD] if lora else [0.5, 0.8, 0.95],
        "policies": list(LORA_POLICIES if lora else POLICIES),
        "backends": [1, 2] if lora else [1, 2, 3],
        "warmup": 8.0 if lora else 3.0,
        "seconds": 30.0 if lora else 10.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if lora:
        lora_main(args)
        return
    args.sim = SimParams(cache_blocks=args.cache_blocks)
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="modelplex-sched-"))
    redis = None
    if args.share_picks and max(args.backends) > 1:
        from tests.support.redis_server import RedisServer

        (log_dir / "redis").mkdir()
        redis = RedisServer(log_dir / "redis").start()
    args.sync_url = redis.url if redis is not None else ""
    results = []
    for backends in args.backends:
        for load in args.loads:
            for policy in args.policies:
                result = run_one(policy, load, backends, args, log_dir)
                print(
                    f"backends={backends} load={load:.0%} {policy:<13} p50={result.percentile(0.5):.0f}ms "
                    f"p99={result.percentile(0.99):.0f}ms hit={result.hit_rate:.1%} "
                    f"missed={result.prefix_miss_rate:.1%} replicas/tenant={result.replicas_per_tenant:.1f} "
                    f"errors={result.errors}",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(result)
    if redis is not None:
        redis.stop()
    section = report(results, args, time.monotonic() - started, picker_cost_us(args))
    print(section)
    if args.write:
        write_section(args.write, section, heading(args))


if __name__ == "__main__":
    main()
