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

    python -m bench.scheduling [--loads 0.5 0.8 0.95] [--policies round_robin least_loaded affinity]
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


def heading(args) -> str:
    return EVENTS_HEADING if args.kv_events else HEADING


POLICIES = ("round_robin", "least_loaded", "affinity")
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

    def system_prompts(self) -> list[str]:
        rng = random.Random(self.seed)
        lengths = [rng.randint(*self.system_tokens) for _ in range(self.tenants)]
        return [" ".join(f"t{t}w{i}" for i in range(n)) for t, n in enumerate(lengths)]

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

    def counters(self) -> dict[str, float]:
        """vLLM's prefix-cache counters summed over every replica."""
        totals = {"vllm:prefix_cache_hits": 0.0, "vllm:prefix_cache_queries": 0.0}
        for address in self.addresses:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
                families = text_string_to_metric_families(reply.read().decode())
            for family in families:
                if family.name in totals:
                    totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return totals

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
        cls, urls: list[str], policy: str, log_dir: Path, name: str = "text", sync_url: str = "", events_port: int = 0
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
        cls, count: int, urls: list[str], policy: str, log_dir: Path, sync_url: str = "", events_port: int = 0
    ) -> Backends:
        members = [Backend.start(urls, policy, log_dir, f"text{i}", sync_url, events_port) for i in range(count)]
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


async def drive(target: str, plan: list[Arrival], workload: Workload, on_warm) -> list[tuple[Arrival, Outcome]]:
    """Sends every arrival at its time (open loop); calls ``on_warm()`` when the measured window opens."""
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
            tasks.append(asyncio.create_task(_one(stub, _request(arrival, prompts, workload, i), due)))
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
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument(
        "--backends", type=int, nargs="+", default=[1, 2, 3], help="text backend replicas behind the model, per phase"
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
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of arrivals not measured")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of measured arrivals per run")
    parser.add_argument("--cache-blocks", type=int, default=SimParams.cache_blocks, help="each replica's prefix cache")
    parser.add_argument("--write", type=Path, help="also put the section into this markdown file (docs/benchmarks.md)")
    args = parser.parse_args()
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
