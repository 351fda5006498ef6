"""python -m modelplex_gatekeeper: serve GatekeeperService beside an edge."""

from __future__ import annotations

from modelplex.v1 import gatekeeper_pb2, gatekeeper_pb2_grpc
from modelplex_gatekeeper.runtime import Gatekeeper
from modelplex_gatekeeper.servicer import GatekeeperServicer
from modelplex_gatekeeper.settings import GatekeeperSettings
from modelplex_kit.grpc_server import run, serve


async def main(settings: GatekeeperSettings) -> None:
    gatekeeper = Gatekeeper(settings)

    def register(server):
        servicer = GatekeeperServicer(gatekeeper.gate)
        gatekeeper_pb2_grpc.add_GatekeeperServiceServicer_to_server(servicer, server)
        return [gatekeeper_pb2.DESCRIPTOR.services_by_name["GatekeeperService"].full_name]

    await serve("gatekeeper", settings, register, on_shutdown=gatekeeper.close)


if __name__ == "__main__":
    settings = GatekeeperSettings()
    run("gatekeeper", settings, lambda: main(settings))
