"""The cost of a bare gRPC round trip on this machine: a servicer that does nothing.

Reported beside the hops so a reader can tell the transport's share of each hop
from Modelplex's own code.
"""

from __future__ import annotations

import argparse

import grpc
import uvloop

from modelplex.v1 import text_pb2, text_pb2_grpc

_REPLY = text_pb2.GenerateResponse(id="x", choices=[text_pb2.Choice(text="word " * 32)])


class Nothing(text_pb2_grpc.TextGenerationServiceServicer):
    async def Generate(self, request, context):
        return _REPLY

    async def GenerateStream(self, request, context):
        for _ in range(35):
            yield text_pb2.GenerateStreamResponse(deltas=[text_pb2.ChoiceDelta(text="word ")])


async def main(port: int) -> None:
    server = grpc.aio.server()
    text_pb2_grpc.add_TextGenerationServiceServicer_to_server(Nothing(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args().port))
