"""Where the edge's CPU goes under load: py-spy on the edge of a running stack (Issue 17).

The stack of bench/gatekeeper.py (the edge, a no-op gRPC backend, the gatekeeper sidecar with its
limits in memory) takes 64 concurrent connections while py-spy samples the edge; the report is the
share of the edge's samples spent inside each of a few named places (inclusive), and the top frames
by own time. Run it twice to see what a change cuts, e.g. with quota leases off:

    .venv/bin/python -m bench.profile --env MODELPLEX_EDGE_GATEKEEPER_LEASES=false
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gatekeeper import BODY, stack
from bench.grpc_floor import start_floor
from bench.platform_overhead import HttpClient, throughput

#: (label, substring of a frame "function (file:line)") whose inclusive share is reported.
PLACES = (
    ("gatekeeper client (admit + account)", "gatekeeper_client.py"),
    ("quota leases (in-process admission)", "leases.py"),
    ("gRPC stream writes to the gatekeeper", "_write (modelplex_edge/gatekeeper_client.py"),
    ("backend call (grpc aio unary)", "grpc_calls.py"),
    # Inclusive of everything under the router: with the hot routes, the endpoints run beneath it too.
    ("Starlette router (inclusive)", "starlette/routing.py"),
    # FastAPI's own route matching and request handling (parameters, exit stacks): what hot routes skip.
    ("FastAPI routing and request handling", "fastapi/routing.py"),
    ("the pipeline", "pipeline.py"),
)


def collapse(raw: Path) -> collections.Counter:
    stacks: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks[frames] += int(count)
    return stacks


def shares(stacks: collections.Counter) -> tuple[dict[str, float], list[tuple[str, float]]]:
    total = sum(stacks.values()) or 1
    places = {label: sum(n for s, n in stacks.items() if needle in s) / total for label, needle in PLACES}
    own: collections.Counter = collections.Counter()
    for frames, n in stacks.items():
        own[frames.rsplit(";", 1)[-1]] += n
    return places, [(frame, n / total) for frame, n in own.most_common(15)]


async def load(port: int, seconds: float) -> float:
    return await throughput(lambda: HttpClient(port).connect(), "/v1/chat/completions",
                            json.dumps(BODY).encode(), 64, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=value for every process of the stack")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise SystemExit("py-spy is not installed (make venv installs it from requirements-dev.txt)")
    tmp = Path(tempfile.mkdtemp(prefix="modelplex-profile-"))
    floor = start_floor(tmp)
    catalog = floor.catalog
    env = dict(item.split("=", 1) for item in args.env)
    running = stack(catalog, tmp, "profiled", "sidecar", env)
    try:
        edge = running.process("edge").popen.pid
        asyncio.run(load(running.edge_port, 2.0))  # warm-up
        raw = tmp / "edge.raw"
        spy_run = subprocess.Popen([spy, "record", "--pid", str(edge), "--duration", str(int(args.seconds)),
                                    "--rate", "250", "--format", "raw", "--output", str(raw), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rps = asyncio.run(load(running.edge_port, args.seconds))
        spy_run.wait(60)
    finally:
        running.stop()
        floor.stop()
    places, top = shares(collapse(raw))
    print(f"edge under 64 connections: {rps:.0f} req/s ({' '.join(args.env) or 'defaults'})")
    for label, share in places.items():
        print(f"  {share * 100:5.1f} %  {label}")
    print("top frames by own time:")
    for frame, share in top:
        print(f"  {share * 100:5.1f} %  {frame}")


if __name__ == "__main__":
    main()
