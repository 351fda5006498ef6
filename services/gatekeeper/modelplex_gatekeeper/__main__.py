"""python -m modelplex_gatekeeper: serve GatekeeperService beside an edge."""

from __future__ import annotations

import asyncio

from modelplex.v1 import gatekeeper_pb2, gatekeeper_pb2_grpc
from modelplex_gatekeeper.gate import Gate
from modelplex_gatekeeper.keys import KeyRing, ensure_dev_file
from modelplex_gatekeeper.servicer import GatekeeperServicer
from modelplex_gatekeeper.settings import GatekeeperSettings
from modelplex_gatekeeper.store import build_store
from modelplex_kit.grpc_server import run, serve


async def main(settings: GatekeeperSettings) -> None:
    if settings.dev_key_if_missing is not None:
        ensure_dev_file(settings.keys_file, settings.dev_key_if_missing.get_secret_value())
    keys = KeyRing(settings.keys_file)
    store = build_store(settings)
    following = asyncio.create_task(keys.follow(settings.reload_seconds))

    def register(server):
        gatekeeper_pb2_grpc.add_GatekeeperServiceServicer_to_server(GatekeeperServicer(Gate(keys, store)), server)
        return [gatekeeper_pb2.DESCRIPTOR.services_by_name["GatekeeperService"].full_name]

    async def shutdown() -> None:
        following.cancel()
        await store.close()

    await serve("gatekeeper", settings, register, on_shutdown=shutdown)


if __name__ == "__main__":
    settings = GatekeeperSettings()
    run("gatekeeper", settings, lambda: main(settings))
