"""The cost of a bare gRPC round trip on this machine: a servicer that does nothing.

Reported beside the hops so a reader can tell the transport's share of each hop
from Modelplex's own code.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvloop
import yaml

from modelplex.v1 import text_pb2, text_pb2_grpc
from modelplex_kit.devstack import free_port

_REPLY = text_pb2.GenerateResponse(id="x", choices=[text_pb2.Choice(text="word " * 32)])


class Nothing(text_pb2_grpc.TextGenerationServiceServicer):
    async def Generate(self, request, context):
        return _REPLY

    async def GenerateStream(self, request, context):
        for _ in range(35):
            yield text_pb2.GenerateStreamResponse(deltas=[text_pb2.ChoiceDelta(text="word ")])


#: The model a catalog from start_floor() lists, served by the no-op servicer.
FLOOR_MODEL = "bench-floor"


@dataclass
class Floor:
    """The no-op servicer in its own process, and a catalog naming it as one text model."""

    process: subprocess.Popen
    catalog: Path

    def stop(self) -> None:
        self.process.terminate()


def start_floor(tmp: Path) -> Floor:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "--port", str(port)])
    catalog = tmp / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{
        "id": FLOOR_MODEL, "modality": "text", "backend": f"127.0.0.1:{port}",
        "capabilities": ["chat"], "engine": {"kind": "external"},
    }]}))
    return Floor(process, catalog)


async def main(port: int) -> None:
    # The bound our own backends set (GrpcServiceSettings.max_message_bytes), not gRPC's 4 MiB default.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)])
    text_pb2_grpc.add_TextGenerationServiceServicer_to_server(Nothing(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args().port))
