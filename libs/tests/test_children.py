"""Children spawned with tied_to_parent() die with their parent, even one killed by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# A parent that spawns a long sleeper through tied_to_parent(), prints its pid, and waits.
PARENT = """
import subprocess, sys, time
from modelplex_kit.children import tied_to_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], **tied_to_parent())
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        assert os.getpgid(child) == child  # its own process group: a terminal's Ctrl-C is not sent to it
        parent.send_signal(signal.SIGKILL)  # no finally, no atexit: only the kernel can clean up
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()


# A parent busy with gRPC (eight calls always in flight) that spawns children through tied_to_parent() and
# prints how many died before their exec. It imports the kit first, as make run and the test runs do.
BUSY_PARENT = """
import asyncio, subprocess, sys
import modelplex_kit
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from modelplex_kit.children import tied_to_parent

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stub = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    done = asyncio.Event()
    async def hammer():
        while not done.is_set():
            await stub.Check(health_pb2.HealthCheckRequest())
    calls = [asyncio.create_task(hammer()) for _ in range(8)]
    def spawn():
        child = subprocess.Popen([sys.executable, "-c", "pass"], stderr=subprocess.DEVNULL, **tied_to_parent())
        return child.wait()
    died = [await asyncio.to_thread(spawn) for _ in range(60)].count(-6)
    done.set()
    await asyncio.gather(*calls)
    print(died)

asyncio.run(main())
"""


def test_children_spawned_while_grpc_is_busy_all_start():
    """gRPC's fork support aborted about one child in five forked while its threads were busy (SIGABRT in
    ev_epoll1_linux.cc before the child's exec): the kit turns it off for the processes that spawn."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    done = subprocess.run([sys.executable, "-c", BUSY_PARENT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0", done.stdout
